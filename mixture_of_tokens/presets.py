"""Model presets of `mot-train`: MoT models of several sizes and their dense twins."""

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
PRESETS = {f"mot-{name}": fields | {"activation_function": "relu"} for name, fields in _BACKBONES.items()} | {
    f"dense-{name}": fields | {"activation_function": "relu", "mot_layers": []} for name, fields in _BACKBONES.items()
}


def preset_config(preset: str, **overrides: Any) -> MoTGPTConfig:
    """The `MoTGPTConfig` of a named preset, with any config field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
    fields = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} | PRESETS[preset] | overrides
    return MoTGPTConfig(**fields)
