"""What a training run writes in its output folder, and how a folder's run is resumed or reused.

`metrics.jsonl` (every log: training loss, learning rate, evaluation loss, ...), read back by [`read_metrics`] and
[`validation_curve`] and drawn by [`plot_loss_curves`]; `checkpoint-<step>` folders ([`checkpoint_step`]); and
`run_arguments.json`, the arguments [`train_or_reuse`] records so that it never resumes or reuses a folder made with
other arguments.
"""

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

if TYPE_CHECKING:  # for the annotations only: `training` imports this module
    from .training import MoTTrainingArguments, ScriptArguments


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (training loss, learning rate, evaluation loss, ...) to `output_dir/metrics.jsonl`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def validation_curve(output_dir: str | Path) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation logged by a run, in step order."""
    return sorted((record["step"], record["eval_loss"]) for record in read_metrics(output_dir) if "eval_loss" in record)


def plot_loss_curves(runs: dict[str, list[dict]], path: str | Path) -> None:
    """One PNG with the training and validation loss of each run against the step."""
    # Imported here: matplotlib takes a while to import, and only the final plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, records) in enumerate(runs.items()):
        color = f"C{index}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.45, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), color=color, marker="o", label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The training step a Trainer checkpoint folder (`checkpoint-<step>`) was saved at."""
    return int(Path(checkpoint).name.split("-")[-1])


def train_or_reuse(
    script: "ScriptArguments",
    args: "MoTTrainingArguments",
    run: Callable[["ScriptArguments", "MoTTrainingArguments"], object],
) -> int | None:
    """`run(script, args)` (e.g. [`~mixture_of_tokens.training.run_training`]), resuming from the last checkpoint in
    `args.output_dir` if there is one, unless that folder already holds a finished run (its final `model.safetensors`).
    Sets `script.resume` accordingly; returns the step training started from (0, or the checkpoint's step), or None
    when it reused a finished run. The arguments are recorded in the folder, and a folder recorded with other arguments
    is refused (`ValueError` naming them) instead of being resumed or reused as if it matched."""
    output_dir = Path(args.output_dir)
    recorded, current = output_dir / "run_arguments.json", _run_arguments(script, args)
    if recorded.exists():
        before = json.loads(recorded.read_text())
        changed = {key: (before.get(key), value) for key, value in current.items() if before.get(key) != value}
        if changed:
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} holds a run made with other arguments (recorded, now): {changed}. "
                "Choose another output_dir, or delete that folder to start over."
            )
    if (output_dir / "model.safetensors").exists():
        print(f"finished run found in {output_dir}, reusing it")
        return None
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    script.resume = last_checkpoint is not None
    print(f"training into {output_dir}" + " (resuming)" * script.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(current, indent=2) + "\n")
    run(script, args)
    return checkpoint_step(last_checkpoint) if script.resume else 0


# The training arguments that change what a run computes (besides every ScriptArguments field but `resume`).
_RECORDED_TRAINING_ARGUMENTS = (
    "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
    "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "bf16", "fp16",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "dataloader_drop_last", "seed",
)  # fmt: skip


def _run_arguments(script: "ScriptArguments", args: "MoTTrainingArguments") -> dict:
    fields = {f"--{key}": value for key, value in asdict(script).items() if key != "resume"}
    fields |= {f"--{key}": getattr(args, key) for key in _RECORDED_TRAINING_ARGUMENTS}
    return json.loads(json.dumps(fields, default=str))  # as it reads back from the file
