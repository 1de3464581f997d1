"""Transition tuning against temperature annealing: two ways to serve a MoT model without its batch.

A benchmark, not a test. Steps:

1. Train a MoT model (preset `mot-tiny`, blocks of 64 tokens, batch 32, 500 steps by default) or take `--mot_run`
   (its step count from its metrics.jsonl, or `--mot_steps`).
2. Validation loss of the MoT model, with evaluation rows grouped as in training (consecutive blocks in groups).
3. Convert it to Token Choice (`mixture_of_tokens.transition`), evaluate right after the switch, then transition-tune
   it for N = 10% of the MoT run's steps (`scripts/transition_tune.py`'s path), evaluating every few steps.
4. Train the annealing path: the same MoT run (same steps, same seed) with `--anneal_temperature true`, evaluated
   with discrete routing (T = 0). `--skip_annealing` skips it. A `--mot_run` needs `--skip_annealing`: a faithful
   annealed twin would repeat that run's training exactly (its tokenizer, corpus, config, schedule and seed), which
   its config.json alone does not record, and a twin that differs would not be a comparison.

All losses are mean next-token cross-entropies (nats/token) on the same first `--eval_blocks` validation blocks.
Writes `--out` (JSON) and a plot beside it. Runs live in `--runs_dir`: a finished run is reused, an interrupted one
resumed from its last checkpoint.

Usage, from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transition.py               # about 20 minutes on one CPU thread
    .venv/bin/python benchmarks/transition.py --mot_run runs/mot-tiny --block_size 128 --skip_annealing
    .venv/bin/python benchmarks/transition.py --quick   # a tiny smoke run of a few seconds
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixture_of_tokens.data import head, load_sotu, load_text, pack, sotu_speech_files  # noqa: E402
from mixture_of_tokens.evaluation import evaluate_perplexity  # noqa: E402
from mixture_of_tokens.training import (  # noqa: E402
    parse_args,
    read_metrics,
    run_training,
    train_or_reuse,
    validation_curve,
)
from mixture_of_tokens.transition import TRANSITION_DEFAULTS, TransitionArguments, run_transition_tuning  # noqa: E402

TARGET = 0.02  # converted model's validation loss within 2% of the MoT model's after N steps
QUICK_MODEL = ["n_layer=1", "n_embd=32", "n_head=2", "n_experts=8", "group_size=4"]


def parse_benchmark_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mot_run", help="a trained MoTGPT run to start from (needs --skip_annealing)")
    parser.add_argument("--mot_steps", type=int, help="steps of --mot_run (default: read from its metrics.jsonl)")
    parser.add_argument("--skip_annealing", action="store_true", help="no annealed MoT run (needed with --mot_run)")
    parser.add_argument("--max_steps", type=int, default=500, help="steps of the MoT and annealed runs")
    parser.add_argument("--tune_fraction", type=float, default=0.1, help="transition-tuning steps / MoT steps")
    parser.add_argument("--tune_eval_every", type=int, default=5, help="evaluate every this many tuning steps")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_blocks", type=int, default=512, help="validation blocks in every evaluation")
    parser.add_argument("--runs_dir", default="runs/transition")
    parser.add_argument("--out", default="benchmarks/results/transition.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny corpus, a few steps")
    args = parser.parse_args(argv)
    check_mot_run(args)
    if args.quick:
        args.max_steps, args.tune_fraction, args.tune_eval_every = 20, 0.1, 1
        args.batch_size, args.block_size, args.eval_blocks = 8, 32, 16
    return args


def check_mot_run(args: argparse.Namespace) -> None:
    """Refuse `--mot_run` without `--skip_annealing` (see the module docstring) and a `--mot_steps` that is not
    about a given run, before anything is trained."""
    if args.mot_run and not args.skip_annealing:
        raise ValueError(
            f"`--mot_run`={args.mot_run!r} needs --skip_annealing: the annealed twin would have to repeat that run's "
            "training exactly (tokenizer, corpus, config, schedule, seed), which its config.json does not record. "
            "Pass --skip_annealing, or leave out --mot_run to train both runs here."
        )
    if args.mot_steps is not None and (not args.mot_run or args.mot_steps < 1):
        raise ValueError(
            f"`--mot_steps`={args.mot_steps} must be an integer >= 1 given with --mot_run (the steps that run "
            "trained); the MoT run trained here has --max_steps steps."
        )


def mot_run_steps(args: argparse.Namespace) -> int:
    """The optimizer steps the MoT run trained: `--max_steps` for the one trained here; for a `--mot_run`,
    `--mot_steps` or the last step in its metrics.jsonl."""
    if not args.mot_run:
        return args.max_steps
    if args.mot_steps is not None:
        return args.mot_steps
    steps = [record["step"] for record in read_metrics(args.mot_run) if "step" in record]
    if not steps:
        raise ValueError(
            f"`--mot_run`={args.mot_run!r} has no metrics.jsonl with logged steps to read its step count from: "
            "pass --mot_steps N, the optimizer steps that run trained (an integer >= 1)."
        )
    return max(steps)


def data_arguments(args: argparse.Namespace) -> list[str]:
    """Corpus arguments shared by every run: the bundled corpus, or a few speeches in quick mode."""
    common = ["--block_size", str(args.block_size), "--max_eval_blocks", str(args.eval_blocks)]
    common += ["--per_device_train_batch_size", str(args.batch_size)]
    common += ["--per_device_eval_batch_size", str(args.batch_size), "--seed", str(args.seed)]
    common += ["--disable_tqdm", "true"]
    if not args.quick:
        return common
    files = sotu_speech_files()
    return common + ["--corpus", *map(str, files[100:103]), "--validation", str(files[-1]), "--vocab_size", "300"]


def train(output_dir: Path, argv: list[str], run=run_training) -> Path:
    """Train with the arguments `argv` into `output_dir` (resumed, or reused when finished) through `run`."""
    train_or_reuse(*parse_args(argv + ["--output_dir", str(output_dir)]), run=run)
    return output_dir


def mot_arguments(args: argparse.Namespace, steps: int) -> list[str]:
    """Arguments of the MoT run trained here and of its annealed twin, both `steps` long."""
    every = str(max(1, steps // 10))
    argv = ["--preset", "mot-tiny", "--max_steps", str(steps), "--eval_steps", every, "--save_steps", every]
    argv += ["--logging_steps", "10"] + data_arguments(args)
    return argv + (["--model", *QUICK_MODEL] if args.quick else [])


def validation_loss(run: Path, blocks, batch_size: int, **kwargs) -> float:
    model = AutoModelForCausalLM.from_pretrained(run)
    return evaluate_perplexity(model, blocks, batch_size, **kwargs)["mean_nll"]


def plot(results: dict, path: Path) -> None:
    """Left: validation loss along the MoT and annealed runs, with the transition after the MoT run. Right: the
    transition-tuning steps against the MoT model's loss, the 2% target and the annealed model at T = 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, mot_steps = results["validation_loss"], results["mot_steps"]
    tuning = results["tuning_curve"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style, label in (("mot_curve", "C0o-", "MoT"), ("annealed_curve", "C2o-", "MoT, T annealed to 0")):
        if results[key]:  # a given --mot_run may have no evaluations logged
            left.plot(*zip(*results[key], strict=True), style, label=label)
    left.plot([mot_steps + step for step, _ in tuning], [value for _, value in tuning], "C1.-", label="Token Choice")
    if "annealed_t0" in loss:  # absent with --skip_annealing
        left.plot([mot_steps], [loss["annealed_t0"]], "C2*", markersize=12, label="annealed, served at T = 0")
    left.set_title("validation loss along training")
    right.plot(*zip(*tuning, strict=True), "C1o-", label="converted to Token Choice, tuning")
    right.axhline(loss["mot"], color="C0", label=f"MoT {loss['mot']:.3f}")
    right.axhline(loss["mot"] * (1 + TARGET), color="C0", linestyle="--", label="MoT + 2% (target)")
    if "annealed_t0" in loss:
        annealed = loss["annealed_t0"]
        right.axhline(annealed, color="C2", linestyle=":", label=f"annealed at T = 0 {annealed:.3f}")
    right.set_title(f"transition tuning ({results['tuning_steps']} steps = 10% of {mot_steps})")
    right.set_xlabel("transition-tuning step")
    for ax in (left, right):
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_benchmark_args(argv)
    torch.manual_seed(args.seed)
    runs, started = Path(args.runs_dir), time.time()
    mot_steps = mot_run_steps(args)  # before any training: a --mot_run without a step count is refused
    mot_run = Path(args.mot_run) if args.mot_run else train(runs / "mot", mot_arguments(args, mot_steps))
    tuning_steps = max(1, round(args.tune_fraction * mot_steps))
    tokenizer = AutoTokenizer.from_pretrained(mot_run)
    validation = load_text([str(sotu_speech_files()[-1])]) if args.quick else load_sotu()["validation"]
    blocks = head(pack(validation, tokenizer, args.block_size), args.eval_blocks)

    tune_every = str(args.tune_eval_every)
    tuned = train(
        runs / "token-choice",
        TRANSITION_DEFAULTS
        + ["--model_name_or_path", str(mot_run), "--max_steps", str(tuning_steps), "--eval_steps", tune_every]
        + ["--logging_steps", tune_every, "--save_steps", str(tuning_steps)]
        + data_arguments(args),
        run=lambda script, training: run_transition_tuning(script, training, TransitionArguments()),
    )
    annealed = None
    if not args.skip_annealing:  # the twin of the MoT run trained here: same arguments and steps, annealed
        annealed = train(runs / "mot-annealed", mot_arguments(args, mot_steps) + ["--anneal_temperature", "true"])

    print("[transition] evaluating")
    loss = {
        "mot": validation_loss(mot_run, blocks, args.batch_size),
        "mot_t0": validation_loss(mot_run, blocks, args.batch_size, router_temperature=0.0),
        "after_switch": validation_loss(tuned / "converted", blocks, args.batch_size),
        "tuned": validation_loss(tuned, blocks, args.batch_size),
    }
    if annealed is not None:
        loss["annealed_t0"] = validation_loss(annealed, blocks, args.batch_size, router_temperature=0.0)
    # Each block alone (a group of one): MoT changes, the Token Choice model gives its batch loss again.
    alone = head(blocks, 64)
    loss_alone = {
        "mot": validation_loss(mot_run, alone, args.batch_size, grouping="single"),
        "mot_batch": validation_loss(mot_run, alone, args.batch_size),
        "tuned": validation_loss(tuned, alone, args.batch_size, grouping="single"),
        "tuned_batch": validation_loss(tuned, alone, args.batch_size),
    }
    results = {
        "mot_run": str(mot_run),
        "mot_steps": mot_steps,
        "tuning_steps": tuning_steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "eval_blocks": len(blocks),
        "validation_loss": loss,
        "tuned_relative_to_mot": loss["tuned"] / loss["mot"] - 1,
        "target_met": loss["tuned"] <= loss["mot"] * (1 + TARGET),
        "first_64_blocks_alone_vs_batched": loss_alone,
        "mot_curve": validation_curve(mot_run),
        "annealed_curve": validation_curve(annealed) if annealed is not None else [],
        "tuning_curve": [(0, loss["after_switch"]), *validation_curve(tuned)],
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps({key: results[key] for key in ("validation_loss", "tuned_relative_to_mot", "target_met")}))


if __name__ == "__main__":
    main()
