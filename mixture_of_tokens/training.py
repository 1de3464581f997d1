"""Pretraining and fine-tuning MoTGPT (or any causal LM) with `transformers.Trainer`: `mot-train` and `mot-finetune`.

    mot-train --preset mot-tiny --output_dir runs/mot-tiny --max_steps 300
    mot-train --config_file my_run.yaml --learning_rate 1e-3     # the command line wins
    mot-train --output_dir runs/mot-tiny --resume true           # continue where it stopped
    mot-finetune --model_name_or_path runs/mot-tiny --corpus notes/*.txt --output_dir runs/tuned

Every MoTGPTConfig field: --model n_experts=64 group_size=16 'mot_layers=[2,3]'. Every TrainingArguments field
works as in transformers (--per_device_train_batch_size, --eval_steps, --bf16, ...); the defaults follow the paper.
`mot-finetune` takes any causal LM checkpoint (MoTGPT or not) and the same arguments, with a lower learning rate.
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch.distributed.fsdp import FSDPModule
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint, set_seed

from .configuration_mot import MoTGPTConfig
from .data import load_sotu, load_text, make_tokenizer, pack, sample_blocks
from .fillers import build_filler_bank, save_filler_bank
from .modeling_mot import MoTGPTForCausalLM, MoTLayer

# Model presets: each MoT preset has a dense twin ("dense-*": the same network with no MoT block), so the two spend
# the same FLOPs per token (up to MoT's controller and mixing, about 3 * n_experts * n_embd multiply-adds per token).
# Every dense MLP uses the experts' activation (ReLU, as in the paper), so a twin differs only in the layer type.
_BACKBONES = {
    # A CPU-sized model for the main job and quick experiments.
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_experts=32, group_size=16),
    # The first version of the paper's proof of concept: 4 layers, d 256, G 32, E 512.
    "small": dict(n_layer=4, n_embd=256, n_head=4, n_experts=512, group_size=32),
    # The paper's MoT-Medium/32E/1 and MoT-Base/32E/1 (MoT in the second half of the blocks).
    "medium": dict(n_layer=8, n_embd=512, n_head=8, n_experts=32, group_size=32, mot_layers="second_half"),
    "base": dict(n_layer=12, n_embd=768, n_head=12, n_experts=32, group_size=32, mot_layers="second_half"),
}
PRESETS = {f"mot-{name}": fields | {"activation_function": "relu"} for name, fields in _BACKBONES.items()} | {
    f"dense-{name}": fields | {"activation_function": "relu", "mot_layers": []} for name, fields in _BACKBONES.items()
}


def preset_config(preset: str, **overrides: Any) -> MoTGPTConfig:
    """The `MoTGPTConfig` of a named preset, with any config field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
    fields = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} | PRESETS[preset] | overrides
    return MoTGPTConfig(**fields)


@dataclass
class ScriptArguments:
    """What `mot-train` and `mot-finetune` add to `TrainingArguments`."""

    preset: str = field(default="mot-tiny", metadata={"help": f"model preset, one of {sorted(PRESETS)}"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "fine-tune this checkpoint (any AutoModelForCausalLM) instead of a preset"}
    )
    model: list[str] = field(
        default_factory=list, metadata={"help": "config fields to override, as KEY=VALUE (VALUE read as JSON)"}
    )
    corpus: list[str] = field(
        default_factory=lambda: ["sotu"],
        metadata={"help": "'sotu', 'kjv', .txt files or a save_to_disk folder (training text)"},
    )
    validation: list[str] = field(
        default_factory=list, metadata={"help": "validation text; default: the held-out sotu speeches"}
    )
    tokenizer: str = field(default="bpe", metadata={"help": "'bpe' (trained on the corpus) or 'gpt2'"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size of the trained BPE"})
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence"})
    max_eval_blocks: int | None = field(
        default=256,
        metadata={"help": "evaluate during training on N validation blocks in a fixed shuffled order (0: all)"},
    )
    data_cache_dir: str = field(default=".cache/mot-data", metadata={"help": "where packed blocks are cached"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    anneal_temperature: bool = field(
        default=False,
        metadata={
            "help": "anneal the MoT temperature to 0 (discrete routing) by the end of training; see anneal_fraction"
        },
    )
    anneal_fraction: float = field(
        default=0.5,
        metadata={"help": "with anneal_temperature: cosine from the config's T to 0 over this last part of the run"},
    )
    config_file: str | None = field(default=None, metadata={"help": "YAML/JSON file of arguments (CLI wins)"})


@dataclass
class MoTTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's optimization defaults (cosine to 10% of peak, clip 0.5, decay 0.1)."""

    output_dir: str | None = field(default="runs/mot-tiny", metadata={"help": "checkpoints, metrics and plots"})
    learning_rate: float = 7e-4
    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1})
    warmup_steps: float = 0.05
    max_grad_norm: float = 0.5
    weight_decay: float = 0.1
    max_steps: int = 200
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    dataloader_drop_last: bool = True
    eval_strategy: str = "steps"
    eval_steps: float | None = 50
    logging_steps: float = 10
    save_steps: float = 50
    save_total_limit: int | None = 2
    report_to: None | str | list[str] = "none"
    # Without CUDA, only `use_cpu` makes torchrun / accelerate launch set up CPU DDP (gloo); otherwise each process
    # would silently train a model of its own.
    use_cpu: bool = not torch.cuda.is_available()

    def __post_init__(self):
        super().__post_init__()
        if self.fsdp_plugin_args is not None and "state_dict_type" not in self.fsdp_config:
            # Sharded checkpoints: each process writes its own shards instead of gathering the G-fold expert weights
            # and their optimizer state on one; the final model is still saved whole (`MoTTrainer.save_model`).
            self.fsdp_plugin_args["state_dict_type"] = "SHARDED_STATE_DICT"


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, MoTTrainingArguments]:
    """Parse `--key value` arguments; `--config_file F` reads the same arguments from a YAML/JSON file (JSON is
    YAML), and the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ScriptArguments, MoTTrainingArguments))
    if "--config_file" in argv:
        index = argv.index("--config_file")
        path, argv = argv[index + 1], argv[:index] + argv[index + 2 :]
        if not Path(path).is_file():
            raise ValueError(f"`config_file` {path!r} does not exist.")
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"`config_file` {path!r} must hold a mapping of argument names to values.")
        if isinstance(values.get("model"), dict):  # `model:` may also be written as a mapping of config fields
            values["model"] = [f"{key}={json.dumps(value)}" for key, value in values["model"].items()]
        parser.parse_dict(values)  # HfArgumentParser's own check: a ValueError names any unknown argument
        parser.set_defaults(**values)  # the file's values become the defaults, which the command line overrides
    return parser.parse_args_into_dataclasses(args=argv)


def config_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["n_experts=64", "mot_layers=[1, 3]"]` -> `{"n_experts": 64, "mot_layers": [1, 3]}`."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"`--model` takes KEY=VALUE pairs, got {pair!r}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def check_groups(config: Any, train_batch_size: int, eval_batch_size: int) -> None:
    """Refuse per-device batches that cannot be cut into full MoT groups."""
    if not getattr(config, "uses_groups", False):
        return  # a dense model, or Token Choice, which never looks at other rows
    group_size = config.group_size
    for name, size in (
        ("per_device_train_batch_size", train_batch_size),
        ("per_device_eval_batch_size", eval_batch_size),
    ):
        if size % group_size:
            raise ValueError(
                f"`{name}`={size} is not a multiple of the model's group_size={group_size}: every batch would end "
                f"with a partial group of {size % group_size} rows, whose tokens see fewer others than in a full "
                "group. Choose a multiple of group_size."
            )


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; the labels are the inputs (the model shifts them)."""
    input_ids = torch.tensor([example["input_ids"] for example in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


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


def annealed_temperature(step: int, max_steps: int, start: float, fraction: float) -> float:
    """MoT temperature after `step` of `max_steps` optimizer steps: `start` until the last `fraction` of the run,
    then a cosine from `start` down to exactly 0 at `max_steps`."""
    begin = max_steps * (1 - fraction)
    if step <= begin:
        return float(start)
    progress = (step - begin) / (max_steps - begin)
    return 0.0 if progress >= 1 else float(start) * 0.5 * (1 + math.cos(math.pi * progress))


def check_annealing(config: Any, fraction: float) -> None:
    """Refuse temperature annealing for a model or fraction it cannot apply to, before any training."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`anneal_fraction` must be in (0, 1], got {fraction!r}.")
    ffn_type = getattr(config, "ffn_type", None)
    if ffn_type != "mot" or not config.mot_layer_indices:
        mot_layers = getattr(config, "mot_layers", None)
        raise ValueError(
            f"`anneal_temperature` needs a MoTGPT model with MoT layers (ffn_type 'mot', non-empty mot_layers), "
            f"got ffn_type={ffn_type!r}, mot_layers={mot_layers!r}."
        )
    if config.learnable_temperature != "none":
        raise ValueError(
            f"`anneal_temperature` sets the temperature itself: it needs learnable_temperature='none', "
            f"got {config.learnable_temperature!r}."
        )
    if not config.router_temperature > 0:
        raise ValueError(
            f"`anneal_temperature` needs a starting router_temperature > 0, got {config.router_temperature!r}."
        )


class TemperatureAnnealingCallback(TrainerCallback):
    """Anneals every MoT layer's temperature to 0 over the last `fraction` of training (see `annealed_temperature`).

    The temperature is a function of the global step only, so a resumed run continues the schedule where it stopped.
    It is set, in the layers and in `config.router_temperature`, before each step and after it: with s steps done,
    to T(s), so step s + 1 trains at T(s), and evaluations and the checkpoint after step s see T(s). The checkpoint of
    step s thus stores the temperature of the step after it (step s itself ran at T(s - 1)), and the final model
    stores T(max_steps) = 0 (discrete routing), a temperature no step trained at exactly: the last one ran at
    T(max_steps - 1) > 0.
    """

    def __init__(self, start_temperature: float, fraction: float):
        self.start_temperature = start_temperature
        self.fraction = fraction

    def _apply(self, state, model) -> None:
        temperature = annealed_temperature(state.global_step, state.max_steps, self.start_temperature, self.fraction)
        for module in model.modules():
            if isinstance(module, MoTLayer):
                module.temperature = temperature
        model.config.router_temperature = temperature

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)


# Parameters exempt from weight decay besides those `Trainer` finds (biases and LayerNorms): a learned temperature
# would be pulled towards T = 1, and expert biases are biases whose names do not say so.
NO_DECAY_SUFFIXES = ("log_temperature", ".b_in", ".b_out")


class MoTTrainer(Trainer):
    """`Trainer` that also exempts learned MoT temperatures and expert biases from weight decay, shards with FSDP on
    CPU too, and saves an FSDP model whole."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith(NO_DECAY_SUFFIXES)]

    def create_accelerator_and_postprocess(self) -> None:
        """As `Trainer`'s, with FSDP on CPU too, and under `accelerate launch` with an FSDP config that names no wrap
        policy, one FSDP unit per `_no_split_modules` block (`MoTGPTBlock`), as `--fsdp` does (accelerate's own
        default is one unit for the whole model, which gathers every parameter at once)."""
        if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # set by `accelerate launch` with an FSDP config
            os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        # Read again: with `--fsdp`, `Trainer` sets the flag in the call above.
        if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            # Accelerate turns FSDP on only on accelerators and would silently train with DDP on CPU, although FSDP2
            # shards over gloo. Set up as accelerate does on a GPU, where both states record FSDP.
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            if state.mixed_precision != "no":
                state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer`'s, but an FSDP model is saved whole from a plain copy (FSDP2 changes the model's class, so
        its own `save_pretrained` would write torch's source files and their names in `auto_map`), and a sharded
        run's checkpoints hold the config and tokenizer beside their shards."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        # A sharded run's checkpoint: its weights are the shards `Trainer` writes next to it.
        shards_only = _internal_call and "SHARDED" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        state_dict = None if shards_only else self.accelerator.get_state_dict(self.model)  # a gather: every process
        if not self.args.should_save:
            return
        if shards_only:
            self.model.config.save_pretrained(output_dir)
        else:
            unsharded_copy(self.model, state_dict).save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / "training_args.bin")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain model of the class FSDP2 wrapped in `model`, holding the gathered `state_dict` (no second copy)."""
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        plain = model_class(model.config)
    plain.load_state_dict(state_dict, assign=True)
    plain.tie_weights()  # `assign` replaced the tied output embedding by a copy
    plain.generation_config = model.generation_config
    return plain


def build_model(script: ScriptArguments, tokenizer: PreTrainedTokenizerBase):
    """A fresh preset model sized to the tokenizer, or the checkpoint `model_name_or_path` to fine-tune."""
    overrides = config_overrides(script.model)
    if script.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(script.model_name_or_path, **overrides)
    config = preset_config(
        script.preset,
        vocab_size=len(tokenizer),
        n_positions=script.block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    return MoTGPTForCausalLM(config)


def load_tokenizer(
    script: ScriptArguments, train_texts: list[str], output_dir: Path, main_process: bool
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer when fine-tuning; the one in `output_dir` when resuming, or in the processes of a
    distributed run after the first; else a new one, saved there."""
    if script.model_name_or_path is not None:
        return AutoTokenizer.from_pretrained(script.model_name_or_path)
    if script.resume or not main_process:
        return AutoTokenizer.from_pretrained(output_dir)
    return make_tokenizer(script.tokenizer, train_texts, script.vocab_size, output_dir)


def check_run(config: Any, script: ScriptArguments, args: MoTTrainingArguments) -> None:
    """Refuse a model config that the run's batches or temperature annealing cannot apply to."""
    check_groups(config, args.per_device_train_batch_size, args.per_device_eval_batch_size)
    if script.anneal_temperature:
        check_annealing(config, script.anneal_fraction)


def run_training(script: ScriptArguments, args: MoTTrainingArguments) -> Trainer:
    """Prepare data, tokenizer and model, check the batch against the groups, train, save and plot."""
    if script.model_name_or_path is None:  # fail fast on a bad preset, config field or batch size
        check_run(preset_config(script.preset, **config_overrides(script.model)), script, args)
    output_dir = Path(args.output_dir)
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last_checkpoint is not None:
        if not script.resume:
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} already holds checkpoints: pass --resume true to continue "
                "from the last one, or choose another --output_dir."
            )
    elif script.resume:
        raise ValueError(f"--resume was given but `output_dir` {str(output_dir)!r} holds no checkpoint.")
    output_dir.mkdir(parents=True, exist_ok=True)
    if last_checkpoint is not None and args.process_index == 0:
        # Logs written after the checkpoint, before the stop, are logged again by the resumed run: drop them.
        kept = [r for r in read_metrics(output_dir) if r["step"] <= checkpoint_step(last_checkpoint)]
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    train_text = load_text(script.corpus)
    validation_text = load_text(script.validation) if script.validation else load_sotu()["validation"]
    # The first process trains the tokenizer and fills the block cache; the others then read them.
    # Global, not per node: the other nodes' processes read the tokenizer that process 0 writes.
    with args.main_process_first(local=False, desc="tokenizer and packed blocks"):
        tokenizer = load_tokenizer(script, train_text["text"], output_dir, args.process_index == 0)
        train_blocks = pack(train_text, tokenizer, script.block_size, script.data_cache_dir)
        validation_blocks = pack(validation_text, tokenizer, script.block_size, script.data_cache_dir)
    set_seed(args.seed)  # the same initial weights in every run with this seed (Trainer seeds only after this)
    model = build_model(script, tokenizer)
    check_run(model.config, script, args)
    callbacks = [JsonlMetricsCallback()]
    if script.anneal_temperature:
        callbacks.append(TemperatureAnnealingCallback(model.config.router_temperature, script.anneal_fraction))
    validation_blocks = sample_blocks(validation_blocks, script.max_eval_blocks)
    trainer = MoTTrainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=validation_blocks,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=script.resume or None)
    trainer.save_model(str(output_dir))  # on every process: FSDP and DeepSpeed gather weights there
    if trainer.is_world_process_zero():
        save_training_fillers(model.config, train_blocks, output_dir)
        plot_loss_curves({output_dir.name: read_metrics(output_dir)}, output_dir / "loss_curves.png")
    return trainer


def save_training_fillers(config: Any, train_blocks, output_dir: Path) -> None:
    """Save `group_size - 1` training blocks, spread over the corpus, as the checkpoint's filler bank (see
    `mixture_of_tokens.fillers`), for a model whose layers need groups."""
    if not getattr(config, "uses_groups", False) or config.group_size < 2:
        return
    n_rows = config.group_size - 1
    stride = max(1, len(train_blocks) // (4 * n_rows))  # candidates spread over the corpus; some hold an EOS
    candidates = train_blocks.select(range(0, len(train_blocks), stride))["input_ids"]
    save_filler_bank(build_filler_bank(candidates, n_rows, config.eos_token_id), output_dir, config.group_size)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The training step a Trainer checkpoint folder (`checkpoint-<step>`) was saved at."""
    return int(Path(checkpoint).name.split("-")[-1])


def train_or_reuse(script: ScriptArguments, args: MoTTrainingArguments, run=run_training) -> int | None:
    """`run(script, args)`, resuming from the last checkpoint in `args.output_dir` if there is one, unless that folder
    already holds a finished run (its final `model.safetensors`). Sets `script.resume` accordingly; returns the step
    training started from (0, or the checkpoint's step), or None when it reused a finished run. The arguments are
    recorded in the folder, and a folder recorded with other arguments is refused (`ValueError` naming them) instead
    of being resumed or reused as if it matched."""
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


def _run_arguments(script: ScriptArguments, args: MoTTrainingArguments) -> dict:
    fields = {f"--{key}": value for key, value in asdict(script).items() if key != "resume"}
    fields |= {f"--{key}": getattr(args, key) for key in _RECORDED_TRAINING_ARGUMENTS}
    return json.loads(json.dumps(fields, default=str))  # as it reads back from the file


FINETUNE_DEFAULTS = ["--learning_rate", "1e-4", "--max_steps", "100", "--output_dir", "runs/finetuned"]


def train_main(argv: list[str] | None = None) -> None:
    """`mot-train`: pretrain a preset (or `--model_name_or_path`) as the arguments say."""
    run_training(*parse_args(argv))


def finetune_main(argv: list[str] | None = None) -> None:
    """`mot-finetune`: fine-tune the checkpoint `--model_name_or_path` with the fine-tuning defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script, args = parse_args(FINETUNE_DEFAULTS + argv)
    if script.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: the checkpoint (folder or Hub name) to fine-tune.")
    run_training(script, args)
