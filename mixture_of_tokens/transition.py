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
  the model was trained with. A `uniform_mot` layer has no controller: its router starts at zero (all logits equal,
  as in that layer), so every token starts on the same k experts and the router is learned from scratch.
- **Output scale: `w_out` and `b_out` times k, gates renormalized (`norm_topk_prob=True`).** In MoT each expert
  hands out a total weight of 1 over the G tokens of its group, so a token receives, summed over the E experts, a
  weight of E / G = k on average. A Token Choice token's renormalized gates sum to 1, so multiplying the experts'
  output projections by k hands each token the same total weight as before the switch. Renormalized gates are also
  used for k = 1 (the gate is then 1, instead of Switch's raw router probability, which would shrink every update
  by that probability); the router then learns only through the load-balancing loss
  (`output_router_logits=True`), as the top-1 choice itself has no gradient.
"""

import copy
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
# Fine-tuning defaults of `scripts/transition_tune.py`, placed before the user's arguments (which win).
TRANSITION_DEFAULTS = [
    "--learning_rate", "3e-4", "--warmup_steps", "0.1", "--max_steps", "100", "--output_dir", "runs/transition-tuned",
]  # fmt: skip


@dataclass
class TransitionArguments:
    """What `scripts/transition_tune.py` adds to the training scripts' arguments."""

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
    fields = config.to_dict() | {
        "ffn_type": "token_choice",
        "num_experts_per_tok": num_experts_per_tok,
        "capacity_factor": capacity_factor,
        "norm_topk_prob": True,
        "expert_size": config.expert_size_resolved,
        "learnable_temperature": "none",  # the temperature is folded into the router
    }
    return type(config)(**fields)


@torch.no_grad()
def mot_to_token_choice(
    model: MoTGPTForCausalLM, num_experts_per_tok: int | None = None, capacity_factor: float | None = None
) -> MoTGPTForCausalLM:
    """Convert a MoT model into a Token Choice model whose output for a row does not depend on the other rows.

    Every MoT layer `(controller (d, E), w_in (E, d, f), w_out (E, f, d), b_in (E, f), b_out (E, d))` becomes a
    Token Choice layer with router `controller / T`, the same `w_in` and `b_in`, and `w_out`, `b_out` multiplied by
    k; every other weight is copied unchanged. See the module docstring for why.

    Args:
        model: a [`MoTGPTForCausalLM`] with `ffn_type` `"mot"` or `"uniform_mot"` and at least one MoT layer.
        num_experts_per_tok: experts per token k, in `[1, n_experts]`. `None` (default) takes the FLOP-matched
            `d_ff / expert_size` and raises `ValueError` when it is not a whole number.
        capacity_factor: per-expert capacity (see [`MoTGPTConfig`]). `None` (default): no limit, which keeps the
            model batch-independent and cache-consistent.

    Returns:
        A new [`MoTGPTForCausalLM`] with `ffn_type="token_choice"`, on the model's device and dtype and in its
        training mode; `model` is left unchanged.
    """
    if not isinstance(model, MoTGPTForCausalLM):
        raise ValueError(f"`model` must be a MoTGPTForCausalLM, got {type(model).__name__}.")
    config = token_choice_config(model.config, num_experts_per_tok, capacity_factor)
    routers = {index: router_weights(model.transformer.h[index].mlp) for index in config.mot_layer_indices}
    k = config.num_experts_per_tok
    state = model.state_dict()
    for index, router in routers.items():
        layer: MoTLayer = model.transformer.h[index].mlp
        prefix = f"transformer.h.{index}.mlp."
        state[prefix + "controller"] = router
        state[prefix + "w_out"] = layer.w_out * k
        if layer.b_out is not None:
            state[prefix + "b_out"] = layer.b_out * k
        state.pop(prefix + "log_temperature", None)
    converted = type(model)(config).to(device=model.device, dtype=model.dtype)
    converted.load_state_dict(state)
    converted.generation_config = copy.deepcopy(model.generation_config)
    return converted.train(model.training)


def router_weights(layer: MoTLayer) -> torch.Tensor:
    """`(n_embd, n_experts)` router of the Token Choice layer replacing `layer`: its controller divided by its
    temperature (the fixed one or the learned one, per layer or per expert); zeros for a uniform-MoT layer."""
    if layer.controller is None:
        return layer.w_in.new_zeros(layer.w_in.shape[1], layer.w_in.shape[0])
    temperature = layer._temperature(None)
    if isinstance(temperature, float) and temperature == 0:
        raise ValueError(
            "the MoT layers' `router_temperature` is 0 (discrete routing), so there is no router scale to carry "
            "over (the router is controller / temperature, which needs a temperature > 0). Set "
            "`model.config.router_temperature` to the temperature the model was trained at, and load it again."
        )
    return layer.controller / temperature


def run_transition_tuning(
    script: "ScriptArguments", args: "MoTTrainingArguments", transition: TransitionArguments
) -> "Trainer":
    """Convert the MoT checkpoint `script.model_name_or_path` to Token Choice, save it with its tokenizer in
    `args.output_dir/converted`, and fine-tune that through [`~mixture_of_tokens.training.run_training`] into
    `args.output_dir`. With `script.resume`, the saved conversion is reused and training continues from the last
    checkpoint. Returns the `Trainer`."""
    # Imported here: the conversion itself needs only the model code, training needs the `train` extras.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training import run_training

    if script.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: the MoT checkpoint (folder or Hub name) to convert.")
    converted_dir = Path(args.output_dir) / "converted"
    if not (script.resume and (converted_dir / "config.json").exists()):
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
        converted = mot_to_token_choice(model, transition.num_experts_per_tok, transition.capacity_factor)
        converted.save_pretrained(converted_dir)
        AutoTokenizer.from_pretrained(script.model_name_or_path).save_pretrained(converted_dir)
    return run_training(replace(script, model_name_or_path=str(converted_dir)), args)


__all__ = [
    "TransitionArguments",
    "flop_matched_experts_per_token",
    "mot_to_token_choice",
    "run_transition_tuning",
    "token_choice_config",
]
