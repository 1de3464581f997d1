"""Configuration of MoTGPT: GPT-2 with Mixture of Tokens feed-forward layers."""

import math

from transformers import GPT2Config
from transformers.activations import ACT2CLS

LEARNABLE_TEMPERATURE_MODES = ("none", "layer", "expert")
FFN_TYPES = ("mot", "uniform_mot", "token_choice", "expert_choice")
MOT_LAYER_PRESETS = ("all", "second_half")
EMIT_WEIGHTS = ("group", "experts")
MLP_INITS = ("gpt2", "experts")


def _is_number(value) -> bool:
    """A real number (an int or float, not a bool or a string such as a misparsed command-line value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MoTGPTConfig(GPT2Config):
    r"""
    Configuration of a [`MoTGPTModel`]: the GPT-2 architecture in which the MLP of chosen blocks is replaced by a
    Mixture of Tokens (MoT) layer (Antoniak et al., "Mixture of Tokens: Continuous MoE through Cross-Example
    Aggregation", 2023). Every [`~transformers.GPT2Config`] field keeps its meaning; the fields below are added.

    In a MoT layer the batch rows are cut into consecutive blocks of `group_size` rows. At each position, the tokens
    of one block form a group. Each of the `n_experts` experts receives one softmax-weighted mixture of the group's
    tokens and hands its output back to them with the same weights. Tokens are only mixed with tokens at the same
    position of other rows, so the model stays causal.

    Args:
        n_experts (`int`, *optional*, defaults to 32):
            Number of experts E in each MoT layer. Must be at least 1.
        group_size (`int`, *optional*, defaults to 32):
            Number of batch rows G whose tokens are mixed together. Must be at least 1. A batch whose size is not a
            multiple of `group_size` is allowed: its last group is smaller.
        expert_size (`int`, *optional*):
            Hidden width f of each expert. `None` (default) picks the FLOP-matched width
            `group_size * d_ff / n_experts` with `d_ff = n_inner or 4 * n_embd`, so that a MoT layer spends as many
            expert FLOPs per token as the dense MLP it replaces. That quotient must then be a whole number.
        mot_layers (`str` or `list[int]`, *optional*, defaults to `"all"`):
            Which blocks use a MoT layer instead of the dense MLP: `"all"`, `"second_half"` (blocks
            `n_layer // 2` and up, as in the paper's configurations) or a list of block indices in `[0, n_layer)`.
            An empty list gives the dense GPT-2 twin of the model.
        router_temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature T of the mixing weights, `>= 0`. `0` is discrete routing: each expert takes only the
            highest-scoring token of its group. With a learnable temperature this is its initial value and must be
            `> 0`. A forward call may override it with `router_temperature=`.
        learnable_temperature (`str`, *optional*, defaults to `"none"`):
            `"none"` keeps T fixed; `"layer"` learns one T per MoT layer; `"expert"` learns one T per expert. A
            learned T is stored as its logarithm in the `log_temperature` parameter.
        expert_activation (`str`, *optional*, defaults to `"relu"`):
            Activation inside the experts: any name known to `transformers.activations` (the paper uses `"relu"`,
            GPT-2's MLP uses `"gelu_new"`).
        expert_bias (`bool`, *optional*, defaults to `False`):
            Whether the experts have biases (the paper's have none).
        mot_init_scale (`float`, *optional*, defaults to 0.1):
            MoT weights start from a truncated normal with `std = sqrt(mot_init_scale / fan_in)`, as in the paper.
            Must be `> 0`.
        mlp_init (`str`, *optional*, defaults to `"gpt2"`):
            Initialization of the dense MLPs (the blocks outside `mot_layers`): `"gpt2"` keeps GPT-2's (normal with
            std `initializer_range`, the output projection scaled by `1 / sqrt(2 * n_layer)`); `"experts"` uses the
            experts' rule above (truncated normal, `std = sqrt(mot_init_scale / fan_in)`, zero biases), so that a
            dense model and an expert model differ only in the layer type.
        mot_emit_weights (`str`, *optional*, defaults to `"group"`):
            MoT only: the weights with which each token receives the experts' outputs. `"group"` reuses the mixing
            weights (the softmax over the group, as in the paper's results); `"experts"` takes, for each token, the
            softmax of its controller logits over the experts (the authors' output-normalization variant: a token's
            received weights sum to 1).
        ffn_type (`str`, *optional*, defaults to `"mot"`):
            The layer used in the blocks of `mot_layers`: `"mot"`; `"uniform_mot"`, MoT with all controller
            logits equal (plain averaging, the paper's ablation); `"token_choice"`, a Token Choice MoE (each token
            goes to its `num_experts_per_tok` best experts, Switch/Mixtral style); `"expert_choice"`, an Expert
            Choice MoE (in each group of `group_size` tokens at one position, each expert takes its best tokens).
            All are FLOP-matched to the dense MLP when `expert_size` is None: MoT experts are
            `group_size * d_ff / n_experts` wide, Token and Expert Choice experts `d_ff / num_experts_per_tok`.
        num_experts_per_tok (`int`, *optional*, defaults to 1):
            Token Choice: experts per token. Expert Choice: average experts per token, so that each expert takes
            `capacity_factor * group_size * num_experts_per_tok / n_experts` tokens of a group.
        capacity_factor (`float`, *optional*, defaults to 1.0):
            Token Choice: an expert takes at most `ceil(capacity_factor * tokens * num_experts_per_tok /
            n_experts)` tokens of a batch; later ones are dropped (their update is 0), and every expert multiplies
            a buffer of that many rows, full or not. `None` means no limit: nothing is dropped, each expert
            multiplies only the tokens routed to it, and a row's output does not depend on the rest of the batch.
            Expert Choice: see `num_experts_per_tok`.
        norm_topk_prob (`bool`, *optional*):
            Token Choice: whether a token's gates (the router probabilities of its chosen experts) are renormalized
            to sum to 1. `None` (default) renormalizes when `num_experts_per_tok > 1` (Mixtral) and keeps the raw
            probability for a single expert (Switch, whose router then learns through its gate). `True` always
            renormalizes (with one expert the gate is 1, as transition tuning uses it); `False` never does.
        router_bias (`bool`, *optional*, defaults to `False`):
            Token Choice: whether the router adds a learned per-expert bias `(n_experts,)` to its logits. Transition
            tuning sets it from a calibration pass so that the converted router starts balanced (a MoT controller's
            per-expert offsets shared by all tokens cancel in MoT's softmax over the group, not in a softmax over
            the experts). Only for `ffn_type="token_choice"`.
        router_aux_loss_coef (`float`, *optional*):
            Token Choice: weight of the Switch load-balancing loss added to the language-modeling loss when
            `output_router_logits` is on. `None` (default) means 0.01 for `ffn_type="token_choice"` and 0 for every
            other layer type: MoT, uniform MoT and Expert Choice are balanced by construction, so they take no
            load-balancing loss, and a non-zero value for them is refused (trainers such as TRL's `SFTTrainer` read
            this field to decide whether to add one).
        output_router_logits (`bool`, *optional*, defaults to `False`):
            Whether the model returns each expert layer's controller (router) logits, of shape
            `(batch_size * seq_len, n_experts)` as in Mixtral.

    Names used by other MoE models are mapped through `attribute_map`, so tools that read them (TRL, PEFT,
    transformers' MoE utilities) find them: `num_experts` and `num_local_experts` are `n_experts`,
    `moe_intermediate_size` is the resolved expert width (`expert_size_resolved`), and GPT-2's own map gives
    `hidden_size`, `num_hidden_layers`, `num_attention_heads` and `max_position_embeddings`.

    Example:

    ```python
    >>> from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM

    >>> config = MoTGPTConfig(n_layer=2, n_embd=64, n_head=2, n_experts=8, group_size=4)
    >>> model = MoTGPTForCausalLM(config)
    >>> config.expert_size_resolved  # 4 * 256 / 8
    128
    ```
    """

    model_type = "motgpt"
    attribute_map = GPT2Config.attribute_map | {
        "num_experts": "n_experts",
        "num_local_experts": "n_experts",
        "moe_intermediate_size": "expert_size_resolved",
    }

    n_experts: int = 32
    group_size: int = 32
    expert_size: int | None = None
    mot_layers: str | list[int] = "all"
    router_temperature: float | int = 1.0
    learnable_temperature: str = "none"
    expert_activation: str = "relu"
    expert_bias: bool = False
    mot_init_scale: float | int = 0.1
    mlp_init: str = "gpt2"
    mot_emit_weights: str = "group"
    ffn_type: str = "mot"
    num_experts_per_tok: int = 1
    capacity_factor: float | int | None = 1.0
    norm_topk_prob: bool | None = None
    router_bias: bool = False
    router_aux_loss_coef: float | int | None = None
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        # Without an explicit map, the saved config.json names our classes for every Auto class, so a checkpoint
        # loads with `trust_remote_code=True` where this package is not installed.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_mot.MoTGPTConfig",
                "AutoModel": "modeling_mot.MoTGPTModel",
                "AutoModelForCausalLM": "modeling_mot.MoTGPTForCausalLM",
            },
        )
        super().__post_init__(**kwargs)
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = 0.01 if self.ffn_type == "token_choice" else 0.0
        self._check_mot_fields()

    def __setattr__(self, key, value):
        # Trainers write the coefficient into a built config (TRL's SFTTrainer does), past `_check_mot_fields`.
        if key == "router_aux_loss_coef" and value and getattr(self, "ffn_type", "token_choice") != "token_choice":
            raise ValueError(
                f"`router_aux_loss_coef`={value!r} is only for ffn_type='token_choice'; ffn_type={self.ffn_type!r} is "
                "balanced by construction and takes no load-balancing loss: leave it None (or 0)."
            )
        super().__setattr__(key, value)

    def _check_mot_fields(self) -> None:
        """Raise a `ValueError` naming the field, its value and what is allowed, for any invalid MoT field."""
        for name in ("n_experts", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.expert_size is not None and (
            isinstance(self.expert_size, bool) or not isinstance(self.expert_size, int) or self.expert_size < 1
        ):
            raise ValueError(f"`expert_size` must be None (FLOP-matched) or an integer >= 1, got {self.expert_size!r}.")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"`ffn_type` must be one of {FFN_TYPES}, got {self.ffn_type!r}.")
        if (
            isinstance(self.num_experts_per_tok, bool)
            or not isinstance(self.num_experts_per_tok, int)
            or not 1 <= self.num_experts_per_tok <= self.n_experts
        ):
            raise ValueError(
                f"`num_experts_per_tok` must be an integer in [1, n_experts={self.n_experts}], "
                f"got {self.num_experts_per_tok!r}."
            )
        if self.capacity_factor is not None and not (_is_number(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"`capacity_factor` must be None (no limit) or > 0, got {self.capacity_factor!r}.")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise ValueError(
                f"`norm_topk_prob` must be None (renormalize when num_experts_per_tok > 1), True or False, "
                f"got {self.norm_topk_prob!r}."
            )
        if not isinstance(self.router_bias, bool):
            raise ValueError(f"`router_bias` must be True or False, got {self.router_bias!r}.")
        if self.router_bias and self.ffn_type != "token_choice":
            raise ValueError(
                f"`router_bias=True` is only for ffn_type='token_choice', got ffn_type={self.ffn_type!r}: MoT's "
                "softmax over the group ignores any per-expert offset, and Expert Choice has no bias."
            )
        picks = (self.capacity_factor or 1.0) * self.group_size * self.num_experts_per_tok / self.n_experts
        if self.ffn_type == "expert_choice" and picks < 1:
            raise ValueError(
                f"`ffn_type='expert_choice'` with group_size={self.group_size}, num_experts_per_tok="
                f"{self.num_experts_per_tok}, capacity_factor={self.capacity_factor} and n_experts={self.n_experts} "
                f"gives each expert {picks:g} tokens per group; it needs at least 1 (otherwise every expert still "
                "takes one and the layer spends more FLOPs than the dense MLP). Raise group_size or lower n_experts."
            )
        if (
            self.expert_size is None
            and self.ffn_type in ("token_choice", "expert_choice")
            and self.d_ff % self.num_experts_per_tok
        ):
            raise ValueError(
                f"`expert_size=None` asks for the FLOP-matched width d_ff / num_experts_per_tok = "
                f"{self.d_ff} / {self.num_experts_per_tok}, which is not a whole number; set `expert_size` explicitly."
            )
        if (
            self.expert_size is None
            and self.ffn_type in ("mot", "uniform_mot")
            and (self.group_size * self.d_ff) % self.n_experts
        ):
            raise ValueError(
                f"`expert_size=None` asks for the FLOP-matched width group_size * d_ff / n_experts = "
                f"{self.group_size} * {self.d_ff} / {self.n_experts}, which is not a whole number; "
                "set `expert_size` explicitly or pick `n_experts` dividing group_size * d_ff."
            )
        if isinstance(self.mot_layers, str):
            if self.mot_layers not in MOT_LAYER_PRESETS:
                raise ValueError(
                    f"`mot_layers` must be one of {MOT_LAYER_PRESETS} or a list of block indices, "
                    f"got {self.mot_layers!r}."
                )
        else:
            bad = [
                i for i in self.mot_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layer
            ]
            if bad or len(set(self.mot_layers)) != len(self.mot_layers):
                raise ValueError(
                    f"`mot_layers` must list distinct block indices in [0, {self.n_layer}) (n_layer={self.n_layer}), "
                    f"got {self.mot_layers!r}."
                )
        if not (_is_number(self.router_temperature) and self.router_temperature >= 0):
            raise ValueError(
                f"`router_temperature` must be a number >= 0 (0 = discrete routing), got {self.router_temperature!r}."
            )
        if self.learnable_temperature not in LEARNABLE_TEMPERATURE_MODES:
            raise ValueError(
                f"`learnable_temperature` must be one of {LEARNABLE_TEMPERATURE_MODES}, "
                f"got {self.learnable_temperature!r}."
            )
        if self.learnable_temperature != "none" and self.router_temperature == 0:
            raise ValueError(
                f"`learnable_temperature={self.learnable_temperature!r}` needs a starting `router_temperature` > 0, "
                "got 0; a learned temperature lives in log space and cannot start at 0."
            )
        if self.expert_activation not in ACT2CLS:
            raise ValueError(
                f"`expert_activation` must be an activation name from transformers.activations "
                f"(one of {sorted(ACT2CLS)}), got {self.expert_activation!r}."
            )
        if not (_is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise ValueError(f"`router_aux_loss_coef` must be a number >= 0, got {self.router_aux_loss_coef!r}.")
        if not (_is_number(self.mot_init_scale) and self.mot_init_scale > 0):
            raise ValueError(f"`mot_init_scale` must be > 0, got {self.mot_init_scale!r}.")
        if self.mlp_init not in MLP_INITS:
            raise ValueError(f"`mlp_init` must be one of {MLP_INITS}, got {self.mlp_init!r}.")
        if self.mot_emit_weights not in EMIT_WEIGHTS:
            raise ValueError(f"`mot_emit_weights` must be one of {EMIT_WEIGHTS}, got {self.mot_emit_weights!r}.")
        if self.mot_emit_weights != "group" and self.ffn_type != "mot":
            raise ValueError(
                f"`mot_emit_weights={self.mot_emit_weights!r}` is only for ffn_type='mot', got "
                f"ffn_type={self.ffn_type!r}: the other layers have no group softmax to replace."
            )
        if self.add_cross_attention:
            raise ValueError("`add_cross_attention=True` is not supported by MoTGPT; it is a decoder-only model.")

    @property
    def d_ff(self) -> int:
        """Width of the dense MLP that a MoT layer replaces: `n_inner`, or `4 * n_embd` when it is unset."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def expert_size_resolved(self) -> int:
        """The expert width f actually used: `expert_size`, or the FLOP-matched width of `ffn_type`. Setting it (also
        as `moe_intermediate_size`) sets `expert_size`."""
        if self.expert_size is not None:
            return self.expert_size
        if self.ffn_type in ("token_choice", "expert_choice"):
            return self.d_ff // self.num_experts_per_tok
        return self.group_size * self.d_ff // self.n_experts

    @expert_size_resolved.setter
    def expert_size_resolved(self, value: int) -> None:
        self.expert_size = value

    @property
    def expert_choice_capacity(self) -> int:
        """Expert Choice: tokens each expert takes from a group, `ceil(capacity_factor * group_size *
        num_experts_per_tok / n_experts)` (no limit counts as factor 1), at most `group_size`."""
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        return min(self.group_size, math.ceil(factor * self.group_size * self.num_experts_per_tok / self.n_experts))

    @property
    def uses_groups(self) -> bool:
        """Whether a row's outputs depend on the other rows of its group, so that batches must hold whole groups:
        some block has an expert layer other than Token Choice. (Token Choice has no groups; with a capacity limit
        what it drops still depends on how many tokens the batch holds.)"""
        return bool(self.mot_layer_indices) and self.ffn_type != "token_choice"

    @property
    def mot_layer_indices(self) -> list[int]:
        """Sorted indices of the blocks that use a MoT layer."""
        if self.mot_layers == "all":
            return list(range(self.n_layer))
        if self.mot_layers == "second_half":
            return list(range(self.n_layer // 2, self.n_layer))
        return sorted(self.mot_layers)


__all__ = ["MoTGPTConfig"]
