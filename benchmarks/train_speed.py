"""Training-step time and peak training memory of every model of the quality benchmark (dense, MoT, uniform MoT, Token
Choice, Expert Choice), as ratios to the dense model, measured side by side.

A benchmark, not a test. The models are those of `benchmarks/quality.py` (same configs, vocabulary 8,192), trained
on random tokens. Time: one full AdamW step (forward, backward, clipping, optimizer), candidates interleaved within
each repeat in alternating order, median per model and median of the per-repeat ratios to dense; a repeat during
which other processes used the CPU is redone. Memory: each model runs a few steps in a fresh process; the peak
resident memory of that process above its level before the model was built (weights, gradients, AdamW state and
activations) is reported; on CUDA, `torch.cuda.max_memory_allocated`. The memory processes run as many at a
time as there are CPUs.

    .venv/bin/python benchmarks/train_speed.py                 # batch 32 x 64 tokens, 10 repeats
    .venv/bin/python benchmarks/train_speed.py --quick         # a few seconds, for a smoke test

Writes `--out` (JSON) and the same name with `.png`.
"""

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import (
    RESULTS,
    VARIANTS,
    interleaved_times,
    machine_info,
    make_step,
    median_ratio,
    pyplot,
    variant_config,
    variant_model,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="RUN")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    parser.add_argument("--quick", action="store_true", help="tiny vocabulary and batch, 2 repeats")
    parser.add_argument("--memory_of", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.block_size, args.vocab_size, args.repeats, args.warmup = 16, 16, 256, 2, 1
    if "dense" not in args.runs:
        args.runs.insert(0, "dense")
    return args


def build(name: str, args: argparse.Namespace, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = variant_model(variant_config(name, "tiny"), args.vocab_size, args.block_size).to(device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def random_batch(args: argparse.Namespace, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), generator=generator).to(device)


def peak_memory_mb(name: str, args: argparse.Namespace) -> float:
    """In this (fresh) process: build model `name`, run a few training steps, return the peak memory they took."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    ids = random_batch(args, device)
    if device == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current level, so earlier peaks (imports) do not count
    before_kb = memory_status_kb("VmRSS")
    step = make_step(*build(name, args, device), ids)
    for _ in range(3):
        step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (memory_status_kb("VmHWM") - before_kb) / 1024


def memory_status_kb(key: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, in kB (Linux). Not `getrusage`'s
    `ru_maxrss`: that survives `exec`, so a child started by a large process would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """`peak_memory_mb` of each model, each in a process of its own; as many at once as there are CPUs (each process
    reports only its own peak, so they do not disturb each other's numbers)."""

    def child(name: str) -> float:
        argv = [sys.executable, __file__, "--memory_of", name, "--threads", str(args.threads)]
        argv += ["--batch_size", str(args.batch_size), "--block_size", str(args.block_size)]
        argv += ["--vocab_size", str(args.vocab_size)]
        return round(float(subprocess.check_output(argv, text=True).split()[-1]), 1)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return dict(zip(args.runs, pool.map(child, args.runs), strict=True))


def measure_time(args: argparse.Namespace) -> tuple[dict[str, list[float]], int]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = random_batch(args, device)
    steps = {}
    for name in args.runs:
        torch.manual_seed(0)
        steps[name] = make_step(*build(name, args, device), ids)
    return interleaved_times(steps, device, args.repeats, args.warmup)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    names = list(results["step_ms"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in (
        (axes[0], "step_time_ratio_to_dense", "training-step time / dense"),
        (axes[1], "peak_memory_ratio_to_dense", "peak training memory / dense"),
    ):
        bars = ax.bar(names, [results[key][name] for name in names], color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_of:
        print(peak_memory_mb(args.memory_of, args))
        return {}
    torch.set_num_threads(args.threads)
    times, discarded = measure_time(args)
    memory = measure_memory(args)
    dense = times["dense"]
    results = {
        "benchmark": "one AdamW training step (forward, backward, clip, step), fp32; peak training memory",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "memory_of")},
        "step_ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "step_time_ratio_to_dense": {name: round(median_ratio(t, dense), 3) for name, t in times.items()},
        "peak_memory_mb": memory,
        "peak_memory_ratio_to_dense": {name: round(mb / memory["dense"], 2) for name, mb in memory.items()},
        "discarded_rounds": discarded,
        "machine": machine_info(),
    }
    out = Path(args.out)
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    for name in args.runs:
        print(
            f"[train_speed] {name:14s} step {results['step_ms'][name]:8.1f} ms "
            f"({results['step_time_ratio_to_dense'][name]:.2f} x dense), peak memory {memory[name]:7.1f} MB "
            f"({results['peak_memory_ratio_to_dense'][name]:.2f} x dense)"
        )
    return results


if __name__ == "__main__":
    main()
