"""Model presets of `mot-train`: MoT models of several sizes and their dense twins, and the authors' recipes."""

from typing import Any

from .configuration_mot import MoTGPTConfig

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

# The authors' recipes (llm-random, branch `mot_configs`): every field of this model and of `mot-train`'s training
# arguments that one of their configs sets, with its value and the file that sets it (a config inherits from its
# `parent:` chain). "k" is the mixtures per expert, n_experts / group_size, resolved against a backbone's G. Their
# init ("truncated_normal" at `init_scale`) covers every weight; here it covers the expert layers (`mot_init_scale`)
# and, through `mlp_init="experts"`, the dense MLPs, while attention and embeddings keep GPT-2's init. Left out:
# bf16 (`mixed_precision`: a device choice, `--bf16`), the data (C4, 256 x 256 tokens a step) and the step counts.
# The training fields are `mot-train`'s defaults for the recipe's presets and are applied by the quality benchmark.
POC_SOURCE = "configs/baselines/gpt/mot/mini.yaml"
MEDIUM_SOURCE = "configs/mot/medium_32E_16.yaml"
COMMON_SOURCE = "configs/baselines/common.yaml"
RECIPES: dict[str, dict[str, tuple[Any, str]]] = {
    # The proof of concept (4 blocks, d 256, 4 heads, G 32, E 512: the `small` backbone).
    "poc": {
        "k": (16, f"{POC_SOURCE}: n_experts 512, group_size 32"),
        "mot_layers": ("all", f"{POC_SOURCE}: ff_mode cont_moe (every block)"),
        "router_temperature": (1.0, f"{POC_SOURCE}: temperature 1.0"),
        "mot_init_scale": (1.0, f"{POC_SOURCE}: init_type truncated_normal, init_scale 1.0"),
        "mlp_init": ("experts", f"{POC_SOURCE}: the same init for every weight, the dense twin's MLP too"),
        "learning_rate": (2e-3, f"{POC_SOURCE}: learning_rate 2e-3"),
        "weight_decay": (0.0, f"set nowhere in {POC_SOURCE} and its parents: llm-random's default, 0.0"),
        "warmup_steps": (0.01, f"{COMMON_SOURCE}: lr_warmup_steps 2500 of final_lr_step 250000"),
        "lr_scheduler_type": ("cosine_with_min_lr", f"{COMMON_SOURCE}: scheduler cosine"),
        "lr_scheduler_kwargs": ({"min_lr_rate": 0.1}, f"{COMMON_SOURCE}: final_lr_fraction 0.1"),
        "max_grad_norm": (0.5, f"{COMMON_SOURCE}: grad_clip 0.5"),
    },
    # MoT-Medium/32E/16 (8 blocks, d 512, 8 heads, G 32, E 512 in blocks 4-7: the `medium` backbone, k 16).
    "medium": {
        "k": (16, f"{MEDIUM_SOURCE}: n_experts 512, group_size 32"),
        "mot_layers": ("second_half", f"{MEDIUM_SOURCE}: general_ff_layer_config vanilla x4, cont_moe x4"),
        "router_temperature": (1.0, f"{MEDIUM_SOURCE}: temperature 1.0"),
        "mot_init_scale": (0.1, f"{MEDIUM_SOURCE}: init_type truncated_normal, init_scale 0.1"),
        "mlp_init": ("experts", f"{MEDIUM_SOURCE}: the same init for every weight, the dense blocks' MLPs too"),
        "learning_rate": (7e-4, f"{MEDIUM_SOURCE}: learning_rate 7e-4"),
        "weight_decay": (0.1, f"{MEDIUM_SOURCE}: weight_decay 0.1"),
        "warmup_steps": (0.0167, f"{COMMON_SOURCE}: lr_warmup_steps 2500, of {MEDIUM_SOURCE}: final_lr_step 150000"),
        "lr_scheduler_type": ("cosine_with_min_lr", f"{COMMON_SOURCE}: scheduler cosine"),
        "lr_scheduler_kwargs": ({"min_lr_rate": 0.1}, f"{COMMON_SOURCE}: final_lr_fraction 0.1"),
        "max_grad_norm": (0.5, f"{COMMON_SOURCE}: grad_clip 0.5"),
    },
}
# What a dense twin keeps of a recipe: all but the fields of the MoT layers (the init of its MLP included).
MOT_ONLY_FIELDS = ("k", "mot_layers", "router_temperature")


def recipe_fields(recipe: str, dense: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe's model fields (with "k" unresolved) and training fields; for its dense twin, without the MoT
    layers' fields."""
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}, got {recipe!r}.")
    model_fields = MoTGPTConfig.__dataclass_fields__.keys() | {"k"}
    model, training = {}, {}
    for name, (value, _) in RECIPES[recipe].items():
        if not (dense and name in MOT_ONLY_FIELDS):
            (model if name in model_fields else training)[name] = value
    return model, training


def _recipe_preset(backbone: str, recipe: str, dense: bool) -> dict[str, Any]:
    model, _ = recipe_fields(recipe, dense)
    fields = _BACKBONES[backbone] | {key: value for key, value in model.items() if key != "k"}
    if "k" in model:
        fields["n_experts"] = model["k"] * fields["group_size"]
    return fields | ({"mot_layers": []} if dense else {})


PRESETS = {f"mot-{name}": fields | {"activation_function": "relu"} for name, fields in _BACKBONES.items()} | {
    f"dense-{name}": fields | {"activation_function": "relu", "mot_layers": []} for name, fields in _BACKBONES.items()
}
# The recipes on their own backbones: `mot-poc` / `dense-poc` and `mot-medium-32e16` / `dense-medium-32e16` (the
# authors' file name: `mot-medium` is already the paper's MoT-Medium/32E/1).
RECIPE_PRESETS = {"poc": ("poc", "small"), "medium-32e16": ("medium", "medium")}
PRESETS |= {
    f"{family}-{name}": _recipe_preset(backbone, recipe, family == "dense") | {"activation_function": "relu"}
    for name, (recipe, backbone) in RECIPE_PRESETS.items()
    for family in ("mot", "dense")
}

# The quality benchmark's best MoT model at its budget (1,000 steps of 32 x 64 tokens on the bundled corpus) and its
# dense twin, each at its tuned learning rate (docs/results.md, "The comparison"): MoT k 16 (E 256) in blocks 2-3 at
# T 0.1; every MLP with the experts' init, as in the benchmark. Not an authors' recipe: the project's own measurement.
TUNED_PRESETS = {
    "mot-tiny-tuned": (
        PRESETS["mot-tiny"] | {"n_experts": 256, "mot_layers": "second_half", "router_temperature": 0.1},
        {"learning_rate": 4e-3},
    ),
    "dense-tiny-tuned": (PRESETS["dense-tiny"], {"learning_rate": 4e-3}),
}
PRESETS |= {name: fields | {"mlp_init": "experts"} for name, (fields, _) in TUNED_PRESETS.items()}


def preset_config(preset: str, **overrides: Any) -> MoTGPTConfig:
    """The `MoTGPTConfig` of a named preset, with any config field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
    fields = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} | PRESETS[preset] | overrides
    return MoTGPTConfig(**fields)


def preset_training(preset: str) -> dict[str, Any]:
    """The training arguments a preset's recipe or tuning sets (`mot-train`'s defaults for it; empty for other
    presets)."""
    for name, (recipe, _) in RECIPE_PRESETS.items():
        if preset in (f"mot-{name}", f"dense-{name}"):
            return recipe_fields(recipe)[1]
    return dict(TUNED_PRESETS[preset][1]) if preset in TUNED_PRESETS else {}
