"""Pretrain a MoTGPT model (or its dense twin) from scratch with transformers.Trainer.

    python scripts/train.py --preset mot-tiny --output_dir runs/mot-tiny --max_steps 300
    python scripts/train.py --config_file my_run.yaml --learning_rate 1e-3     # the command line wins
    python scripts/train.py --output_dir runs/mot-tiny --resume true           # continue where it stopped

Every MoTGPTConfig field: --model n_experts=64 group_size=16 'mot_layers=[2,3]'. Every TrainingArguments field
works as in transformers (--per_device_train_batch_size, --eval_steps, --bf16, ...); the defaults follow the paper.
"""

from mixture_of_tokens.training import parse_args, run_training


def main() -> None:
    script, args = parse_args()
    run_training(script, args)


if __name__ == "__main__":
    main()
