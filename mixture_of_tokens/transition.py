"""Transition tuning, `mot-transition-tune`: convert a trained Mixture of Tokens checkpoint into a batch-independent
Token Choice model, save it, and fine-tune it.

[`run_transition_tuning`] converts the MoT checkpoint with [`~mixture_of_tokens.conversion.mot_to_token_choice`] (its
router bias calibrated on blocks of the training corpus), saves it, and fine-tunes it through the project's ordinary
fine-tuning path ([`~mixture_of_tokens.training.run_training`] with `model_name_or_path`), with the load-balancing
loss on; [`finish_tuned_model`] then makes the tuned model an inference model (the loss off, the router bias
calibrated again). How a MoT layer maps onto a Token Choice layer, and why, is explained in
`mixture_of_tokens.conversion`.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    set_seed,
)

from .conversion import calibrate_router_bias, mot_to_token_choice
from .data import load_text, pack
from .training import MoTTrainingArguments, ScriptArguments, parse_args, run_training

# Fine-tuning defaults of `mot-transition-tune`, placed before the user's arguments (which win).
TRANSITION_DEFAULTS = [
    "--learning_rate", "3e-4", "--warmup_steps", "0.1", "--max_steps", "100", "--output_dir", "runs/transition-tuned",
]  # fmt: skip


@dataclass
class TransitionArguments:
    """What `mot-transition-tune` adds to the training arguments."""

    num_experts_per_tok: int | None = field(
        default=None, metadata={"help": "experts per token k; default: the FLOP-matched d_ff / expert_size"}
    )
    capacity_factor: float | None = field(
        default=None, metadata={"help": "per-expert capacity factor; default: no limit (batch-independent)"}
    )
    calibration_blocks: int = field(
        default=64,
        metadata={
            "help": "training blocks, drawn at random, whose router logits set the router bias that balances the "
            "experts at the start (and at the end, with recalibrate); 0: no router bias"
        },
    )
    calibration_corpus: list[str] = field(
        default_factory=list,
        metadata={
            "help": "text to draw the calibration blocks from, sources as for --corpus; default: the training corpus. "
            "Text like what the model will serve balances it there: another domain is routed differently"
        },
    )
    recalibrate: bool = field(
        default=True,
        metadata={"help": "calibrate the router bias again after tuning, which drifts it (costs some loss)"},
    )


def run_transition_tuning(
    script: ScriptArguments, args: MoTTrainingArguments, transition: TransitionArguments
) -> Trainer:
    """Convert the MoT checkpoint `script.model_name_or_path` to Token Choice, its router bias calibrated on
    `transition.calibration_blocks` blocks of the training corpus, save it with its tokenizer in
    `args.output_dir/converted`, and fine-tune that through [`~mixture_of_tokens.training.run_training`] into
    `args.output_dir`, with the load-balancing loss on (`output_router_logits=True`); the tuned model is saved with it
    off and, with `transition.recalibrate`, its router bias calibrated again ([`finish_tuned_model`]). With
    `script.resume`, the saved conversion is reused (after checking that the given `num_experts_per_tok` and
    `capacity_factor` agree with it) and training continues from the last checkpoint.

    In a distributed run only the process that saves (`args.should_save`) converts, inside
    `args.main_process_first`; the others wait there and then load what it saved. Returns the `Trainer`."""
    if script.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: the MoT checkpoint (folder or Hub name) to convert.")
    converted_dir = Path(args.output_dir) / "converted"
    # Local "first" only where every node saves its own copy; with one shared copy, the global main process writes.
    with args.main_process_first(local=args.save_on_each_node, desc="conversion to Token Choice"):
        if script.resume and (converted_dir / "config.json").exists():
            check_saved_conversion(converted_dir, transition)
        elif args.should_save:
            convert_and_save(script, converted_dir, transition, args.seed)
    # Given first, so that a `--model output_router_logits=false` of the user's wins.
    tuning = replace(script, model_name_or_path=str(converted_dir), model=["output_router_logits=true", *script.model])
    trainer = run_training(tuning, args)
    if args.should_save:
        finish_tuned_model(script, Path(args.output_dir), transition, args.seed)
    return trainer


def finish_tuned_model(script: ScriptArguments, output_dir: Path, transition: TransitionArguments, seed: int) -> None:
    """Make the tuned model saved in `output_dir` an inference model: the balancing loss off and, with
    `transition.recalibrate`, its router bias calibrated again on the same training blocks as at the conversion.

    Tuning moves the router away from balance, and Switch's loss does not hold it there: it balances the experts'
    mean router probabilities, which say little about first choices while the router's softmax is flat."""
    # Loaded from what the Trainer saved, so that it is whole whatever wrapped the model in training (DDP, FSDP).
    model = AutoModelForCausalLM.from_pretrained(output_dir, output_router_logits=False)
    if transition.recalibrate and transition.calibration_blocks and model.config.router_bias:
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        calibrate_router_bias(model, sample_calibration_blocks(script, transition, tokenizer, seed))
    model.save_pretrained(output_dir)


def convert_and_save(script: ScriptArguments, converted_dir: Path, transition: TransitionArguments, seed: int) -> None:
    """Load the MoT checkpoint `script.model_name_or_path`, convert it (calibrated on `transition.calibration_blocks`
    blocks, drawn with `seed`: see [`sample_calibration_blocks`]), and save it with its tokenizer in `converted_dir`."""
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    calibration = (
        sample_calibration_blocks(script, transition, tokenizer, seed) if transition.calibration_blocks else None
    )
    set_seed(seed)  # a uniform-MoT source's fresh router is then the same in every run with this seed
    converted = mot_to_token_choice(
        model, transition.num_experts_per_tok, transition.capacity_factor, calibration_ids=calibration
    )
    converted.save_pretrained(converted_dir)
    tokenizer.save_pretrained(converted_dir)


def sample_calibration_blocks(
    script: ScriptArguments, transition: TransitionArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> torch.LongTensor:
    """`(calibration_blocks, block_size)` ids of blocks drawn at random (with `seed`) from
    `transition.calibration_corpus`, or from the training corpus `script.corpus` when none is given, packed as the
    tuning run packs them (and cached in `script.data_cache_dir`)."""
    corpus = transition.calibration_corpus or script.corpus
    blocks = pack(load_text(corpus), tokenizer, script.block_size, script.data_cache_dir)
    picked = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[: transition.calibration_blocks]
    return torch.tensor(blocks.select(picked.tolist())["input_ids"])


def check_saved_conversion(converted_dir: Path, transition: TransitionArguments) -> None:
    """Refuse to resume with a `num_experts_per_tok` or `capacity_factor` other than the saved conversion's."""
    saved = json.loads((converted_dir / "config.json").read_text())
    for name in ("num_experts_per_tok", "capacity_factor"):
        given = getattr(transition, name)
        if given is not None and given != saved.get(name):
            raise ValueError(
                f"`--{name}`={given!r} differs from the saved conversion's {name}={saved.get(name)!r} in "
                f"{str(converted_dir)!r}: resuming continues that model. Resume without --{name} (the saved value is "
                "kept), or convert again into another --output_dir."
            )


TRANSITION_USAGE = """Transition tuning: convert a trained MoTGPT checkpoint into a batch-independent Token Choice
model and fine-tune it.

    mot-transition-tune --model_name_or_path runs/mot-tiny --output_dir runs/mot-tiny-tc --max_steps 30
    mot-transition-tune --model_name_or_path runs/mot-tiny --corpus notes/*.txt --num_experts_per_tok 2

Every MoT layer becomes a Token Choice layer (controller / temperature -> router, experts -> experts, output
projections times n_experts / group_size; see `mixture_of_tokens.conversion`). The converted model is saved, with the
tokenizer, in OUTPUT_DIR/converted, then fine-tuned like `mot-finetune` into OUTPUT_DIR: `--corpus`, `--validation`,
`--resume` and every argument of `mot-train` work the same (all listed here), with other defaults:
`--learning_rate 3e-4 --warmup_steps 0.1 --max_steps 100 --output_dir runs/transition-tuned`.
`--num_experts_per_tok` (default: FLOP-matched d_ff / expert_size) and `--capacity_factor` (default: no limit, which
keeps the model batch-independent and drops no token) set the Token Choice layers. The router starts
balanced: its bias is calibrated on `--calibration_blocks` (64) blocks of the training corpus (or of
`--calibration_corpus`, text like what the model will serve), again after tuning. Tuning adds the
load-balancing loss; the saved model computes none unless asked. The result loads with `AutoModelForCausalLM`, with or
without this package installed (`trust_remote_code=True` then).
"""


def print_help() -> None:
    """Every argument `mot-transition-tune` takes, the training ones included, with the transition-tuning defaults."""

    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The usage text as written, and every argument's default."""

    parser = HfArgumentParser(
        (TransitionArguments, ScriptArguments, MoTTrainingArguments),
        prog="mot-transition-tune",
        description=TRANSITION_USAGE,
        formatter_class=HelpFormatter,
    )
    # The help must show the defaults this command trains with, not those of mot-train.
    pairs = zip(TRANSITION_DEFAULTS[::2], TRANSITION_DEFAULTS[1::2], strict=True)
    parser.set_defaults(**{key.removeprefix("--"): value for key, value in pairs})
    parser.print_help()


def main(argv: list[str] | None = None) -> None:
    """`mot-transition-tune`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    transition, rest = HfArgumentParser(TransitionArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    script, args = parse_args(TRANSITION_DEFAULTS + rest)
    run_transition_tuning(script, args, transition)


__all__ = [
    "TRANSITION_DEFAULTS",
    "TransitionArguments",
    "finish_tuned_model",
    "run_transition_tuning",
    "sample_calibration_blocks",
]
