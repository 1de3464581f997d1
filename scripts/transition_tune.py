"""Transition tuning: convert a trained MoTGPT checkpoint into a batch-independent Token Choice model and fine-tune it.

    python scripts/transition_tune.py --model_name_or_path runs/mot-tiny --output_dir runs/mot-tiny-tc --max_steps 30
    python scripts/transition_tune.py --model_name_or_path runs/mot-tiny --corpus notes/*.txt --num_experts_per_tok 2

Every MoT layer becomes a Token Choice layer (controller / temperature -> router, experts -> experts, output
projections times k; see `mixture_of_tokens.transition`). The converted model is saved, with the tokenizer, in
OUTPUT_DIR/converted, then fine-tuned like `scripts/finetune.py` into OUTPUT_DIR: `--corpus`, `--validation`,
`--resume` and every TrainingArguments field work the same. `--num_experts_per_tok` (default: FLOP-matched
d_ff / expert_size) and `--capacity_factor` (default: no limit, which keeps the model batch-independent) set the
Token Choice layers. The result loads with `AutoModelForCausalLM`, with or without this package installed
(`trust_remote_code=True` then).
"""

import sys

from transformers import HfArgumentParser

from mixture_of_tokens.training import parse_args
from mixture_of_tokens.transition import TRANSITION_DEFAULTS, TransitionArguments, run_transition_tuning


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    transition, rest = HfArgumentParser(TransitionArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    script, args = parse_args(TRANSITION_DEFAULTS + rest)
    run_transition_tuning(script, args, transition)


if __name__ == "__main__":
    main()
