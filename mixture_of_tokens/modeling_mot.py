"""PyTorch MoTGPT: GPT-2 whose feed-forward layers are Mixture of Tokens (MoT) layers.

Mixture of Tokens (Antoniak et al., 2023) is a continuous Mixture of Experts. Batch rows are cut into consecutive
groups of `group_size` rows; at each position the tokens of a group are mixed, one softmax-weighted mixture per
expert, each expert processes its mixture, and its output goes back to the tokens with the same weights. Mixing only
ever happens across rows at the same position, so the model stays causal.
"""

import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import batched_mm_experts_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.pytorch_utils import Conv1D
from transformers.utils import cached_file, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mot import MoTGPTConfig, is_number

logger = logging.get_logger(__name__)

TINY_TEMPERATURE = torch.finfo(torch.float32).tiny


def check_router_temperature(router_temperature: float | None) -> None:
    """Refuse a per-call temperature that is not a number >= 0 (`None` means "use the model's own")."""
    if router_temperature is not None and not (is_number(router_temperature) and router_temperature >= 0):
        raise ValueError(
            f"`router_temperature` must be None (use the config's) or a number >= 0 (0 = discrete routing), "
            f"got {router_temperature!r}."
        )


def mixing_weights(
    router_logits: torch.Tensor, token_mask: torch.Tensor | None, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Per-expert softmax of the controller logits over the tokens of each group.

    Args:
        router_logits: `(n_groups, group_size, seq_len, n_experts)` controller logits.
        token_mask: `(n_groups, group_size, seq_len, 1)` bool, False for padding and for empty group slots;
            `None` when every token is real.
        temperature: a float >= 0, or a tensor of shape `(1,)` or `(n_experts,)` > 0.

    Returns:
        `(n_groups, group_size, seq_len, n_experts)` weights in `router_logits.dtype`. For each expert they sum to 1
        over the real tokens of a group; masked tokens get 0, and a group with no real token gets 0 everywhere.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        # Discrete routing: each expert takes the single best real token of its group (first one on ties).
        if token_mask is not None:
            router_logits = router_logits.masked_fill(~token_mask, float("-inf"))
        winners = router_logits.argmax(dim=1, keepdim=True)
        weights = torch.zeros_like(router_logits).scatter_(1, winners, 1.0)
        return weights if token_mask is None else weights * token_mask
    # Softmax in at least float32, so bf16/fp16 logits keep their precision.
    dtype = torch.promote_types(router_logits.dtype, torch.float32)
    logits = router_logits.to(dtype)
    # Shifting by the group's largest real logit before dividing keeps every scaled logit <= 0, so a tiny T cannot
    # overflow to +inf: the weights then approach the one-hot routing of T = 0 instead of turning into NaN.
    if token_mask is None:
        return torch.softmax((logits - logits.amax(dim=1, keepdim=True).detach()) / temperature, dim=1).to(
            router_logits.dtype
        )
    real_max = logits.masked_fill(~token_mask, float("-inf")).amax(dim=1, keepdim=True)
    shift = torch.where(token_mask.any(dim=1, keepdim=True), real_max, 0.0).detach()
    # Masked tokens get the lowest finite logit rather than -inf, so a group with no real token stays finite.
    scaled = ((logits - shift) / temperature).masked_fill(~token_mask, torch.finfo(dtype).min)
    weights = torch.softmax(scaled, dim=1)
    # A group whose tokens are all masked has uniform weights here; the mask zeroes them.
    return (weights * token_mask).to(router_logits.dtype)


def expert_softmax_weights(
    router_logits: torch.Tensor, token_mask: torch.Tensor | None, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Each token's softmax of its controller logits over the experts: the emit weights of the authors'
    output-normalization variant (`mot_emit_weights="experts"`), in place of the mixing weights.

    Shapes as in [`mixing_weights`]; a token's weights sum to 1 over the experts (0 for masked tokens), and T = 0
    gives each token only its best expert.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        weights = torch.zeros_like(router_logits).scatter_(-1, router_logits.argmax(dim=-1, keepdim=True), 1.0)
    else:
        dtype = torch.promote_types(router_logits.dtype, torch.float32)
        weights = torch.softmax(router_logits.to(dtype) / temperature, dim=-1).to(router_logits.dtype)
    return weights if token_mask is None else weights * token_mask


def check_token_mask(token_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The `(batch_size, seq_len)` bool mask of real tokens (None stays None: all real), after checking its shape."""
    if token_mask is None:
        return None
    if token_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"`token_mask` of an expert layer must have shape (batch_size, seq_len) = "
            f"{tuple(hidden_states.shape[:2])}, got {tuple(token_mask.shape)}."
        )
    return token_mask.bool()


def current_token_mask(
    token_mask: torch.Tensor | None, attention_mask: torch.Tensor | None, seq_len: int
) -> torch.Tensor | None:
    """Which of the `seq_len` current tokens are real: `token_mask` if given, else the last columns of a 2-D
    `attention_mask`; None (all real) without either, or with only a 4-D mask."""
    if token_mask is None and attention_mask is not None and attention_mask.ndim == 2:
        return attention_mask[:, -seq_len:]
    return token_mask


def _is_packed(position_ids: torch.Tensor | None, token_mask: torch.Tensor | None) -> bool:
    """Whether some row holds several sequences: its position ids fail to increase between two real tokens
    (`token_mask`, None: all real; left padding, whose positions `generate` fills with a constant, is not a
    restart). It reads the data, so traced code (`torch.compile(fullgraph=True)`, `torch.export`) cannot run it: see
    `MoTGPTModel._check_grouped_batch`."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    restart = position_ids[..., 1:] <= position_ids[..., :-1]
    if token_mask is not None:
        real = token_mask.bool()
        restart = restart & real[:, 1:] & real[:, :-1]
    return bool(restart.any())


class Router(nn.Module):
    """The controller of an expert layer: one logit per expert for each token, `x @ weight (+ bias)`.

    `weight` is `(n_embd, n_experts)`, stored input-first like the experts' transposed weights; `bias` `(n_experts,)`
    exists only for Token Choice with `config.router_bias`. The logits come out flattened to `(n_tokens, n_experts)`,
    as Mixtral's router logits, which the model returns (`output_router_logits`) and MoE tools read."""

    def __init__(self, config: MoTGPTConfig, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_embd, config.n_experts))
        self.bias = nn.Parameter(torch.zeros(config.n_experts)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = hidden_states.reshape(-1, hidden_states.shape[-1]) @ self.weight
        return logits if self.bias is None else logits + self.bias


class BatchedExperts(nn.Module):
    """`n_experts` MLPs of width f stored as 3-D weights, input-first (transformers' "transposed" layout):
    `up_proj` `(n_experts, n_embd, f)`, `down_proj` `(n_experts, f, n_embd)` and, with `config.expert_bias`,
    `up_proj_bias` `(n_experts, f)` and `down_proj_bias` `(n_experts, n_embd)`. Called on one row block per expert
    (MoT's mixtures, Expert Choice's picks), all experts in one batched matmul."""

    def __init__(self, config: MoTGPTConfig):
        super().__init__()
        d, self.num_experts, f = config.n_embd, config.n_experts, config.expert_size_resolved
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, d, f))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, f, d))
        if config.expert_bias:
            self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, f))
            self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, d))
        else:
            self.up_proj_bias = self.down_proj_bias = None
        self.act_fn = ACT2FN[config.expert_activation]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each expert's MLP on its own tokens: `(n_experts, n_tokens, n_embd)` -> the same shape."""
        hidden = torch.bmm(tokens, self.up_proj)
        if self.up_proj_bias is not None:
            hidden = hidden + self.up_proj_bias[:, None, :]
        out = torch.bmm(self.activation(hidden), self.down_proj)
        return out if self.down_proj_bias is None else out + self.down_proj_bias[:, None, :]

    def activation(self, hidden: torch.Tensor) -> torch.Tensor:
        """The experts' activation on the output of their first matmul."""
        # In place for ReLU (saves a buffer): its backward needs only its output, and the matmul's not `hidden`.
        return torch.relu_(hidden) if type(self.act_fn) is nn.ReLU else self.act_fn(hidden)


@use_experts_implementation(is_transposed=True, has_gate=False)
class TokenChoiceExperts(BatchedExperts):
    """Token Choice's experts, behind transformers' experts interface: `config._experts_implementation` picks the
    forward ("grouped_mm" by default: the routed rows sorted by expert, one grouped matmul; "batched_mm"; or "eager",
    [`eager_experts_forward`]). The weights are [`BatchedExperts`]'; each token's k rows are computed by their
    experts only."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states` `(n_tokens, n_embd)`, each token's experts and gates `(n_tokens, k)` -> the gate-weighted
        sum of its experts' outputs, `(n_tokens, n_embd)`."""
        return eager_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def eager_experts_forward(
    experts: BatchedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """[`TokenChoiceExperts.forward`] as a loop over the experts that have tokens, each on its own rows."""
    update = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        hidden = hidden_states[token] @ experts.up_proj[expert]
        if experts.up_proj_bias is not None:
            hidden = hidden + experts.up_proj_bias[expert]
        out = experts.activation(hidden) @ experts.down_proj[expert]
        if experts.down_proj_bias is not None:
            out = out + experts.down_proj_bias[expert]
        update.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(update.dtype))
    return update


def grouped_mm_kernel_fits(experts: BatchedExperts) -> bool:
    """Whether torch's grouped matmul kernel takes these experts' weights: float32, bfloat16 or float16, and rows
    that span multiples of 16 bytes (transformers' `grouped_mm` experts forward calls it without checking either)."""
    weight = experts.up_proj
    dtype_ok = weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return dtype_ok and all(size * weight.element_size() % 16 == 0 for size in weight.shape[1:])


def to_groups(
    tensor: torch.Tensor, token_mask: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut `(batch_size, seq_len, c)` into groups of `group_size` consecutive rows: `(n_groups, group_size, seq_len,
    c)`, and the mask `(n_groups, group_size, seq_len, 1)`. The empty slots of a smaller last group are padding,
    masked; the mask stays None when every token is real and every group full."""
    batch_size, seq_len, channels = tensor.shape
    pad = -batch_size % group_size
    if pad:
        if token_mask is None:
            token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=tensor.device)
        tensor = nn.functional.pad(tensor, (0, 0, 0, 0, 0, pad))
        token_mask = nn.functional.pad(token_mask, (0, 0, 0, pad), value=False)
    grouped = tensor.view(-1, group_size, seq_len, channels)
    return grouped, None if token_mask is None else token_mask.view(-1, group_size, seq_len, 1)


class MoTLayer(nn.Module):
    """Mixture of Tokens feed-forward layer, a drop-in replacement for the GPT-2 MLP.

    Roles: `router` ([`Router`], the controller; None with `ffn_type="uniform_mot"`, whose logits are all equal, so
    that each expert receives the plain average of its group's tokens: the paper's ablation) and `experts`
    ([`BatchedExperts`], one mixture per expert per group and position). With a learnable temperature, also
    `log_temperature` `(1,)` (per layer) or `(n_experts,)` (per expert).
    """

    def __init__(self, config: MoTGPTConfig):
        super().__init__()
        self.group_size = config.group_size
        self.router = Router(config) if config.ffn_type != "uniform_mot" else None
        self.experts = BatchedExperts(config)
        self.emit_weights = config.mot_emit_weights
        self.temperature = float(config.router_temperature)
        if config.learnable_temperature != "none":
            n_temperatures = 1 if config.learnable_temperature == "layer" else config.n_experts
            self.log_temperature = nn.Parameter(torch.full((n_temperatures,), math.log(self.temperature)))
        else:
            self.log_temperature = None
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        router_temperature: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch_size, seq_len, n_embd)`.
            token_mask: `(batch_size, seq_len)`, 1 for real tokens and 0 for padding; `None` means all real.
            router_temperature: overrides the layer's temperature (fixed or learned) for this call; 0 = discrete.

        Returns:
            The update to add to the residual stream, `(batch_size, seq_len, n_embd)`.
        """
        check_router_temperature(router_temperature)
        batch_size, seq_len, d = hidden_states.shape
        n_experts = self.experts.num_experts
        token_mask = check_token_mask(token_mask, hidden_states)  # None: the cheap path, e.g. packed training
        x = hidden_states
        if token_mask is not None:
            # Zero weight times a non-finite padding state would still be NaN: clear masked tokens first.
            x = x.masked_fill(~token_mask[..., None], 0.0)
        if self.router is None:
            router_logits = x.new_zeros(batch_size, seq_len, n_experts)
        else:
            router_logits = self.router(x).view(batch_size, seq_len, n_experts)
        x, grouped_mask = to_groups(x, token_mask, self.group_size)
        router_logits, _ = to_groups(router_logits, None, self.group_size)
        n_groups, group_size = x.shape[:2]
        temperature = self._temperature(router_temperature)

        # Mixing and redistribution are bmm's batched over (group, position). The weights and tokens are copied once
        # into that layout; every other operand is a strided view that bmm reads without a copy.
        def per_position(t: torch.Tensor) -> torch.Tensor:  # (n_groups, G, seq_len, c) -> (n_groups * seq_len, G, c)
            return t.transpose(1, 2).reshape(n_groups * seq_len, group_size, -1)

        weights = per_position(mixing_weights(router_logits, grouped_mask, temperature))
        if self.emit_weights == "group":
            emit = weights
        else:
            emit = per_position(expert_softmax_weights(router_logits, grouped_mask, temperature))
        x = per_position(x)
        mixed = torch.bmm(weights.transpose(1, 2), x).transpose(0, 1)  # (n_experts, n_groups * seq_len, d)
        update = torch.bmm(emit, self.experts(mixed).transpose(0, 1))  # (n_groups * seq_len, group_size, d)
        update = update.view(n_groups, seq_len, group_size, d).transpose(1, 2).reshape(-1, seq_len, d)
        return self.dropout(update[:batch_size])

    def _temperature(self, router_temperature: float | None) -> float | torch.Tensor:
        # A positive T below float32's smallest normal number would round to 0 and give 0 / 0 = NaN for each group's
        # best token: clamp it there, where the weights are one-hot already.
        if self.log_temperature is not None and router_temperature is None:
            return self.log_temperature.exp().clamp_min(TINY_TEMPERATURE)
        temperature = float(self.temperature if router_temperature is None else router_temperature)
        return 0.0 if temperature == 0 else max(temperature, TINY_TEMPERATURE)


class TokenChoiceLayer(nn.Module):
    """Token Choice MoE (Switch / Mixtral style): each token goes to its `num_experts_per_tok` (k) most probable
    experts, by a softmax over the experts of its `router` logits (with `config.router_bias`, the router adds a
    per-expert bias), with gates renormalized over them as `config.norm_topk_prob` says (by default when k is above
    1). The `experts` ([`TokenChoiceExperts`]) compute each token's k rows.

    - Without a capacity limit (`capacity_factor=None`) nothing is dropped. A row's output depends on nothing but
      itself, so cached decoding matches a full forward pass and the batch does not matter.
    - With a limit, an expert keeps at most `ceil(capacity_factor * n_real_tokens * k / n_experts)` assignments of
      the batch: earlier positions first and, within a position, first choices before second ones; the rest are
      dropped (gate 0, so no update). That keeps the layer causal, but what is dropped depends on the batch's token
      count. The experts still compute every assignment; only the kept ones count.

    Padding tokens (`token_mask` 0) get gate 0 and no update. The load-balancing loss is computed by the model from
    the router logits."""

    def __init__(self, config: MoTGPTConfig):
        super().__init__()
        self.num_experts_per_tok = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        norm = config.norm_topk_prob
        self.norm_topk_prob = config.num_experts_per_tok > 1 if norm is None else norm
        self.router = Router(config, bias=config.router_bias)
        self.experts = TokenChoiceExperts(config)
        # `use_experts_implementation` fixes `has_bias` per class; here it is a config field.
        self.experts.has_bias = config.expert_bias
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`hidden_states` `(batch_size, seq_len, n_embd)`, 0/1 `token_mask` `(batch_size, seq_len)` (None: all real)
        -> the update `(batch_size, seq_len, n_embd)`."""
        batch_size, seq_len, d = hidden_states.shape
        mask = check_token_mask(token_mask, hidden_states)
        x = hidden_states.reshape(-1, d)  # (n_tokens, d), row by row
        gates, chosen = self.top_k(self.router(x))
        if mask is not None:
            real = mask.flatten()[:, None]
            x = x.masked_fill(~real, 0.0)  # a zero gate times a non-finite padding state would still be NaN
            gates = gates.masked_fill(~real, 0.0)
        if self.capacity_factor is not None:
            gates = gates.masked_fill(~self.within_capacity(chosen, mask, batch_size), 0.0)
        gates = gates.to(x.dtype)
        if self.experts.config._experts_implementation == "grouped_mm" and not grouped_mm_kernel_fits(self.experts):
            # float64 or odd widths, which torch's grouped matmul kernel refuses: the loop over the experts that have
            # tokens; in traced code, which cannot read which those are, transformers' batched_mm forward (each
            # token's rows against its experts' gathered weights).
            if torch.compiler.is_compiling():
                update = batched_mm_experts_forward(self.experts, x, chosen, gates)
            else:
                update = eager_experts_forward(self.experts, x, chosen, gates)
        else:
            update = self.experts(x, chosen, gates)
        return self.dropout(update.view_as(hidden_states))

    def top_k(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's gates (in float32 or wider) and experts, both `(n_tokens, num_experts_per_tok)`, best first."""
        probs = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
        gates, chosen = probs.topk(self.num_experts_per_tok, dim=-1)
        return (gates / gates.sum(dim=-1, keepdim=True) if self.norm_topk_prob else gates), chosen

    def within_capacity(self, chosen: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Which assignments an expert keeps under the capacity limit.

        Args:
            chosen: `(n_tokens, k)` experts of the tokens, row by row (`n_tokens = batch_size * seq_len`).
            mask: `(batch_size, seq_len)` bool, or None (all real).

        Returns:
            `(n_tokens, k)` bool: the assignment is a real token's and its place in its expert's queue is below the
            capacity `ceil(capacity_factor * n_real_tokens * k / n_experts)`.
        """
        n_experts, k = self.experts.num_experts, self.num_experts_per_tok
        seq_len = chosen.shape[0] // batch_size
        real = chosen.new_ones(chosen.shape[0], dtype=torch.bool) if mask is None else mask.flatten()

        # Priority order: position by position (so what is dropped at a position never depends on later tokens and
        # the model stays causal); within one, all rows' first choices, then second ones...
        def priority_order(per_assignment: torch.Tensor) -> torch.Tensor:  # (n_tokens, k) -> (seq_len * k * batch,)
            return per_assignment.view(batch_size, seq_len, k).permute(1, 2, 0).flatten()

        one_hot = nn.functional.one_hot(priority_order(chosen), n_experts)
        one_hot = one_hot * priority_order(real[:, None].expand(-1, k))[:, None]
        place = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # -1 for padding
        place = place.view(seq_len, k, batch_size).permute(2, 0, 1).reshape(-1, k)
        # A tensor, not a Python int, so that no shape or branch depends on the data (torch.compile, torch.export).
        capacity = (self.capacity_factor * real.sum().double() * k / n_experts).ceil().clamp_min(1)
        return (place >= 0) & (place < capacity)


class ExpertChoiceLayer(nn.Module):
    """Expert Choice MoE within MoT's groups: at every position, the `group_size` tokens of a group of rows are
    offered to the experts, and each expert takes its best
    `ceil(capacity_factor * group_size * num_experts_per_tok / n_experts)` real tokens (by the softmax over experts
    of the router logits), weighting its output by that score. Choosing among the rows of one position keeps the
    model causal; a smaller last group offers fewer tokens. Roles: `router` ([`Router`]), `experts`
    ([`BatchedExperts`], each on the tokens it picked) and, with `config.expert_choice_output_norm`, `output_norm`:
    a LayerNorm over the summed update of each token, as the authors' Expert Choice normalizes its output. The
    gates are softmax scores over many experts, so without it the update starts far smaller than a dense MLP's.

    A token no expert picks gets no update (with the norm, the norm's bias); [`unprocessed_fraction`] measures how
    many do."""

    def __init__(self, config: MoTGPTConfig):
        super().__init__()
        self.group_size = config.group_size
        self.capacity = config.expert_choice_capacity
        self.router = Router(config)
        self.experts = BatchedExperts(config)
        norm = config.expert_choice_output_norm
        self.output_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if norm else None
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Shapes as in [`TokenChoiceLayer.forward`]."""
        batch_size, seq_len, d = hidden_states.shape
        token_mask = check_token_mask(token_mask, hidden_states)
        x, _, rows, gates = self.route(hidden_states, token_mask)
        x_flat = x.reshape(-1, d)
        outputs = self.experts(x_flat[rows]) * gates[..., None]
        update = torch.zeros_like(x_flat).index_add(0, rows.flatten(), outputs.flatten(0, 1))
        update = update.view(-1, seq_len, d)[:batch_size]
        if self.output_norm is not None:
            update = self.output_norm(update)
            if token_mask is not None:
                update = update * token_mask[..., None]  # padding still gets no update (the norm's bias otherwise)
        return self.dropout(update)

    def route(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Each expert's picks: the grouped hidden states `(n_groups, group_size, seq_len, d)` and mask (as
        [`to_groups`] gives them), the row of each pick in the grouped states flattened to `(-1, d)` and its gate,
        both `(n_experts, picks)` (gate 0 for a padding token, chosen only when a group has too few real ones)."""
        batch_size, seq_len, _ = hidden_states.shape
        router_logits = self.router(hidden_states).view(batch_size, seq_len, -1)
        x, real = to_groups(hidden_states, token_mask, self.group_size)
        router_logits, _ = to_groups(router_logits, None, self.group_size)  # (n_groups, G, seq_len, n_experts)
        scores = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
        if real is not None:
            scores = scores.masked_fill(~real, -1.0)  # padding is chosen last
        top_scores, chosen = scores.topk(self.capacity, dim=1)  # (n_groups, capacity, seq_len, n_experts)
        gates = top_scores.clamp_min(0.0).to(x.dtype).permute(3, 0, 1, 2).flatten(1)
        group_start = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1) * self.group_size
        position = torch.arange(seq_len, device=x.device).view(1, 1, -1, 1)
        rows = ((group_start + chosen) * seq_len + position).permute(3, 0, 1, 2).flatten(1)
        return x, real, rows, gates

    @torch.no_grad()
    def unprocessed_fraction(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> float:
        """The fraction of the real tokens of `hidden_states` `(batch_size, seq_len, n_embd)` that no expert picks,
        so that this layer leaves them without an update: what Expert Choice's balance costs. Groups as in
        [`forward`]."""
        x, real, rows, _ = self.route(hidden_states, check_token_mask(token_mask, hidden_states))
        picked = torch.zeros(x.shape[:3].numel(), dtype=torch.bool, device=x.device)
        picked[rows.flatten()] = True
        real = torch.ones_like(picked) if real is None else real.flatten()
        return float((real & ~picked).sum() / real.sum())


class MLP(GPT2MLP):
    """GPT-2's dense MLP, called like the expert layers (what they take besides the hidden states it ignores), so
    that a block calls its feed-forward layer one way whatever its type."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(hidden_states)


EXPERT_LAYERS = {
    "mot": MoTLayer,
    "uniform_mot": MoTLayer,
    "token_choice": TokenChoiceLayer,
    "expert_choice": ExpertChoiceLayer,
}


class MoTGPTBlock(GradientCheckpointingLayer):
    """A GPT-2 block whose MLP is the expert layer of `config.ffn_type` (a [`MoTLayer`] by default) when `layer_idx`
    is in `config.mot_layer_indices`, and GPT-2's dense MLP otherwise."""

    def __init__(self, config: MoTGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config=config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        is_expert_layer = layer_idx in config.mot_layer_indices
        self.mlp = EXPERT_LAYERS[config.ffn_type](config) if is_expert_layer else MLP(config.d_ff, config)
        self.attn.c_proj.writes_residual = True
        if is_expert_layer:
            self.mlp.register_load_state_dict_pre_hook(rename_legacy_weights)
        else:
            self.mlp.c_proj.writes_residual = True
            if config.mlp_init == "experts":
                self.mlp.c_fc.init_like_experts = self.mlp.c_proj.init_like_experts = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        router_temperature: float | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        """
        `hidden_states` `(batch_size, seq_len, n_embd)`; `attention_mask` is the attention mask built by the model
        (4-D or None); `token_mask` `(batch_size, seq_len)` marks the real tokens for the expert layer (None: all
        real); `router_temperature` is MoT's temperature for this call.
        """
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        mlp_output = self.mlp(self.ln_2(hidden_states), token_mask=token_mask, router_temperature=router_temperature)
        return hidden_states + mlp_output


# The filler bank: rows of training text that complete a MoT group around requests that arrive alone (the paper's
# evaluation recipe). It travels with the model: `save_pretrained` writes it beside the weights, `from_pretrained`
# reads it back (from a folder or the Hub), `set_group_fillers` gives one.
FILLER_FILE = "group_fillers.json"


def check_filler_bank(
    fillers: torch.Tensor, group_size: int, min_length: int | None = None, name: str = "fillers"
) -> None:
    """Refuse a bank that cannot complete a group of `group_size` rows of `min_length` tokens."""
    if fillers.ndim != 2 or fillers.shape[0] < group_size - 1 or (min_length and fillers.shape[1] < min_length):
        raise ValueError(
            f"{name} must hold at least group_size - 1 = {group_size - 1} rows of at least {min_length or 1} tokens, "
            f"got shape {tuple(fillers.shape)}."
        )


def save_filler_bank(fillers: torch.Tensor, folder: str | os.PathLike, group_size: int) -> Path:
    """Write `fillers` `(n_rows, length)` to `folder/group_fillers.json`; return the file."""
    check_filler_bank(fillers, group_size)
    path = Path(folder) / FILLER_FILE
    path.write_text(json.dumps({"group_size": group_size, "input_ids": fillers.tolist()}) + "\n")
    return path


# The keyword arguments of `from_pretrained` that say where a checkpoint's files are.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def find_filler_bank(source: str | os.PathLike, **hub_kwargs) -> Path | None:
    """The bank file of `source`: a JSON file, a checkpoint folder's `group_fillers.json`, or a Hub model's (through
    the Hub cache, `hub_kwargs` as for `from_pretrained`); None when it has none."""
    path = Path(source)
    if path.is_file() or (path.suffix == ".json" and not path.is_dir()):
        return path
    if path.is_dir():
        path = path / hub_kwargs.get("subfolder", "") / FILLER_FILE
        return path if path.is_file() else None
    resolved = cached_file(
        str(source),
        FILLER_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    return Path(resolved) if resolved else None


def load_filler_bank(source: str | os.PathLike, group_size: int, min_length: int | None = None) -> torch.LongTensor:
    """The filler bank of a checkpoint folder, a Hub model name or a JSON file (`{"group_size": G, "input_ids":
    [[...], ...]}`), checked to hold at least `group_size - 1` rows of at least `min_length` tokens.

    Raises `ValueError` naming the source when there is no bank or it does not fit."""
    path = find_filler_bank(source)
    if path is None or not path.is_file():
        raise ValueError(
            f"no filler bank at {str(source)!r}: a MoT checkpoint carries one as {FILLER_FILE} (`mot-train` and "
            "`save_pretrained` of a model that holds one write it; `mot-fillers` adds one); otherwise pass a fillers "
            "file (JSON with an 'input_ids' list of token id rows)."
        )
    try:
        fillers = torch.tensor(json.loads(path.read_text())["input_ids"], dtype=torch.long)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"filler bank {str(path)!r} must be JSON with an 'input_ids' list of equal-length token id rows: {error}"
        ) from error
    check_filler_bank(fillers, group_size, min_length, str(path))
    return fillers


def filler_columns(fillers: torch.LongTensor, starts: torch.LongTensor, width: int) -> torch.LongTensor:
    """Columns `starts[i] + j` (`j < width`; negative ones clamped to 0) of each filler row, for each request i:
    `(n, n_fillers, width)`."""
    columns = (starts[:, None] + torch.arange(width, device=starts.device)).clamp_min(0)  # (n, width)
    return fillers[:, columns].transpose(0, 1)


def real_lengths(ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.LongTensor:
    """The number of real (unpadded) tokens of each row, `(n,)`."""
    if attention_mask is None:
        return torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
    return attention_mask.sum(dim=1).long()


def isolated_groups(
    ids: torch.LongTensor, fillers: torch.LongTensor, group_size: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Each row of `ids` `(n, length)` in a group of its own, followed by `group_size - 1` rows of `fillers` aligned
    with the row's real tokens (a left-padded row's fillers are padded alike, so its group is the one it would have
    alone): ids and mask `(n * group_size, length)`, the requests at rows `0, group_size, 2 * group_size, ...`. The one
    rule by which a request that arrives alone is grouped (`generate`, evaluation, lm-eval)."""
    length = ids.shape[1]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
    padding = length - real_lengths(ids, attention_mask)  # left padding of each row
    fill = filler_columns(fillers[: group_size - 1].to(ids.device), -padding, length)  # (n, G - 1, length)
    fill_mask = (torch.arange(length, device=ids.device) >= padding[:, None]).to(mask.dtype)[:, None].expand_as(fill)
    grouped = torch.cat([ids[:, None], fill], dim=1).flatten(0, 1)
    grouped_mask = torch.cat([mask[:, None], fill_mask], dim=1).flatten(0, 1)
    return grouped, grouped_mask


# The weight names of an expert layer in checkpoints saved before it had a router and an experts module, and the
# names they have now (the layouts did not change). `from_pretrained` renames them through transformers'
# `key_mapping` (regular expressions on whole keys); `load_state_dict` (what `Trainer` resumes a checkpoint with)
# through [`rename_legacy_weights`].
LEGACY_WEIGHT_NAMES = {
    "controller": "router.weight",
    "router_bias": "router.bias",
    "w_in": "experts.up_proj",
    "w_out": "experts.down_proj",
    "b_in": "experts.up_proj_bias",
    "b_out": "experts.down_proj_bias",
}
LEGACY_KEY_MAPPING = {rf"\.mlp\.{old}$": f".mlp.{new}" for old, new in LEGACY_WEIGHT_NAMES.items()}


def rename_legacy_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook of an expert layer: its weights under legacy names take their current ones."""
    for old, new in LEGACY_WEIGHT_NAMES.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def trunc_normal_scaled(weight: torch.Tensor, scale: float, fan_in: int) -> None:
    """The paper's init: normal with std = sqrt(scale / fan_in), truncated at two standard deviations."""
    std = math.sqrt(scale / fan_in)
    init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class MoTGPTPreTrainedModel(PreTrainedModel):
    config: MoTGPTConfig
    config_class = MoTGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoTGPTBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The forward has no data-dependent branch or shape in traced inference (see `_check_grouped_batch`): it compiles
    # with `fullgraph=True` (static-cache decoding) and `torch.export` traces it. The flag declares it, as
    # transformers' models do (its generation compile tests read it).
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": MoTGPTBlock,
        "attentions": OutputRecorder(GPT2Attention, layer_name=".attn", index=1),
        "router_logits": Router,
    }

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args,
        key_mapping: dict[str, str] | None = None,
        **kwargs,
    ):
        """[`~PreTrainedModel.from_pretrained`], which also loads the checkpoint's filler bank (`group_fillers.json`,
        from the folder or the Hub) into the model, and checkpoints saved before the expert layers' weights were named
        by role (`controller`, `w_in`, `w_out`, ...: see `LEGACY_KEY_MAPPING`)."""
        loaded = super().from_pretrained(
            pretrained_model_name_or_path, *args, key_mapping=LEGACY_KEY_MAPPING | (key_mapping or {}), **kwargs
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` gives a pair
        if pretrained_model_name_or_path is None:  # weights given as `state_dict`: no folder to hold a bank
            return loaded
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        bank = find_filler_bank(pretrained_model_name_or_path, **hub_kwargs)
        if bank is not None and bank.name == FILLER_FILE:
            model.set_group_fillers(load_filler_bank(bank, model.config.group_size))
        return loaded

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *args,
        save_original_format: bool = False,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """[`~PreTrainedModel.save_pretrained`], also writing the model's filler bank (`group_fillers.json`, removed
        from the folder when the model has none), so that what `Trainer`, TRL or a PEFT merge saves keeps it, and the
        weights under their current names: a model loaded from a checkpoint with the legacy names is not written
        back in that format (transformers' default would reverse the renaming). With `push_to_hub`, the folder is
        uploaded once the bank is in it."""
        super().save_pretrained(save_directory, is_main_process, *args, save_original_format=save_original_format,
                                **kwargs)  # fmt: skip
        if is_main_process:
            if self.group_fillers is not None:
                save_filler_bank(self.group_fillers.cpu(), save_directory, self.config.group_size)
            else:
                (Path(save_directory) / FILLER_FILE).unlink(missing_ok=True)  # a bank of an earlier save
        if push_to_hub:
            hub_kwargs = {key: kwargs[key] for key in ("commit_message", "private", "token") if key in kwargs}
            self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), **hub_kwargs)

    @property
    def group_fillers(self) -> torch.LongTensor | None:
        """The model's filler bank `(n_rows, length)`: rows of training text that complete an incomplete MoT group
        (see [`MoTGPTForCausalLM.generate`]), or None."""
        return self.base_model.filler_bank

    def set_group_fillers(self, fillers: torch.Tensor | list[list[int]] | None) -> None:
        """Give the model a filler bank `(n_rows, length)` of token ids (None removes it): at least `group_size - 1`
        rows of in-vocabulary ids with no EOS id (a filler that emitted EOS would leave its group). `save_pretrained`
        writes it; `from_pretrained` reads it back."""
        if fillers is None:
            self.base_model.filler_bank = None
            return
        fillers = torch.as_tensor(fillers)
        if fillers.is_floating_point() or fillers.is_complex() or fillers.dtype == torch.bool:
            raise ValueError(f"`fillers` must hold integer token ids, got dtype {fillers.dtype}.")
        fillers = fillers.to(torch.long).clone()  # the model's own copy
        check_filler_bank(fillers, self.config.group_size)
        if fillers.numel() and not 0 <= int(fillers.min()) <= int(fillers.max()) < self.config.vocab_size:
            raise ValueError(f"`fillers` must hold token ids in [0, vocab_size={self.config.vocab_size}).")
        eos = self.generation_config.eos_token_id if self.can_generate() else self.config.eos_token_id
        if eos is not None and torch.isin(fillers, torch.as_tensor(eos).flatten()).any():
            raise ValueError(
                f"`fillers` must not hold an EOS id ({eos}): a filler that emitted EOS would leave its group. Cut the "
                "filler text at document boundaries (`mixture_of_tokens.fillers.build_filler_bank` does)."
            )
        self.base_model.filler_bank = fillers.to(self.device)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, Conv1D) and getattr(module, "init_like_experts", False):
            # `mlp_init="experts"`: the dense MLP starts as the experts do (below), so only the layer type differs.
            # Conv1D weights are (fan_in, fan_out).
            trunc_normal_scaled(module.weight, config.mot_init_scale, fan_in=module.weight.shape[0])
            init.zeros_(module.bias)
        elif isinstance(module, Conv1D):
            std = config.initializer_range
            if getattr(module, "writes_residual", False):
                # GPT-2's scaled init of the projections that write to the residual stream (two per block). It is
                # keyed on the Conv1D itself: transformers skips `_init_weights` for parents whose children are done.
                std /= math.sqrt(2 * config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        # The paper's init of expert layers: truncated normal, std = sqrt(scale / fan_in), cut at two standard
        # deviations; biases start at zero.
        if isinstance(module, Router):
            trunc_normal_scaled(module.weight, config.mot_init_scale, fan_in=config.n_embd)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, BatchedExperts):
            trunc_normal_scaled(module.up_proj, config.mot_init_scale, fan_in=config.n_embd)
            trunc_normal_scaled(module.down_proj, config.mot_init_scale, fan_in=config.expert_size_resolved)
            if module.up_proj_bias is not None:
                init.zeros_(module.up_proj_bias)
                init.zeros_(module.down_proj_bias)
        if isinstance(module, MoTLayer):
            if module.log_temperature is not None:
                init.constant_(module.log_temperature, math.log(config.router_temperature))


class MoTGPTModel(MoTGPTPreTrainedModel):
    def __init__(self, config: MoTGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([MoTGPTBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._checked_training_batch = False
        self._warned_incomplete_group = False
        # Not in the state dict (its shape is the bank's): `save_pretrained` writes it to group_fillers.json.
        self.register_buffer("filler_bank", None, persistent=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def _check_grouped_batch(
        self,
        batch_size: int,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kwargs: dict,
    ) -> None:
        """Refuse inputs whose rows are not whole sequences that a MoT group can mix: a 4-D mask without a token
        mask, sequences packed into one row, and, at the first training step, a batch that does not hold whole
        groups."""
        remedy = (
            "Feed one sequence per row with the 2-D `attention_mask` (padding is kept out of the mixtures), serve with "
            "group-aware batching (`mot-serve`), or convert the model with transition tuning (`mot-transition-tune`) "
            "into a Token Choice model that needs no groups."
        )
        if "attention_instances" in kwargs:
            raise ValueError(
                "MoTGPT was called the way the Transformers backends of vLLM and SGLang call a model "
                "(`attention_instances`, every request flattened into one row): MoT's groups of rows cannot be formed "
                "there, so each request would be mixed with unrelated tokens, or decoded alone as a group of one. "
                "Serve it with `mot-serve` (group-aware batching), or convert it with transition tuning "
                "(`mot-transition-tune`) into a Token Choice model, which needs no groups and which such engines can "
                "serve."
            )
        if attention_mask is not None and attention_mask.ndim != 2 and token_mask is None:
            raise ValueError(
                "MoTGPT's MoT layers mix the tokens of `group_size` batch rows at each position, so they need the 2-D "
                f"padding mask (batch_size, past_len + seq_len); got a {attention_mask.ndim}-D `attention_mask` (as "
                "continuous batching or a packed batch gives) and no `token_mask` saying which of the current tokens "
                f"are real (static-cache generation passes one beside its 4-D mask). {remedy}"
            )
        # Packed rows come from training collators (padding-free packing); the check reads the positions, which traced
        # inference code (`torch.compile(fullgraph=True)`, `torch.export`) cannot branch on, so there it is left to
        # eager calls and to training, where a compiled model takes a graph break for it.
        check_packing = self.training or not torch.compiler.is_compiling()
        if "cu_seq_lens_q" in kwargs or (check_packing and _is_packed(position_ids, token_mask)):
            raise ValueError(
                "MoTGPT got several sequences packed into one row (position_ids restart inside a row, as padding-free "
                "packing gives): each would be mixed with the tokens of unrelated sequences and, with one row, in a "
                "group of one. With TRL's SFTTrainer set `padding_free=False` and `packing_strategy='wrapped'` (or "
                f"`packing=False`). {remedy}"
            )
        if self.training and torch.is_grad_enabled() and not self._checked_training_batch:
            # Checked once, at the first training step (train mode, gradients on), where the per-device batch size
            # shows. A smaller last batch of an epoch later on trains with a smaller last group, as any batch does.
            group_size = self.config.group_size
            if batch_size < group_size:
                raise ValueError(
                    f"the first training batch holds {batch_size} rows, fewer than the model's "
                    f"group_size={group_size}: every token would be mixed in a group of {batch_size} instead of "
                    f"{group_size}. Set the per-device training batch size (`per_device_train_batch_size`) to a "
                    f"multiple of {group_size}, and do not pack sequences into one row (TRL: padding_free=False)."
                )
            if batch_size % group_size:
                logger.warning(
                    f"The first training batch holds {batch_size} rows, not a multiple of group_size={group_size}: if "
                    f"every batch is that large, its last {batch_size % group_size} rows always train in a smaller "
                    "group. A multiple of group_size avoids it."
                )
            self._checked_training_batch = True

    def warn_incomplete_group(self, batch_size: int, why: str | None = None) -> None:
        """Warn, once per model, that a batch of `batch_size` rows leaves an incomplete MoT group, and `why` it was
        not completed (by default: the model has no filler bank)."""
        if self._warned_incomplete_group:
            return
        group_size = self.config.group_size
        if why is None:
            why = (
                "The model has no filler bank to complete it: add one to the checkpoint with `mot-fillers CHECKPOINT "
                "--text FILE`, or call `model.set_group_fillers(ids)`"
            )
        logger.warning(
            f"MoTGPT mixes the rows of groups of {group_size}; this batch of {batch_size} rows leaves a group of "
            f"{batch_size % group_size}, whose tokens are mixed with fewer others than in training (a lone block "
            f"measured up to +76% perplexity, docs/generation.md). {why}; or pass batches of whole groups."
        )
        self._warned_incomplete_group = True

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        router_temperature: float | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        r"""
        Args:
            input_ids: `(batch_size, seq_len)` token ids; with a cache, only the tokens not yet in it.
            past_key_values: a [`~transformers.Cache`] of earlier keys and values.
            attention_mask: `(batch_size, past_len + seq_len)`, 1 for real tokens and 0 for padding. Besides masking
                attention, it keeps padding out of the MoT groups' mixtures. `None` means every token is real.
            position_ids: `(batch_size, seq_len)`; by default counted on from the cache length.
            inputs_embeds: `(batch_size, seq_len, n_embd)`, instead of `input_ids`.
            use_cache: whether to return the updated `past_key_values`.
            router_temperature: MoT mixing temperature for this call (>= 0; 0 = discrete routing), overriding the
                config and any learned temperature.
            token_mask: `(batch_size, seq_len)`, 1 for the current tokens that are real, for the expert layers; by
                default the last `seq_len` columns of the 2-D `attention_mask`. Needed with a 4-D `attention_mask`:
                static-cache generation hands the model one of fixed shape (so that a compiled forward is not
                recompiled as the 2-D mask grows) and this beside it.
        """
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("output_router_logits", None)
        check_router_temperature(router_temperature)
        # Trainers write the coefficient into the built config (TRL's SFTTrainer does): refused before any step.
        self.config.check_router_aux_loss_coef()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        token_mask = current_token_mask(token_mask, attention_mask, seq_len)
        if self.config.uses_groups:
            self._check_grouped_batch(batch_size, attention_mask, token_mask, position_ids, kwargs)
            if batch_size % self.config.group_size and not self.training and not torch.compiler.is_compiling():
                # `generate` completes such a group with the model's bank; a forward pass cannot add rows.
                why = None if self.filler_bank is None else "A forward pass cannot complete it (`generate` does)"
                self.warn_incomplete_group(batch_size, why)
        # A 4-D mask without a token mask (continuous batching hands one) reaches only a model without groups: its
        # expert layers, if any, treat every token as real, and attention takes the mask as it is.

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0) + past_seen_tokens

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(
                hidden_states,
                past_key_values,
                causal_mask,
                token_mask,
                router_temperature,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )
        return MoeModelOutputWithPast(
            last_hidden_state=self.ln_f(hidden_states),
            past_key_values=past_key_values if use_cache else None,
        )


class MoTGPTForCausalLM(MoTGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MoTGPTConfig):
        super().__init__(config)
        self.transformer = MoTGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        router_temperature: float | None = None,
        token_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        r"""
        Args are those of [`MoTGPTModel.forward`], plus:
            labels: `(batch_size, seq_len)` targets for the language-modeling loss; they are shifted inside, so
                `labels = input_ids` works; -100 is ignored.
            output_router_logits: return the router logits of each expert layer that has a router (all but uniform
                MoT), `(batch_size * seq_len, n_experts)` each.
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 = all), or for the
                positions in a 1-D index tensor.

        Returns:
            [`~transformers.modeling_outputs.MoeCausalLMOutputWithPast`] with `logits` `(batch_size, kept, vocab)`.
            MoT needs no load-balancing loss: `aux_loss` is set (and added to the loss) only for Token Choice layers
            with `output_router_logits`.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            router_temperature=router_temperature,
            token_mask=token_mask,
            **kwargs,
        )
        # As transformers' models slice (written out: remote code also loads under transformers releases without the
        # helper, `slice_logits_to_keep`, such as 5.19).
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, kept, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and self.config.ffn_type == "token_choice" and outputs.router_logits:
            # Switch's load-balancing loss; MoT and Expert Choice are balanced by construction and need none.
            seq_len = outputs.last_hidden_state.shape[1]
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.n_experts,
                self.config.num_experts_per_tok,
                current_token_mask(token_mask, attention_mask, seq_len),
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def init_continuous_batching(self, *args, **kwargs):
        """[`~ContinuousMixin.init_continuous_batching`] (behind `generate_batch` and `transformers serve
        --continuous-batching`) for a model without groups; a model with MoT groups is refused here, where the caller
        sees the error (inside the batching loop it would only be logged, and every request would come back empty)."""
        if self.config.uses_groups:
            raise ValueError(
                "continuous batching flattens all requests into one row, so a model with MoT layers (ffn_type="
                f"{self.config.ffn_type!r}, group_size={self.config.group_size}) would mix each request's tokens with "
                "unrelated ones. Use `mot-serve` (group-aware batching), `generate` on batches of group_size rows "
                "(or with `group_fillers`), or convert the model with `mot-transition-tune` into a Token Choice model, "
                "which works with continuous batching."
            )
        return super().init_continuous_batching(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        eos_stops_mixing: tuple[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> dict:
        """As in [`~GenerationMixin`], with rows that have emitted EOS leaving their groups' mixtures and, with a
        static (compileable) cache, the current tokens' `token_mask` beside the 4-D attention mask the parent builds.

        `eos_stops_mixing` is `(prompt_length, eos_token_ids)`, set by [`generate`]: a row whose generated part
        (`input_ids[:, prompt_length:]`) holds one of those ids is masked from that token on. The mask only changes
        what such a finished row shares with its group (and what it attends to itself); its outputs are discarded by
        `generate` anyway. It is a function of `input_ids`, so cached decoding and full recomputation agree.
        """
        if eos_stops_mixing is not None:
            prompt_length, eos_token_ids = eos_stops_mixing
            generated = input_ids[:, prompt_length:]
            finished = torch.isin(generated, eos_token_ids.to(generated.device)).cumsum(dim=-1) > 0
            if finished.any():
                attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
                # The generated tokens are the mask's last columns (a prompt given as embeddings is not in input_ids).
                attention_mask[:, attention_mask.shape[1] - generated.shape[1] :] *= ~finished
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        current = (
            model_inputs["input_ids"] if model_inputs.get("input_ids") is not None else model_inputs["inputs_embeds"]
        )
        if isinstance(past_key_values, Cache) and past_key_values.is_compileable:
            # With a static cache the parent hands the model a 4-D mask of fixed shape (a 2-D mask grows by a column
            # each step, and a compiled forward would be recompiled each time); the expert layers then read which
            # current tokens are real from `token_mask`, of fixed shape too.
            batch_size, seq_len = current.shape[:2]
            model_inputs["token_mask"] = (
                torch.ones(batch_size, seq_len, dtype=torch.long, device=current.device)
                if attention_mask is None
                # Contiguous: a fixed stride too (a view's grows with the mask); on the model's device, where the
                # parent has moved the other inputs.
                else attention_mask[:, -seq_len:].contiguous().to(current.device)
            )
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        group_fillers: torch.LongTensor | None = None,
        complete_groups: bool = True,
        **kwargs,
    ):
        r"""[`~GenerationMixin.generate`], with what MoT needs on top.

        - Decoding groups the current tokens in the same row blocks as the prompt pass, so cached generation equals
          full recomputation. A row that has emitted an EOS token (of this call's generation config) stops taking
          part in the mixing of the rows still running.
        - An incomplete group is completed by default (the paper's evaluation recipe): when the batch is not a whole
          number of groups (a lone prompt, a pipeline's batch of 1), each row of its last, incomplete group gets a
          group of its own with `group_size - 1` rows of the model's filler bank ([`group_fillers`], from the
          checkpoint's `group_fillers.json`). Its answer then depends on nothing but its prompt, as in `mot-serve`'s
          isolated mode. `complete_groups=False` turns this off; without a bank the model warns once and decodes the
          incomplete group as it is.
        - `group_fillers` (`LongTensor` of shape `(n_fillers, filler_len)`): a bank for this call, given to *every*
          prompt: each gets a group of its own with the first `group_size - 1` filler rows.
        - Fillers are fed their own text (teacher-forced, never sampled) and only the prompts' rows are returned. A
          bank needs `filler_len >= prompt_len + max_new_tokens` and works without beam search,
          `num_return_sequences > 1` and `return_dict_in_generate`.
        - `router_temperature` (float >= 0) sets the MoT temperature for this call only; 0 is discrete routing. The
          default is the model config's `router_temperature` (or the learned one).
        """
        check_router_temperature(kwargs.get("router_temperature"))
        prompt_key = "inputs" if inputs is not None else "input_ids"
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        config = generation_config if generation_config is not None else self.generation_config
        isolated = self._rows_to_isolate(prompt, group_fillers, complete_groups, config, kwargs)
        if isolated is not None:
            fillers = self.group_fillers if group_fillers is None else group_fillers
            prompt, kept, forcing = self._add_group_fillers(prompt, isolated, fillers, config, kwargs)
            logits_processor = LogitsProcessorList([*(logits_processor or []), forcing])
            if kwargs.get("streamer") is not None:
                kwargs["streamer"] = RowsStreamer(kwargs["streamer"], kept.cpu())
        eos_token_id = kwargs.get("eos_token_id", config.eos_token_id)
        if eos_token_id is not None:
            # With only `inputs_embeds`, generate's input_ids hold just the new tokens: the prompt length there is 0.
            prompt_length = prompt.shape[1] if prompt is not None else 0
            kwargs["eos_stops_mixing"] = (prompt_length, torch.as_tensor(eos_token_id).flatten())
        if prompt_key == "inputs":
            inputs = prompt
        else:
            kwargs["input_ids"] = prompt
        output = super().generate(inputs, generation_config, logits_processor, **kwargs)
        return output if isolated is None else output[kept]

    def _rows_to_isolate(
        self,
        prompt: torch.LongTensor | None,
        group_fillers: torch.LongTensor | None,
        complete_groups: bool,
        config: GenerationConfig,
        kwargs: dict,
    ) -> range | None:
        """The prompt rows that get groups of their own with fillers: every row with `group_fillers` (a `ValueError`
        says why when it cannot be done); with the model's bank, those of an incomplete last group (when it cannot be
        done, the model warns once why and decodes the group as it is); None when no row does."""
        if group_fillers is not None:
            if prompt is None or prompt.ndim != 2:
                raise ValueError("`group_fillers` needs the prompts as a 2-D `input_ids` tensor.")
            problem = self._filler_problem(prompt, group_fillers, config, kwargs)
            if problem is not None:
                raise ValueError(f"`group_fillers`: {problem}.")
            return range(prompt.shape[0])
        rows = prompt if prompt is not None else kwargs.get("inputs_embeds")
        if rows is None or not complete_groups or not self.config.uses_groups:
            return None
        batch_size = rows.shape[0]
        if not batch_size % self.config.group_size:
            return None
        if self.group_fillers is None:
            self.transformer.warn_incomplete_group(batch_size)
            return None
        if prompt is None or prompt.ndim != 2:
            problem = "completing it needs the prompts as `input_ids`, not `inputs_embeds`"
        else:
            problem = self._filler_problem(prompt, self.group_fillers, config, kwargs)
        if problem is not None:
            self.transformer.warn_incomplete_group(batch_size, f"The model's filler bank was not used: {problem}")
            return None
        return range(batch_size - batch_size % self.config.group_size, batch_size)

    def _filler_problem(
        self, prompt: torch.LongTensor, fillers: torch.LongTensor, config: GenerationConfig, kwargs: dict
    ) -> str | None:
        """Why a filler bank cannot complete groups in this call, or None."""
        for name in ("num_beams", "num_return_sequences"):
            value = kwargs.get(name, getattr(config, name))
            if value not in (None, 1):
                return f"it does not work with `{name}` > 1, got {value!r}"
        for name in ("return_dict_in_generate", "assistant_model", "prompt_lookup_num_tokens"):
            if kwargs.get(name, getattr(config, name, None)):
                return f"it does not work with `{name}`"
        group_size = self.config.group_size
        longest = int(real_lengths(prompt, kwargs.get("attention_mask")).max())
        needed = longest + self._max_new_tokens(prompt, config, kwargs)
        if fillers.ndim != 2 or fillers.shape[0] < group_size - 1 or fillers.shape[1] < needed:
            return (
                f"the bank must have shape (n_fillers >= group_size - 1 = {group_size - 1}, filler_len >= prompt "
                f"tokens + max_new_tokens = {needed}), got {tuple(fillers.shape)}: generate fewer tokens or give a "
                "longer bank"
            )
        return None

    def _max_new_tokens(self, prompt: torch.LongTensor, config: GenerationConfig, kwargs: dict) -> int:
        """The new tokens this call generates at most, by `generate`'s rule (20 when no length is set, within the
        model's positions)."""
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            return max_new_tokens
        max_length = kwargs.get("max_length", config.max_length)
        if max_length is None:
            max_length = min(prompt.shape[1] + 20, self.config.n_positions)
        return max_length - prompt.shape[1]

    def _add_group_fillers(
        self,
        prompt: torch.LongTensor,
        isolated: range,
        fillers: torch.LongTensor,
        config: GenerationConfig,
        kwargs: dict,
    ) -> tuple[torch.LongTensor, torch.LongTensor, "FillerForcing"]:
        """Put each of the `isolated` rows of `prompt` in a group of its own with `group_size - 1` filler rows
        ([`isolated_groups`]), after the other rows. Sets the mask and the stopping criterion in `kwargs`; returns the
        ids, the rows to return and the processor that feeds the fillers their text."""
        group_size, head = self.config.group_size, isolated.start  # the rows before `head` are whole groups
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(prompt) if mask is None else mask
        fillers = fillers[: group_size - 1].to(prompt.device)
        ids, grouped_mask = isolated_groups(prompt[head:], fillers, group_size, mask[head:])
        new_tokens = self._max_new_tokens(prompt, config, kwargs)
        continuation = filler_columns(fillers, real_lengths(prompt[head:], mask[head:]), new_tokens).flatten(0, 1)
        eos_token_id = kwargs.get("eos_token_id", config.eos_token_id)
        if eos_token_id is not None and torch.isin(continuation, torch.as_tensor(eos_token_id).to(prompt.device)).any():
            raise ValueError(
                f"filler rows must not hold an EOS id ({eos_token_id}) in the {new_tokens} tokens they are fed after "
                "the prompt: a filler that emits EOS would leave its group. Cut the filler text at document boundaries."
            )
        groups = torch.arange(len(isolated), device=prompt.device) * group_size + head
        filler_rows = (groups[:, None] + torch.arange(1, group_size, device=prompt.device)).flatten()
        kwargs["attention_mask"] = torch.cat([mask[:head], grouped_mask])
        if eos_token_id is not None:
            done = FillersStopWithTheirPrompt(groups, group_size, prompt.shape[1], eos_token_id)
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), done])
        kept = torch.cat([torch.arange(head, device=prompt.device), groups])
        forcing = FillerForcing(continuation, prompt.shape[1], filler_rows)
        return torch.cat([prompt[:head], ids]), kept, forcing


class FillersStopWithTheirPrompt(StoppingCriteria):
    """Marks an isolated group's filler rows done once its prompt row has emitted EOS, so that decoding ends when the
    prompts are done (filler rows never emit EOS). `groups` `(n,)` holds the batch rows of the prompts, each followed
    by its `group_size - 1` fillers."""

    def __init__(self, groups: torch.LongTensor, group_size: int, prompt_len: int, eos_token_id: int | list[int]):
        self.groups = groups
        self.group_size = group_size
        self.prompt_len = prompt_len
        self.eos = torch.as_tensor(eos_token_id).flatten()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[self.groups, self.prompt_len :]
        prompt_done = torch.isin(generated, self.eos.to(input_ids.device)).any(dim=-1)  # (n,)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        filler_rows = self.groups[:, None] + torch.arange(1, self.group_size, device=input_ids.device)
        done[filler_rows.flatten()] = prompt_done[:, None].expand_as(filler_rows).flatten()
        return done


class RowsStreamer(BaseStreamer):
    """Hands a streamer (`TextStreamer`, `transformers serve`'s) only the rows of the prompts: `generate` streams
    every row of its batch, the filler rows included."""

    def __init__(self, streamer: BaseStreamer, rows: torch.LongTensor):
        self.streamer = streamer
        self.rows = rows

    def put(self, value: torch.Tensor) -> None:
        self.streamer.put(value[self.rows])  # the prompt `(batch, len)`, then each step's tokens `(batch,)`

    def end(self) -> None:
        self.streamer.end()


class FillerForcing(LogitsProcessor):
    """Makes the filler rows of a batch emit their reference text.

    `continuation` is `(n_filler_rows, max_new_tokens)`: the tokens that follow the prompt positions in the filler
    rows `filler_rows` `(n_filler_rows,)` of the batch.
    """

    def __init__(self, continuation: torch.LongTensor, prompt_len: int, filler_rows: torch.LongTensor):
        self.continuation = continuation
        self.prompt_len = prompt_len
        self.filler_rows = filler_rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores[self.filler_rows], float("-inf"))
        forced.scatter_(1, self.continuation[:, step, None].to(scores.device), 0.0)
        scores = scores.clone()
        scores[self.filler_rows] = forced
        return scores


__all__ = [
    "ExpertChoiceLayer",
    "BatchedExperts",
    "Router",
    "TokenChoiceExperts",
    "FILLER_FILE",
    "FillerForcing",
    "MoTLayer",
    "TokenChoiceLayer",
    "MoTGPTPreTrainedModel",
    "MoTGPTModel",
    "MoTGPTForCausalLM",
    "check_filler_bank",
    "isolated_groups",
    "load_filler_bank",
    "mixing_weights",
    "save_filler_bank",
]
