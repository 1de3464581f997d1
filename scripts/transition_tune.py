"""Transition tuning: convert a trained MoTGPT checkpoint into a batch-independent Token Choice model and fine-tune it.

    python scripts/transition_tune.py --model_name_or_path runs/mot-tiny --output_dir runs/mot-tiny-tc --max_steps 30
    python scripts/transition_tune.py --model_name_or_path runs/mot-tiny --corpus notes/*.txt --num_experts_per_tok 2

Every MoT layer becomes a Token Choice layer (controller / temperature -> router, experts -> experts, output
projections times n_experts / group_size; see `mixture_of_tokens.transition`). The converted model is saved, with
the tokenizer, in OUTPUT_DIR/converted, then fine-tuned like `scripts/finetune.py` into OUTPUT_DIR: `--corpus`,
`--validation`, `--resume` and every argument of `scripts/train.py` work the same (all listed by `--help`), with
other defaults: `--learning_rate 3e-4 --warmup_steps 0.1 --max_steps 100 --output_dir runs/transition-tuned`.
`--num_experts_per_tok` (default: FLOP-matched d_ff / expert_size) and `--capacity_factor` (default: no limit, which
keeps the model batch-independent) set the Token Choice layers. The result loads with `AutoModelForCausalLM`, with
or without this package installed (`trust_remote_code=True` then).
"""

import argparse
import sys

from transformers import HfArgumentParser

from mixture_of_tokens.training import MoTTrainingArguments, ScriptArguments, parse_args
from mixture_of_tokens.transition import TRANSITION_DEFAULTS, TransitionArguments, run_transition_tuning


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every argument's default."""


def print_help() -> None:
    """Every argument the script takes, the training scripts' included, with the transition-tuning defaults."""
    parser = HfArgumentParser(
        (TransitionArguments, ScriptArguments, MoTTrainingArguments), description=__doc__, formatter_class=HelpFormatter
    )
    # The help must show the defaults this script trains with, not those of scripts/train.py.
    pairs = zip(TRANSITION_DEFAULTS[::2], TRANSITION_DEFAULTS[1::2], strict=True)
    parser.set_defaults(**{key.removeprefix("--"): value for key, value in pairs})
    parser.print_help()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    transition, rest = HfArgumentParser(TransitionArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    script, args = parse_args(TRANSITION_DEFAULTS + rest)
    run_transition_tuning(script, args, transition)


if __name__ == "__main__":
    main()
