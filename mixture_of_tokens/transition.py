"""Transition tuning: turn a trained Mixture of Tokens model into a batch-independent Token Choice model.

A MoT layer's output for one token depends on the other tokens of its group. The paper's remedy (Antoniak et al.,
section "Transition tuning") re-uses a trained MoT model's controller as a Token Choice router and its experts as
Token Choice experts, then trains briefly. [`mot_to_token_choice`] does the conversion; [`run_transition_tuning`]
converts a checkpoint, saves it, and fine-tunes it through the project's ordinary fine-tuning path
([`~mixture_of_tokens.training.run_training`] with `model_name_or_path`).

How a MoT layer maps onto a Token Choice layer (d = `n_embd`, E experts of width f, groups of G rows, T the router
temperature):

- **Experts per token.** A FLOP-matched MoT expert is `f = G * d_ff / E` wide; a Token Choice token that uses k
  experts of width f costs `k * f` multiply-adds per weight matrix, so `k = d_ff / f` (= E / G when FLOP-matched)
  keeps the FLOPs per token. The expert width f stays as it was and is written into the config as `expert_size`.
- **No capacity limit** by default (`capacity_factor=None`): with a limit, which tokens an expert drops depends on
  how many tokens the batch holds, so the model would again depend on the batch and cached decoding would differ
  from a full forward pass. Without one, no token is ever dropped and every row is computed on its own.
- **Router = controller / T.** MoT's weights are a softmax of `x @ controller / T` (over the group); dividing the
  controller by T (fixed, or the learned `log_temperature`, per layer or per expert) keeps the logits at the scale
  the model was trained with. A source temperature below `MIN_SOURCE_TEMPERATURE` (1e-6), 0 included, is refused:
  controller / T would overflow (to inf, then NaN) for T below about 1e-30, and such a model routes discretely
  anyway, so its controller's scale carries nothing a softmax router could use.
- **A uniform-MoT layer** has no controller (all its logits are equal). Its router starts like a controller of a new
  model (truncated normal, std = sqrt(`mot_init_scale` / d)), not at zero: a zero router gives every token the same
  top k experts (ties go to the lowest indices), so the other experts would never receive a gradient.
- **Output scale: `w_out` and `b_out` times E / G, whatever k, gates renormalized (`norm_topk_prob=True`).** In
  MoT each expert hands out a total weight of 1 over the G tokens of its group, so a token receives, summed over the
  E experts, a weight of E / G on average. A Token Choice token's renormalized gates sum to 1 for any k, so
  multiplying the experts' output projections by E / G hands each token the same total weight as before the switch.
  (E / G equals the default k only for a FLOP-matched model.) Renormalized gates are also used for k = 1 (the gate is
  then 1, instead of Switch's raw router probability, which would shrink every update by that probability).
- **The load-balancing loss where the router needs it** (`output_router_logits=True`). At k = 1 the renormalized
  gate is the constant 1 and the top-1 choice has no gradient, so only Switch's load-balancing loss trains the
  router; a uniform-MoT source's router starts untrained. In both cases the converted config turns the loss on (the
  `Trainer`'s training and evaluation losses then include `router_aux_loss_coef` times it). For k > 1 from a `mot`
  source the gates carry the language-modelling gradient to the router, and the source's setting is kept.
"""

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .configuration_mot import MoTGPTConfig
from .modeling_mot import MoTGPTForCausalLM, MoTLayer

if TYPE_CHECKING:
    from transformers import Trainer

    from .training import MoTTrainingArguments, ScriptArguments

CONVERTIBLE_FFN_TYPES = ("mot", "uniform_mot")
# The smallest source temperature converted (see the module docstring): far above where controller / T overflows.
MIN_SOURCE_TEMPERATURE = 1e-6
# Fine-tuning defaults of `mot-transition-tune`, placed before the user's arguments (which win).
TRANSITION_DEFAULTS = [
    "--learning_rate", "3e-4", "--warmup_steps", "0.1", "--max_steps", "100", "--output_dir", "runs/transition-tuned",
]  # fmt: skip


@dataclass
class TransitionArguments:
    """What `mot-transition-tune` adds to the training' arguments."""

    num_experts_per_tok: int | None = field(
        default=None, metadata={"help": "experts per token k; default: the FLOP-matched d_ff / expert_size"}
    )
    capacity_factor: float | None = field(
        default=None, metadata={"help": "per-expert capacity factor; default: no limit (batch-independent)"}
    )


def flop_matched_experts_per_token(config: MoTGPTConfig) -> int:
    """`d_ff / expert_size`: the experts per token at which a Token Choice layer with the MoT layer's experts spends
    the dense MLP's FLOPs per token (`n_experts / group_size` when the MoT layer is FLOP-matched).

    Raises `ValueError` when that quotient is not a whole number >= 1.
    """
    d_ff, expert_size = config.d_ff, config.expert_size_resolved
    if d_ff % expert_size or d_ff // expert_size < 1:
        raise ValueError(
            f"`num_experts_per_tok=None` asks for the FLOP-matched d_ff / expert_size = {d_ff} / {expert_size}, "
            f"which is not a whole number >= 1; pass `num_experts_per_tok` explicitly (an integer in "
            f"[1, n_experts={config.n_experts}])."
        )
    return d_ff // expert_size


def output_scale(config: MoTGPTConfig) -> float:
    """`n_experts / group_size`: the total mixing weight a MoT token receives on average, by which the converted
    experts' `w_out` and `b_out` are multiplied (renormalized Token Choice gates sum to 1, for any k)."""
    return config.n_experts / config.group_size


def token_choice_config(
    config: MoTGPTConfig, num_experts_per_tok: int | None = None, capacity_factor: float | None = None
) -> MoTGPTConfig:
    """The config of the Token Choice model converted from a MoT model of config `config` (validated on creation)."""
    if config.ffn_type not in CONVERTIBLE_FFN_TYPES:
        raise ValueError(
            f"`model.config.ffn_type` must be one of {CONVERTIBLE_FFN_TYPES} to convert to Token Choice, "
            f"got {config.ffn_type!r}."
        )
    if not config.mot_layer_indices:
        raise ValueError(
            f"the model has no MoT layer to convert (`mot_layers`={config.mot_layers!r}); it is a dense model."
        )
    if num_experts_per_tok is None:
        num_experts_per_tok = flop_matched_experts_per_token(config)
    # At k = 1 (constant gate) and from an untrained uniform-MoT router, only the balancing loss trains the router.
    balance = num_experts_per_tok == 1 or config.ffn_type == "uniform_mot"
    fields = config.to_dict() | {
        "ffn_type": "token_choice",
        "num_experts_per_tok": num_experts_per_tok,
        "capacity_factor": capacity_factor,
        "norm_topk_prob": True,
        "expert_size": config.expert_size_resolved,
        "learnable_temperature": "none",  # the temperature is folded into the router
        "output_router_logits": config.output_router_logits or balance,
        "router_aux_loss_coef": None,  # Token Choice's default weight; MoT configs hold 0
    }
    return type(config)(**fields)


@torch.no_grad()
def mot_to_token_choice(
    model: MoTGPTForCausalLM, num_experts_per_tok: int | None = None, capacity_factor: float | None = None
) -> MoTGPTForCausalLM:
    """Convert a MoT model into a Token Choice model whose output for a row does not depend on the other rows.

    Every MoT layer `(controller (d, E), w_in (E, d, f), w_out (E, f, d), b_in (E, f), b_out (E, d))` becomes a
    Token Choice layer with router `controller / T` (a fresh truncated-normal router for a uniform-MoT layer), the
    same `w_in` and `b_in`, and `w_out`, `b_out` multiplied by E / G (`n_experts / group_size`); every other weight
    is copied unchanged. See the module docstring for why.

    Args:
        model: a [`MoTGPTForCausalLM`] with `ffn_type` `"mot"` or `"uniform_mot"` and at least one MoT layer, whose
            temperatures (fixed or learned) are all >= `MIN_SOURCE_TEMPERATURE` (1e-6).
        num_experts_per_tok: experts per token k, in `[1, n_experts]`. `None` (default) takes the FLOP-matched
            `d_ff / expert_size` and raises `ValueError` when it is not a whole number.
        capacity_factor: per-expert capacity (see [`MoTGPTConfig`]). `None` (default): no limit, which keeps the
            model batch-independent and cache-consistent.

    Returns:
        A new [`MoTGPTForCausalLM`] with `ffn_type="token_choice"` (and `output_router_logits=True` when k = 1 or the
        source is uniform MoT), on the model's device and dtype and in its training mode; `model` is left unchanged.
    """
    if not isinstance(model, MoTGPTForCausalLM):
        raise ValueError(f"`model` must be a MoTGPTForCausalLM, got {type(model).__name__}.")
    config = token_choice_config(model.config, num_experts_per_tok, capacity_factor)
    routers = {index: router_weights(model.transformer.h[index].mlp, index) for index in config.mot_layer_indices}
    # Built (and so initialized) before the weights are copied in: its fresh router serves a uniform-MoT layer.
    converted = type(model)(config).to(device=model.device, dtype=model.dtype)
    scale = output_scale(model.config)
    state = model.state_dict()
    for index, router in routers.items():
        layer: MoTLayer = model.transformer.h[index].mlp
        prefix = f"transformer.h.{index}.mlp."
        state[prefix + "controller"] = converted.transformer.h[index].mlp.controller if router is None else router
        state[prefix + "w_out"] = layer.w_out * scale
        if layer.b_out is not None:
            state[prefix + "b_out"] = layer.b_out * scale
        state.pop(prefix + "log_temperature", None)
    converted.load_state_dict(state)
    converted.generation_config = copy.deepcopy(model.generation_config)
    return converted.train(model.training)


def router_weights(layer: MoTLayer, index: int) -> torch.Tensor | None:
    """`(n_embd, n_experts)` router of the Token Choice layer replacing `layer` (block `index`): its controller
    divided by its temperature (the fixed one or the learned one, per layer or per expert). `None` for a uniform-MoT
    layer, which has no controller: the converted model's own init then gives the router."""
    if layer.controller is None:
        return None
    return layer.controller / source_temperature(layer, index)


def source_temperature(layer: MoTLayer, index: int) -> float | torch.Tensor:
    """The temperature `layer` (block `index`) was trained at: its learned `exp(log_temperature)` (one per layer or
    per expert) or its fixed temperature. Raises `ValueError` when it is 0 or any value is below
    `MIN_SOURCE_TEMPERATURE`."""
    if layer.log_temperature is None and layer.temperature == 0:
        raise ValueError(
            f"the MoT layers' `router_temperature` is 0 (discrete routing), so there is no router scale to carry "
            f"over (the router is controller / temperature, which needs a temperature >= {MIN_SOURCE_TEMPERATURE:g})."
            " Set `model.config.router_temperature` to the temperature the model was trained at, and load it again."
        )
    if layer.log_temperature is None:
        temperature, smallest, name = layer.temperature, layer.temperature, "`router_temperature`"
    else:
        temperature = layer.log_temperature.exp()
        smallest, name = float(temperature.min()), "learned temperature exp(`log_temperature`)"
    if not smallest >= MIN_SOURCE_TEMPERATURE:  # `not >=` also catches NaN
        raise ValueError(
            f"the {name} of the MoT layer in block {index} must be >= {MIN_SOURCE_TEMPERATURE:g} to convert, got "
            f"{smallest:.3g}: the router controller / temperature would overflow to inf (and NaN) for temperatures "
            f"below about 1e-30, and below {MIN_SOURCE_TEMPERATURE:g} the model routes discretely anyway. Give the "
            "model the temperature it should be served at (the config's `router_temperature`, or the learned "
            "`log_temperature`) before converting."
        )
    return temperature


def run_transition_tuning(
    script: "ScriptArguments", args: "MoTTrainingArguments", transition: TransitionArguments
) -> "Trainer":
    """Convert the MoT checkpoint `script.model_name_or_path` to Token Choice, save it with its tokenizer in
    `args.output_dir/converted`, and fine-tune that through [`~mixture_of_tokens.training.run_training`] into
    `args.output_dir`. With `script.resume`, the saved conversion is reused (after checking that the given
    `num_experts_per_tok` and `capacity_factor` agree with it) and training continues from the last checkpoint.

    In a distributed run only the process that saves (`args.should_save`) converts, inside
    `args.main_process_first`; the others wait there and then load what it saved. Returns the `Trainer`."""
    from .training import run_training  # imported here: the conversion itself needs only the model code

    if script.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: the MoT checkpoint (folder or Hub name) to convert.")
    converted_dir = Path(args.output_dir) / "converted"
    # Local "first" only where every node saves its own copy; with one shared copy, the global main process writes.
    with args.main_process_first(local=args.save_on_each_node, desc="conversion to Token Choice"):
        if script.resume and (converted_dir / "config.json").exists():
            check_saved_conversion(converted_dir, transition)
        elif args.should_save:
            convert_and_save(script.model_name_or_path, converted_dir, transition, args.seed)
    return run_training(replace(script, model_name_or_path=str(converted_dir)), args)


def convert_and_save(source: str, converted_dir: Path, transition: TransitionArguments, seed: int) -> None:
    """Load the MoT checkpoint `source`, convert it, and save it with its tokenizer in `converted_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    model = AutoModelForCausalLM.from_pretrained(source)
    set_seed(seed)  # a uniform-MoT source's fresh router is then the same in every run with this seed
    converted = mot_to_token_choice(model, transition.num_experts_per_tok, transition.capacity_factor)
    converted.save_pretrained(converted_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(converted_dir)


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
projections times n_experts / group_size; see `mixture_of_tokens.transition`). The converted model is saved, with the
tokenizer, in OUTPUT_DIR/converted, then fine-tuned like `mot-finetune` into OUTPUT_DIR: `--corpus`, `--validation`,
`--resume` and every argument of `mot-train` work the same (all listed here), with other defaults:
`--learning_rate 3e-4 --warmup_steps 0.1 --max_steps 100 --output_dir runs/transition-tuned`.
`--num_experts_per_tok` (default: FLOP-matched d_ff / expert_size) and `--capacity_factor` (default: no limit, which
keeps the model batch-independent) set the Token Choice layers. The result loads with `AutoModelForCausalLM`, with or
without this package installed (`trust_remote_code=True` then).
"""


def print_help() -> None:
    """Every argument `mot-transition-tune` takes, the training ones included, with the transition-tuning defaults."""
    import argparse

    from transformers import HfArgumentParser

    from .training import MoTTrainingArguments, ScriptArguments

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
    import sys

    from transformers import HfArgumentParser

    from .training import parse_args

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
    "MIN_SOURCE_TEMPERATURE",
    "TransitionArguments",
    "flop_matched_experts_per_token",
    "mot_to_token_choice",
    "output_scale",
    "run_transition_tuning",
    "token_choice_config",
]
