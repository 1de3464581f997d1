"""New tokens per second of batched greedy generation: MoTGPT against GPT-2 with the same attention stack and a
FLOP-matched MLP, side by side in one process.

    python benchmarks/generation_speed.py                 # batch 32, prompt 32, 128 new tokens, KV cache
    python benchmarks/generation_speed.py --batch_size 32 64 128 256 512   # the ratio against the number of groups
    python benchmarks/generation_speed.py --quick         # a few seconds, for a smoke test

Writes benchmarks/results/generation_speed.json and .png (the ratio against the batch size).
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import RESULTS, machine_info, pyplot, time_generation, write_json
from transformers import GPT2Config, GPT2LMHeadModel

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[32], help="one or more batch sizes")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_experts", type=int, default=32)
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", default=str(RESULTS / "generation_speed.json"))
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    shared = dict(
        vocab_size=args.vocab_size,
        n_positions=args.prompt_len + args.new_tokens,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=max(1, args.n_embd // 64),
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    mot = MoTGPTForCausalLM(MoTGPTConfig(n_experts=args.n_experts, group_size=args.group_size, **shared))
    # The dense twin: GPT-2's own model, its MLP as wide as the MoT layer's FLOP-matched width d_ff.
    dense = GPT2LMHeadModel(GPT2Config(n_inner=mot.config.d_ff, activation_function="relu", **shared))
    return {"motgpt": mot.eval(), "gpt2": dense.eval()}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    rows = results["results"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["batch_size"] for r in rows], [r["ratio_motgpt_to_gpt2"] for r in rows], marker="o", color="C1")
    for row in rows:
        ax.annotate(f"{row['ratio_motgpt_to_gpt2']:.2f}", (row["batch_size"], row["ratio_motgpt_to_gpt2"]), fontsize=8,
                    textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"batch size (groups of {results['settings']['group_size']})")
    ax.set_ylabel("MoTGPT / GPT-2 new tokens per second")
    ax.set_title("batched greedy generation, KV cache, fp32", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_batch(models: dict[str, torch.nn.Module], batch_size: int, args: argparse.Namespace) -> dict:
    """Median new tokens per second of each model at one batch size, the two interleaved in every repeat."""
    prompts = torch.randint(1, args.vocab_size, (batch_size, args.prompt_len))
    for model in models.values():  # warm-up
        time_generation(model, prompts, min(8, args.new_tokens))
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
        for name, model in models.items():
            times[name].append(time_generation(model, prompts, args.new_tokens))
    tokens_per_second = {name: batch_size * args.new_tokens / statistics.median(t) for name, t in times.items()}
    return {
        "batch_size": batch_size,
        "groups": -(-batch_size // args.group_size),
        "seconds": times,
        "tokens_per_second": tokens_per_second,
        "ratio_motgpt_to_gpt2": tokens_per_second["motgpt"] / tokens_per_second["gpt2"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.batch_size, args.prompt_len, args.new_tokens, args.n_embd, args.repeats = [8, 16], 8, 8, 64, 1
        args.vocab_size, args.group_size, args.n_experts = 512, 8, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models(args)
    rows = []
    for batch_size in args.batch_size:
        rows.append(time_batch(models, batch_size, args))
        print(
            f"batch {batch_size}: "
            + json.dumps({k: rows[-1][k] for k in ("tokens_per_second", "ratio_motgpt_to_gpt2")})
        )
    config = models["motgpt"].config
    results = {
        "benchmark": "batched greedy generation with KV cache, fp32",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "batch_size")},
        "d_ff": config.d_ff,
        "expert_size": config.expert_size_resolved,
        # What one decode step must read: MoT's experts hold group_size times the dense MLP's weights.
        "mlp_weight_mb_per_layer": {
            "motgpt": 4 * sum(p.numel() for p in models["motgpt"].transformer.h[0].mlp.parameters()) / 2**20,
            "gpt2": 4 * sum(p.numel() for p in models["gpt2"].transformer.h[0].mlp.parameters()) / 2**20,
        },
        "results": rows,
        "machine": machine_info(),
    }
    out = Path(args.out)
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
