"""Perplexity of a checkpoint on the held-out State of the Union speeches and on the King James Bible (out of domain).

    python scripts/evaluate.py runs/mot-tiny
    python scripts/evaluate.py runs/mot-tiny --grouping batch single fillers --router_temperature 0

Perplexity is computed with the `evaluate` library through the metric module shipped in the package. How rows are
grouped matters for a MoT model (see mixture_of_tokens/evaluation.py): `batch` groups consecutive blocks as in
training, `single` evaluates each block alone, `fillers` puts each block with group_size - 1 training blocks.
"""

import argparse
import json
import sys
from pathlib import Path

# This script shares its name with the `evaluate` library: keep its folder off the import path, so that
# `import evaluate` (used by the metric) finds the library and not this file.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mixture_of_tokens.data import load_kjv, load_sotu, load_text, pack  # noqa: E402
from mixture_of_tokens.evaluation import GROUPINGS, evaluate_perplexity  # noqa: E402


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
    block_size = args.block_size or model.config.n_positions
    batch_size = args.batch_size or getattr(model.config, "group_size", 8)
    corpora = {"validation": load_sotu()["validation"], "kjv": load_kjv()}
    if args.text:
        corpora["text"] = load_text(args.text[0] if len(args.text) == 1 else args.text)
    fillers = pack(load_sotu()["train"], tokenizer, block_size, args.data_cache_dir)
    results = {"model": str(args.model), "block_size": block_size, "batch_size": batch_size}
    results["router_temperature"] = args.router_temperature
    for name, text in corpora.items():
        blocks = pack(text, tokenizer, block_size, args.data_cache_dir)
        if args.max_blocks:
            blocks = blocks.select(range(min(args.max_blocks, len(blocks))))
        results[name] = {
            grouping: evaluate_perplexity(model, blocks, batch_size, grouping, fillers, args.router_temperature)
            for grouping in args.grouping
        }
    return results


def main() -> None:
    args = parse_args()
    results = evaluate_checkpoint(args)
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
