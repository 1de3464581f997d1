"""Forward + backward time of each expert layer (MoT, uniform MoT, Token Choice, Expert Choice) against the FLOP-matched
dense GPT-2 MLP (fp32, CPU or CUDA).

A benchmark, not a test. All layers are built from the same `MoTGPTConfig` (dropout 0) with `expert_size=None`,
so each spends the dense MLP's expert FLOPs per token (MoT experts `group_size * 4d / n_experts` wide, Token and
Expert Choice experts `4d` wide with one expert per token); the dense MLP uses the experts' activation so that only
the layer structure differs. Candidates are interleaved within each repeat (alternating their order); after
warm-up, the median time of each and the median of the per-repeat ratios to dense are reported. A repeat during
which other processes used the CPU is redone (up to 3 * repeats times; the JSON counts them as `discarded_rounds`).

Usage, from the repository root:
    .venv/bin/python benchmarks/layer_speed.py [--repeats 10] [--tokens 8192] [--out benchmarks/results/...json]
    .venv/bin/python benchmarks/layer_speed.py --quick   # a tiny smoke run of a few seconds
"""

import argparse
import statistics
from pathlib import Path

import torch
from common import (
    LAYER_TYPES,
    build_layers,
    interleaved_times,
    machine_info,
    make_layer_step,
    median_ratio,
    pyplot,
    write_json,
)

GROUP_SIZE = 32
SETTINGS = [(256, 32), (256, 256), (512, 32), (512, 256)]  # (n_embd, n_experts)
QUICK_SETTINGS = [(64, 8), (64, 32)]


def time_setting(
    d: int, n_experts: int, batch: int, seq_len: int, repeats: int, warmup: int, layer_types: tuple[str, ...]
) -> dict[str, object]:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(batch, seq_len, d, device=device, requires_grad=True)
    grad = torch.randn(batch, seq_len, d, device=device)
    layers = build_layers(d, n_experts, GROUP_SIZE, layer_types)
    steps = {name: make_layer_step(layer.to(device), x, grad) for name, layer in layers.items()}
    times, discarded = interleaved_times(steps, device, repeats, warmup)
    return {
        "n_embd": d,
        "n_experts": n_experts,
        "expert_size": {name: layer.experts.up_proj.shape[-1] for name, layer in layers.items() if name != "dense"},
        "ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "ratio_to_dense": {
            name: round(median_ratio(t, times["dense"]), 4) for name, t in times.items() if name != "dense"
        },
        "discarded_rounds": discarded,
    }


def plot(results: list[dict], path: Path) -> None:
    try:
        plt = pyplot()
    except ImportError:
        print("matplotlib is not installed: no chart written.")
        return

    labels = [f"d={r['n_embd']}\nE={r['n_experts']}" for r in results]
    names = list(dict.fromkeys(name for r in results for name in r["ratio_to_dense"]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(results), 3.8))
    for i, name in enumerate(names):
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        bars = ax.bar(positions, [r["ratio_to_dense"].get(name, 0) for r in results], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(results)), labels)
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_ylabel("time / dense MLP (fwd + bwd)")
    ax.set_title(f"expert layers / FLOP-matched dense MLP, group_size {GROUP_SIZE}, fp32", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens // seq_len)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/layer_speed[_quick].json")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--layers", nargs="+", default=list(LAYER_TYPES), choices=LAYER_TYPES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = SETTINGS
    if args.quick:
        settings, args.repeats, args.warmup, args.tokens, args.seq_len = QUICK_SETTINGS, 3, 1, 512, 8
    batch = max(1, args.tokens // args.seq_len)
    out = args.out or Path(f"benchmarks/results/layer_speed{'_quick' if args.quick else ''}.json")

    results = []
    for d, n_experts in settings:
        result = time_setting(d, n_experts, batch, args.seq_len, args.repeats, args.warmup, tuple(args.layers))
        results.append(result)
        ratios = "  ".join(f"{name} {ratio:.3f}" for name, ratio in result["ratio_to_dense"].items())
        print(f"d={d:4d} E={n_experts:4d}  dense {result['ms']['dense']:8.2f} ms  / dense: {ratios}", flush=True)
    report = {
        "benchmark": "expert layers vs GPT2MLP, forward + backward, fp32",
        "batch_size": batch,
        "seq_len": args.seq_len,
        "group_size": GROUP_SIZE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": machine_info(),
        "results": results,
    }
    write_json(report, out)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and its .png chart")
    return report


if __name__ == "__main__":
    main()
