"""`python -m mixture_of_tokens.serving CHECKPOINT`: the same command as `mot-serve`."""

from .cli import main

main()
