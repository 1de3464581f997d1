"""Fine-tune any causal LM checkpoint (MoTGPT or not) on your own text with transformers.Trainer.

    python scripts/finetune.py --model_name_or_path runs/mot-tiny --corpus notes/*.txt --output_dir runs/tuned

`--corpus` takes .txt files (one example per file) or a folder written by `datasets.Dataset.save_to_disk`;
`--validation` likewise (default: the held-out State of the Union speeches). All TrainingArguments work.
"""

import sys

from mixture_of_tokens.training import parse_args, run_training

FINETUNE_DEFAULTS = ["--learning_rate", "1e-4", "--max_steps", "100", "--output_dir", "runs/finetuned"]


def main() -> None:
    script, args = parse_args(FINETUNE_DEFAULTS + sys.argv[1:])
    if script.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: the checkpoint (folder or Hub name) to fine-tune.")
    run_training(script, args)


if __name__ == "__main__":
    main()
