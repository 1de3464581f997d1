"""Perplexity of a checkpoint on the held-out State of the Union speeches and on the King James Bible (out of domain).

    python scripts/evaluate_model.py runs/mot-tiny
    python scripts/evaluate_model.py runs/mot-tiny --grouping batch single fillers --router_temperature 0

(Named evaluate_model.py, not evaluate.py: a script of that name would shadow the `evaluate` library for every
script in this folder.)

Perplexity is computed with the `evaluate` library through the metric module shipped in the package. How rows are
grouped matters for a MoT model (see mixture_of_tokens/evaluation.py): `batch` groups consecutive blocks as in
training, `single` evaluates each block alone, `fillers` puts each block with group_size - 1 training blocks.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from mixture_of_tokens.data import load_text
from mixture_of_tokens.evaluation import GROUPINGS, evaluate_on_corpora


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder or Hub name (with its tokenizer)")
    parser.add_argument("--text", nargs="+", help="also evaluate on these .txt files or dataset folder")
    parser.add_argument("--block_size", type=int, help="tokens per block (default: the model's n_positions)")
    parser.add_argument("--batch_size", type=int, help="rows per forward pass (default: the model's group_size)")
    parser.add_argument("--max_blocks", type=int, default=512, help="blocks per corpus (default 512; 0 = all)")
    parser.add_argument("--grouping", nargs="+", default=["batch"], choices=GROUPINGS)
    parser.add_argument("--router_temperature", type=float, help="MoT temperature for this evaluation")
    parser.add_argument("--data_cache_dir", default=".cache/mot-data")
    parser.add_argument("--output", help="JSON results file (default: MODEL/eval_results.json)")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args()


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results = {"model": str(args.model)} | evaluate_on_corpora(
        model,
        tokenizer,
        block_size=args.block_size or model.config.n_positions,
        batch_size=args.batch_size or getattr(model.config, "group_size", 8),
        groupings=tuple(args.grouping),
        max_blocks=args.max_blocks,
        router_temperature=args.router_temperature,
        data_cache_dir=args.data_cache_dir,
        extra_text=load_text(args.text) if args.text else None,
    )
    return results


def main() -> None:
    args = parse_args()
    results = evaluate_checkpoint(args)
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
