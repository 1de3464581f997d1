"""Configuration of MoTGPT: GPT-2 with Mixture of Tokens feed-forward layers."""

import math
from dataclasses import field, fields

from transformers import GPT2Config
from transformers.activations import ACT2CLS

FFN_TYPES = ("mot", "uniform_mot", "token_choice", "expert_choice")
MOT_LAYER_PRESETS = ("all", "second_half")


def is_number(value: object) -> bool:
    """A real number that is not NaN (an int or float, not a bool or a string such as a misparsed command-line
    value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _integer(minimum: int, none_means: str | None = None, allowed: str | None = None) -> dict:
    """Field metadata: an integer >= `minimum`, or None where `none_means` says what None stands for."""
    allowed = allowed or f"an integer >= {minimum}"

    def check(value: object) -> bool:
        if none_means and value is None:
            return True
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    return {"check": check, "allowed": f"None ({none_means}) or {allowed}" if none_means else allowed}


def _number(minimum: float, inclusive: bool, none_means: str | None = None) -> dict:
    """Field metadata: a number >= (or >) `minimum`, or None where `none_means` says what None stands for."""
    allowed = f"a number {'>=' if inclusive else '>'} {minimum:g}"

    def check(value: object) -> bool:
        if none_means and value is None:
            return True
        return is_number(value) and (value >= minimum if inclusive else value > minimum)

    return {"check": check, "allowed": f"None ({none_means}) or {allowed}" if none_means else allowed}


def _one_of(choices: tuple) -> dict:
    """Field metadata: one of `choices` (compared by equality; booleans also by type)."""
    return {
        "check": lambda value: any(value == c and type(value) is type(c) for c in choices),
        "allowed": f"one of {choices}",
    }


def _mot_layers(value: object) -> bool:
    if isinstance(value, str):
        return value in MOT_LAYER_PRESETS
    return isinstance(value, (list, tuple))  # the indices are checked against n_layer in `validate_architecture`


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
            Token Choice: an expert keeps at most `ceil(capacity_factor * tokens * num_experts_per_tok /
            n_experts)` assignments of a batch; later ones are dropped (gate 0: no update), so what a row gets
            depends on the batch. The experts compute every assignment either way. `None` means no limit: nothing
            is dropped, and a row's output does not depend on the rest of the batch. Expert Choice: see
            `num_experts_per_tok`.
        norm_topk_prob (`bool`, *optional*):
            Token Choice: whether a token's gates (the router probabilities of its chosen experts) are renormalized
            to sum to 1. `None` (default) renormalizes when `num_experts_per_tok > 1` (Mixtral) and keeps the raw
            probability for a single expert (Switch, whose router then learns through its gate). `True` always
            renormalizes (with one expert the gate is 1, as transition tuning uses it); `False` never does.
        expert_choice_output_norm (`bool`, *optional*, defaults to `False`):
            Expert Choice: whether each token's summed update goes through a LayerNorm (learned scale and bias)
            before it joins the residual stream, as in the authors' Expert Choice (llm-random's
            `layer_norm_in_expert_choice`). Without it the update is the experts' outputs weighted by softmax scores
            over all experts, which starts far smaller than a dense MLP's. Off by default, so that checkpoints saved
            before the field existed keep their behaviour. Only for `ffn_type="expert_choice"`.
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
            Whether the model returns the router (controller) logits of each expert layer that has a router (every
            type but `"uniform_mot"`), of shape `(batch_size * seq_len, n_experts)` as in Mixtral.

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

    # Each field's type and default, and in its metadata the rule `validate_architecture` checks it against (with
    # "allowed", what the error says is allowed). Rules between fields are in `validate_architecture` itself.
    n_experts: int = field(default=32, metadata=_integer(1))
    group_size: int = field(default=32, metadata=_integer(1))
    expert_size: int | None = field(default=None, metadata=_integer(1, none_means="FLOP-matched"))
    mot_layers: str | list[int] = field(
        default="all",
        metadata={"check": _mot_layers, "allowed": f"one of {MOT_LAYER_PRESETS} or a list of block indices"},
    )
    router_temperature: float | int = field(default=1.0, metadata=_number(0, inclusive=True))
    learnable_temperature: str = field(default="none", metadata=_one_of(("none", "layer", "expert")))
    expert_activation: str = field(
        default="relu",
        metadata={
            "check": lambda value: value in ACT2CLS,
            "allowed": f"an activation name from transformers.activations (one of {sorted(ACT2CLS)})",
        },
    )
    expert_bias: bool = field(default=False, metadata=_one_of((True, False)))
    mot_init_scale: float | int = field(default=0.1, metadata=_number(0, inclusive=False))
    mlp_init: str = field(default="gpt2", metadata=_one_of(("gpt2", "experts")))
    mot_emit_weights: str = field(default="group", metadata=_one_of(("group", "experts")))
    ffn_type: str = field(default="mot", metadata=_one_of(FFN_TYPES))
    num_experts_per_tok: int = field(default=1, metadata=_integer(1, allowed="an integer in [1, n_experts]"))
    capacity_factor: float | int | None = field(
        default=1.0, metadata=_number(0, inclusive=False, none_means="no limit")
    )
    norm_topk_prob: bool | None = field(default=None, metadata=_one_of((None, True, False)))
    expert_choice_output_norm: bool = field(default=False, metadata=_one_of((True, False)))
    router_bias: bool = field(default=False, metadata=_one_of((True, False)))
    router_aux_loss_coef: float | int | None = field(default=None, metadata=_number(0, inclusive=True))
    output_router_logits: bool = field(default=False, metadata=_one_of((True, False)))

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
        self.validate_architecture()

    def validate(self) -> None:
        """GPT-2's validators (run by `save_pretrained` too), then this config's own ([`validate_architecture`]): a
        config changed after it was built, as trainers change it, is checked again before it is saved."""
        super().validate()
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the field, its value and what is allowed, for any invalid MoT field: first
        each field against the rule in its metadata, then the rules between fields."""
        for spec in fields(self):
            if "check" in spec.metadata and not spec.metadata["check"](getattr(self, spec.name)):
                raise ValueError(f"`{spec.name}` must be {spec.metadata['allowed']}, got {getattr(self, spec.name)!r}.")
        if self.num_experts_per_tok > self.n_experts:
            raise ValueError(
                f"`num_experts_per_tok` must be an integer in [1, n_experts={self.n_experts}], "
                f"got {self.num_experts_per_tok!r}."
            )
        if not isinstance(self.mot_layers, str) and (
            len(set(self.mot_layers)) != len(self.mot_layers)
            or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in self.mot_layers
            )
        ):
            raise ValueError(
                f"`mot_layers` must list distinct block indices in [0, {self.n_layer}) (n_layer={self.n_layer}), "
                f"got {self.mot_layers!r}."
            )
        if self.router_bias and self.ffn_type != "token_choice":
            raise ValueError(
                f"`router_bias=True` is only for ffn_type='token_choice', got ffn_type={self.ffn_type!r}: MoT's "
                "softmax over the group ignores any per-expert offset, and Expert Choice has no bias."
            )
        if self.expert_choice_output_norm and self.ffn_type != "expert_choice":
            raise ValueError(
                f"`expert_choice_output_norm=True` is only for ffn_type='expert_choice', got ffn_type="
                f"{self.ffn_type!r}: the other layer types have no such norm."
            )
        self.check_router_aux_loss_coef()
        picks = (self.capacity_factor or 1.0) * self.group_size * self.num_experts_per_tok / self.n_experts
        if self.ffn_type == "expert_choice" and picks < 1:
            raise ValueError(
                f"`ffn_type='expert_choice'` with group_size={self.group_size}, num_experts_per_tok="
                f"{self.num_experts_per_tok}, capacity_factor={self.capacity_factor} and n_experts={self.n_experts} "
                f"gives each expert {picks:g} tokens per group; it needs at least 1 (otherwise every expert still "
                "takes one and the layer spends more FLOPs than the dense MLP). Raise group_size or lower n_experts."
            )
        if self.expert_size is None and self.ffn_type in ("token_choice", "expert_choice"):
            if self.d_ff % self.num_experts_per_tok:
                raise ValueError(
                    f"`expert_size=None` asks for the FLOP-matched width d_ff / num_experts_per_tok = "
                    f"{self.d_ff} / {self.num_experts_per_tok}, which is not a whole number; set `expert_size` "
                    "explicitly."
                )
        elif self.expert_size is None and (self.group_size * self.d_ff) % self.n_experts:
            raise ValueError(
                f"`expert_size=None` asks for the FLOP-matched width group_size * d_ff / n_experts = "
                f"{self.group_size} * {self.d_ff} / {self.n_experts}, which is not a whole number; "
                "set `expert_size` explicitly or pick `n_experts` dividing group_size * d_ff."
            )
        if self.learnable_temperature != "none" and self.router_temperature == 0:
            raise ValueError(
                f"`learnable_temperature={self.learnable_temperature!r}` needs a starting `router_temperature` > 0, "
                "got 0; a learned temperature lives in log space and cannot start at 0."
            )
        if self.mot_emit_weights != "group" and self.ffn_type != "mot":
            raise ValueError(
                f"`mot_emit_weights={self.mot_emit_weights!r}` is only for ffn_type='mot', got "
                f"ffn_type={self.ffn_type!r}: the other layers have no group softmax to replace."
            )
        if self.add_cross_attention:
            raise ValueError("`add_cross_attention=True` is not supported by MoTGPT; it is a decoder-only model.")
        super().validate_architecture()

    def check_router_aux_loss_coef(self) -> None:
        """Refuse a load-balancing coefficient for a layer that takes none. Also called by the model at every forward
        pass, since trainers (TRL's `SFTTrainer`) write the coefficient into a built config."""
        if self.router_aux_loss_coef and self.ffn_type != "token_choice":
            raise ValueError(
                f"`router_aux_loss_coef`={self.router_aux_loss_coef!r} is only for ffn_type='token_choice'; "
                f"ffn_type={self.ffn_type!r} is balanced by construction and takes no load-balancing loss: leave it "
                "None (or 0)."
            )

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
