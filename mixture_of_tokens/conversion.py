"""Conversion of a trained Mixture of Tokens model into a batch-independent Token Choice model: the model surgery of
transition tuning.

A MoT layer's output for one token depends on the other tokens of its group. The paper's remedy (Antoniak et al.,
section "Transition tuning") re-uses a trained MoT model's controller as a Token Choice router and its experts as
Token Choice experts, then trains briefly. [`mot_to_token_choice`] does the conversion;
[`~mixture_of_tokens.transition.run_transition_tuning`] (`mot-transition-tune`) converts a checkpoint, saves it, and
fine-tunes it through the project's ordinary fine-tuning path ([`~mixture_of_tokens.training.run_training`] with
`model_name_or_path`).

How a MoT layer maps onto a Token Choice layer (d = `n_embd`, E experts of width f, groups of G rows, T the router
temperature):

- **Experts per token.** A FLOP-matched MoT expert is `f = G * d_ff / E` wide; a Token Choice token that uses k
  experts of width f costs `k * f` multiply-adds per weight matrix, so `k = d_ff / f` (= E / G when FLOP-matched)
  keeps the FLOPs per token. The expert width f stays as it was and is written into the config as `expert_size`.
- **No capacity limit** by default (`capacity_factor=None`): with a limit, which tokens an expert drops depends on
  how many tokens the batch holds, so the model would again depend on the batch and cached decoding would differ
  from a full forward pass. Without one, no token is ever dropped, every row is computed on its own, and the experts
  compute only what is routed to them (transformers' grouped_mm experts: k expert rows per token however unbalanced
  the router).
- **Router = controller / T.** MoT's weights are a softmax of `x @ controller / T` (over the group), the controller
  being the MoT layer's `router.weight`; dividing it by T (fixed, or the learned `log_temperature`, per layer or per
  expert) keeps the logits at the scale the model was trained with. A source temperature below
  `MIN_SOURCE_TEMPERATURE` (1e-6), 0 included, is refused: controller / T would overflow (to inf, then NaN) for T
  below about 1e-30, and such a model routes discretely anyway, so its controller's scale carries nothing a softmax
  router could use.
- **A uniform-MoT layer** has no controller (all its logits are equal). Its router starts like a controller of a new
  model (truncated normal, std = sqrt(`mot_init_scale` / d)), not at zero: a zero router gives every token the same
  top k experts (ties go to the lowest indices), so the other experts would never receive a gradient.
- **Output scale: the experts' `down_proj` and `down_proj_bias` times E / G, whatever k, gates renormalized
  (`norm_topk_prob=True`).** In
  MoT each expert hands out a total weight of 1 over the G tokens of its group, so a token receives, summed over the
  E experts, a weight of E / G on average. A Token Choice token's renormalized gates sum to 1 for any k, so
  multiplying the experts' output projections by E / G hands each token the same total weight as before the switch.
  (E / G equals the default k only for a FLOP-matched model.) Renormalized gates are also used for k = 1 (the gate is
  then 1, instead of Switch's raw router probability, which would shrink every update by that probability).
- **A balanced start: the router bias.** MoT's softmax runs, for each expert, over the tokens of a group: it ranks
  the tokens for an expert, never the experts for a token, so nothing in MoT's training keeps the experts' logits on
  a common scale (an offset of one expert's logits shared by all tokens cancels in it entirely). A softmax over the
  experts does not ignore that scale: converted as is, a few experts take most first choices and others none. With
  `calibration_ids` (blocks of training text) the converted layers get a router bias (`router_bias=True`), set block
  by block from the router logits of those tokens so that every expert is the first choice of an equal share of them
  ([`balancing_bias`]). `mot-transition-tune` draws `--calibration_blocks` (64) blocks from its training corpus, or
  from `--calibration_corpus`: text like what the model will serve, since another domain is routed differently.
- **The load-balancing loss during tuning, for every k, and not after.** At k = 1 (a constant gate) or from a
  uniform-MoT source (an untrained router) it is the router's only teacher.
  [`~mixture_of_tokens.transition.run_transition_tuning`] trains with `output_router_logits=True`, so the
  `Trainer`'s training and evaluation losses include `router_aux_loss_coef` (0.01) times Switch's loss; the
  converted config and the tuned model's saved config keep `output_router_logits=False`: inference computes no
  auxiliary loss unless a call asks for it.
- **Calibrated again after tuning.** Tuning pulls the router off balance, and Switch's loss does not hold it: it
  evens out the experts' mean router probabilities, which say little about first choices while the router's softmax
  is flat. [`~mixture_of_tokens.transition.finish_tuned_model`] calibrates the saved model's router bias again on the
  same blocks (`--recalibrate false` keeps the bias tuning left), at some cost in loss (measured in
  `docs/transition-tuning.md`).
"""

import copy

import torch

from .configuration_mot import MoTGPTConfig
from .modeling_mot import MoTGPTForCausalLM, MoTLayer, TokenChoiceLayer

CONVERTIBLE_FFN_TYPES = ("mot", "uniform_mot")
# The smallest source temperature converted (see the module docstring): far above where controller / T overflows.
MIN_SOURCE_TEMPERATURE = 1e-6
# Softmax temperatures of `balancing_bias`, each a warm start for the next: the last is near a hard first choice.
BALANCING_TEMPERATURES = (1.0, 0.3, 0.1, 0.03)


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
    experts' `down_proj` and `down_proj_bias` are multiplied (renormalized Token Choice gates sum to 1, for any k)."""
    return config.n_experts / config.group_size


def token_choice_config(
    config: MoTGPTConfig,
    num_experts_per_tok: int | None = None,
    capacity_factor: float | None = None,
    router_bias: bool = False,
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
        "router_bias": router_bias,
        "output_router_logits": False,  # an inference config: training turns the balancing loss on
        "router_aux_loss_coef": None,  # Token Choice's default weight; MoT configs hold 0
    }
    return type(config)(**fields)


@torch.no_grad()
def mot_to_token_choice(
    model: MoTGPTForCausalLM,
    num_experts_per_tok: int | None = None,
    capacity_factor: float | None = None,
    calibration_ids: torch.LongTensor | None = None,
) -> MoTGPTForCausalLM:
    """Convert a MoT model into a Token Choice model whose output for a row does not depend on the other rows.

    Every MoT layer (router weight `(d, E)`; experts `up_proj (E, d, f)`, `down_proj (E, f, d)`, `up_proj_bias
    (E, f)`, `down_proj_bias (E, d)`) becomes a Token Choice layer with router weight `router.weight / T` (a fresh
    truncated-normal router for a uniform-MoT layer), the same `up_proj` and `up_proj_bias`, and `down_proj`,
    `down_proj_bias` multiplied by E / G (`n_experts / group_size`); every other weight is copied unchanged. See the
    module docstring for why.

    Args:
        model: a [`MoTGPTForCausalLM`] with `ffn_type` `"mot"` or `"uniform_mot"` and at least one MoT layer, whose
            temperatures (fixed or learned) are all >= `MIN_SOURCE_TEMPERATURE` (1e-6).
        num_experts_per_tok: experts per token k, in `[1, n_experts]`. `None` (default) takes the FLOP-matched
            `d_ff / expert_size` and raises `ValueError` when it is not a whole number.
        capacity_factor: per-expert capacity (see [`MoTGPTConfig`]). `None` (default): no limit, which keeps the
            model batch-independent and cache-consistent.
        calibration_ids: `(n_blocks, block_len)` token ids of training text. When given, the Token Choice layers get
            a router bias that balances their experts on these tokens ([`calibrate_router_bias`]); `None`
            (default): no router bias.

    Returns:
        A new [`MoTGPTForCausalLM`] with `ffn_type="token_choice"` and `output_router_logits=False`, on the model's
        device and dtype and in its training mode; `model` is left unchanged.
    """
    if not isinstance(model, MoTGPTForCausalLM):
        raise ValueError(f"`model` must be a MoTGPTForCausalLM, got {type(model).__name__}.")
    if calibration_ids is not None and (calibration_ids.ndim != 2 or calibration_ids.numel() == 0):
        raise ValueError(
            f"`calibration_ids` must be a non-empty (n_blocks, block_len) tensor of token ids, got shape "
            f"{tuple(calibration_ids.shape)}."
        )
    config = token_choice_config(model.config, num_experts_per_tok, capacity_factor, calibration_ids is not None)
    routers = {index: router_weights(model.transformer.h[index].mlp, index) for index in config.mot_layer_indices}
    # Built (and so initialized) before the weights are copied in: its fresh router serves a uniform-MoT layer, and
    # its zero router bias is where calibration starts.
    converted = type(model)(config).to(device=model.device, dtype=model.dtype)
    scale = output_scale(model.config)
    state = model.state_dict()
    for index, router in routers.items():
        layer: MoTLayer = model.transformer.h[index].mlp
        new_layer: TokenChoiceLayer = converted.transformer.h[index].mlp
        prefix = f"transformer.h.{index}.mlp."
        state[prefix + "router.weight"] = new_layer.router.weight if router is None else router
        state[prefix + "experts.down_proj"] = layer.experts.down_proj * scale
        if layer.experts.down_proj_bias is not None:
            state[prefix + "experts.down_proj_bias"] = layer.experts.down_proj_bias * scale
        if new_layer.router.bias is not None:
            state[prefix + "router.bias"] = new_layer.router.bias
        state.pop(prefix + "log_temperature", None)
    converted.load_state_dict(state)
    converted.generation_config = copy.deepcopy(model.generation_config)
    if calibration_ids is not None:
        calibrate_router_bias(converted, calibration_ids)
    return converted.train(model.training)


@torch.no_grad()
def calibrate_router_bias(model: MoTGPTForCausalLM, calibration_ids: torch.LongTensor, batch_size: int = 32) -> None:
    """Correct the router bias of every Token Choice layer of `model` (`router_bias=True`), first block to last, by
    [`balancing_bias`] of its router logits (its current bias included) on `calibration_ids` `(n_blocks,
    block_len)`. Each block is calibrated on the inputs it receives once the blocks before it are, since their
    routing changes those inputs."""
    training = model.training
    model.eval()  # no dropout
    for position, index in enumerate(model.config.mot_layer_indices):
        layer: TokenChoiceLayer = model.transformer.h[index].mlp
        logits = [
            model(ids.to(model.device), output_router_logits=True).router_logits[position]
            for ids in calibration_ids.split(batch_size)
        ]
        layer.router.bias += balancing_bias(torch.cat(logits))
    model.train(training)


def balancing_bias(
    router_logits: torch.Tensor, temperatures: tuple[float, ...] = BALANCING_TEMPERATURES, iterations: int = 100
) -> torch.Tensor:
    """The per-expert bias `(n_experts,)` that balances the experts on tokens of router logits `(n_tokens, n_experts)`.

    It is the dual variable of an entropy-regularized assignment of tokens to experts with equal loads, found by
    Sinkhorn's iterations: with the softmax over the experts of `(router_logits + bias) / t`, each expert's mean
    probability is made `1 / n_experts` (`bias -= t * log(n_experts * mean probability)`, `iterations` times), for
    each `t` of `temperatures` in turn. As `t` decreases the softmax approaches each token's first choice, so at the
    last, small `t` every expert is the first choice of about `n_tokens / n_experts` tokens. Computed in float64.
    """
    logits = router_logits.double()
    n_experts = logits.shape[-1]
    bias = logits.new_zeros(n_experts)
    for temperature in temperatures:
        for _ in range(iterations):
            load = torch.softmax((logits + bias) / temperature, dim=-1).mean(dim=0)
            # An expert far below every token's best at a small t can underflow to a load of 0: a finite step still.
            bias -= temperature * torch.log(n_experts * load.clamp_min(torch.finfo(load.dtype).tiny))
    return bias.to(router_logits.dtype)


def router_weights(layer: MoTLayer, index: int) -> torch.Tensor | None:
    """`(n_embd, n_experts)` router weight of the Token Choice layer replacing `layer` (block `index`): its router
    weight (the controller) divided by its temperature (the fixed one or the learned one, per layer or per expert).
    `None` for a uniform-MoT layer, which has no router: the converted model's own init then gives one."""
    if layer.router is None:
        return None
    return layer.router.weight / source_temperature(layer, index)


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


__all__ = [
    "MIN_SOURCE_TEMPERATURE",
    "balancing_bias",
    "calibrate_router_bias",
    "flop_matched_experts_per_token",
    "mot_to_token_choice",
    "output_scale",
    "token_choice_config",
]
