"""The main job: train a small MoT model and its dense twin on the bundled corpus, evaluate both, generate samples
through `pipeline`, and write a report folder that says where MoT stands against dense at that budget.

    mot-main                      # defaults: the quality benchmark's best MoT and its dense twin, at its budget
    mot-main --max_steps 20       # a quick smoke run

The defaults are the quality benchmark's final comparison (docs/results.md): `mot-tiny-tuned` (MoT k 16 in the
second half of the blocks at T 0.1) and `dense-tiny-tuned`, each at its tuned learning rate (the presets bring it),
for 1,000 steps of 32 x 64 tokens.

Runs live in RUNS_DIR/<preset>; an interrupted job resumes from their checkpoints, and finished runs are reused.
The report (REPORT_DIR) holds metrics.json (perplexity by grouping, the offline lm-eval tasks through `motgpt`,
parameters and FLOPs), loss_curves.png, samples.md, samples.json and model_card.md.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from .card import flops_per_token, parameter_counts, render_model_card
from .evaluation import evaluate_on_corpora
from .presets import preset_training
from .run_log import plot_loss_curves, read_metrics, train_or_reuse
from .training import MoTTrainingArguments, ScriptArguments, run_training

LM_EVAL_TASKS = ("sotu_cloze", "sotu_perplexity")
PROMPTS = [
    "The state of the Union is",
    "Our economy",
    "I ask the Congress to",
    "The United States will never",
    "Tonight, I want to talk about",
    "We must protect our",
    "The American people",
    "In the coming year, my administration will",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", nargs=2, default=["mot-tiny-tuned", "dense-tiny-tuned"], help="the MoT model and its twin"
    )
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_steps", type=int, default=200)
    parser.add_argument("--eval_blocks", type=int, default=256, help="blocks per corpus in the final evaluation")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--report_dir", default="report")
    parser.add_argument(
        "--data_cache_dir", default=".cache/mot-data", help="packed blocks, shared by training and evaluation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm_eval_limit", type=int, help="items per lm-eval task (default: all)")
    return parser.parse_args(argv)


def training_arguments(preset: str, args: argparse.Namespace) -> MoTTrainingArguments:
    """The run's training arguments: the job's budget, and the learning rate (or whole recipe) the preset sets."""
    return MoTTrainingArguments(
        output_dir=str(Path(args.runs_dir) / preset),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        logging_steps=10,
        seed=args.seed,
        **preset_training(preset),
    )


def train(preset: str, args: argparse.Namespace) -> Path:
    """Train `preset` into RUNS_DIR/preset, resuming from a checkpoint, or reuse a finished run."""
    training_args = training_arguments(preset, args)
    script = ScriptArguments(
        preset=preset, block_size=args.block_size, max_eval_blocks=64, data_cache_dir=args.data_cache_dir
    )
    print(f"[main] {preset}: {args.max_steps} steps at lr {training_args.learning_rate:g}")
    train_or_reuse(script, training_args, run_training)
    return Path(training_args.output_dir)


def where_mot_stands(results: dict, mot: str, dense: str, args: argparse.Namespace) -> str:
    """The report's verdict: MoT's validation loss against its dense twin's at this budget, with the price paid."""
    mot_loss, dense_loss = (results[p]["validation"]["batch"]["mean_nll"] for p in (mot, dense))
    gap, tokens = mot_loss - dense_loss, args.max_steps * args.batch_size * args.block_size
    flops = results["flops_ratio_mot_to_dense"]
    parameters = results[mot]["parameters"] / results[dense]["parameters"]
    return (
        f"After {args.max_steps:,} steps of {args.batch_size} x {args.block_size} tokens ({tokens / 1e6:.1f} M "
        f"tokens), {mot} ends {abs(gap):.3f} nats ({abs(gap) / dense_loss:.1%}) "
        f"{'behind' if gap > 0 else 'ahead of'} {dense} in held-out validation loss ({mot_loss:.3f} against "
        f"{dense_loss:.3f}), at {flops:.3f} times its FLOPs per token and {parameters:.1f} times its parameters. "
        "One seed each; the quality benchmark (docs/results.md) measures the spread over seeds."
    )


def generate_samples(run: Path, prompts: list[str]) -> list[dict]:
    """Greedy continuations of the prompts through `pipeline`, one at a time; a MoT model completes each lone
    prompt's group with the run's filler bank (by default), so each text depends on its prompt only."""
    generator = pipeline("text-generation", model=str(run))
    outputs = generator(prompts, max_new_tokens=40, do_sample=False, batch_size=1, return_full_text=True)
    return [{"prompt": prompt, "text": out[0]["generated_text"]} for prompt, out in zip(prompts, outputs, strict=True)]


def lm_eval_scores(run: Path, batch_size: int, limit: int | None = None) -> dict:
    """The run's scores on the package's offline lm-eval tasks through the `motgpt` model (each MoT request in a group
    of its own with the run's fillers), as `mot-lm-eval` computes them."""
    # Imported here: lm-eval (which `lm_eval_model` imports too) is the optional `lm-eval` extra, and slow to import.
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_model import TASK_DIR

    print(f"[main] lm-eval on {', '.join(LM_EVAL_TASKS)} for {run.name}")
    output = lm_eval.simple_evaluate(
        model="motgpt",
        model_args=f"pretrained={run}",
        tasks=list(LM_EVAL_TASKS),
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        batch_size=batch_size,
        device="cpu" if not torch.cuda.is_available() else "cuda",
        log_samples=False,
        limit=limit,
    )
    return {task: {key: value for key, value in output["results"][task].items() if key != "alias"}
            for task in LM_EVAL_TASKS}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """`mot-main`."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    started = time.time()

    runs, models, results, samples = {}, {}, {}, {}
    for preset in args.presets:
        tick = time.time()
        runs[preset] = train(preset, args)
        model = models[preset] = AutoModelForCausalLM.from_pretrained(runs[preset])
        tokenizer = AutoTokenizer.from_pretrained(runs[preset])
        is_mot = bool(model.config.mot_layer_indices)
        groupings = ("batch", "single", "fillers") if is_mot else ("batch",)
        print(f"[main] evaluating {preset} ({', '.join(groupings)} grouping)")
        results[preset] = evaluate_on_corpora(
            model,
            tokenizer,
            args.block_size,
            args.batch_size,
            groupings,
            args.eval_blocks,
            data_cache_dir=args.data_cache_dir,
        )
        total, active = parameter_counts(model)
        results[preset] |= {
            "parameters": total,
            "active_parameters_per_token": active,
            "flops_per_token": flops_per_token(model),
            "seconds": round(time.time() - tick, 1),
        }
        samples[preset] = generate_samples(runs[preset], PROMPTS)
        results[preset]["lm_eval"] = lm_eval_scores(runs[preset], args.batch_size, args.lm_eval_limit)

    mot, dense = args.presets
    results["flops_ratio_mot_to_dense"] = results[mot]["flops_per_token"] / results[dense]["flops_per_token"]
    mot_loss, dense_loss = (results[p]["validation"]["batch"]["mean_nll"] for p in (mot, dense))
    results["validation_loss_ratio_mot_to_dense"] = mot_loss / dense_loss
    results["mot_minus_dense_validation_loss"] = mot_loss - dense_loss
    results["where_mot_stands"] = where_mot_stands(results, mot, dense, args)
    results["total_seconds"] = round(time.time() - started, 1)
    (report / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_loss_curves({preset: read_metrics(run) for preset, run in runs.items()}, report / "loss_curves.png")
    (report / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    lines = ["# Samples (greedy, 40 new tokens; MoT: each prompt in a group with the run's fillers)", ""]
    for preset, items in samples.items():
        lines += [f"## {preset}", ""] + [f"- {item['text']!r}" for item in items] + [""]
    (report / "samples.md").write_text("\n".join(lines))

    optimizer = training_arguments(mot, args)
    training_details = (
        f"Trained from scratch for {args.max_steps} steps of {args.batch_size} x {args.block_size} tokens on the "
        "State of the Union addresses (1790-2002; the 20 latest speeches held out), with a byte-level BPE of "
        f"8,192 tokens, AdamW (lr {optimizer.learning_rate:g}, {optimizer.lr_scheduler_type}, warm-up "
        f"{optimizer.warmup_steps:g}, weight decay {optimizer.weight_decay:g}, clipping {optimizer.max_grad_norm:g}). "
        + results["where_mot_stands"]
    )
    card = render_model_card(
        models[mot],
        results[mot],
        repo_id=f"your-org/{mot}",
        training_details=training_details,
        dense_twin=models[dense],
    )
    card.save(report / "model_card.md")
    print(f"[main] report written to {report}/ in {results['total_seconds']} s")
    for preset in args.presets:
        print(f"[main] {preset}: validation perplexity {results[preset]['validation']['batch']['perplexity']:.2f}")
    print(f"[main] {results['where_mot_stands']}")
