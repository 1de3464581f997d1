"""Annealing the MoT temperature to 0 (discrete routing) over the end of training: `--anneal_temperature`."""

import math
from typing import Any

from transformers import TrainerCallback

from .modeling_mot import MoTLayer


def annealed_temperature(step: int, max_steps: int, start: float, fraction: float) -> float:
    """MoT temperature after `step` of `max_steps` optimizer steps: `start` until the last `fraction` of the run,
    then a cosine from `start` down to exactly 0 at `max_steps`."""
    begin = max_steps * (1 - fraction)
    if step <= begin:
        return float(start)
    progress = (step - begin) / (max_steps - begin)
    return 0.0 if progress >= 1 else float(start) * 0.5 * (1 + math.cos(math.pi * progress))


def check_annealing(config: Any, fraction: float) -> None:
    """Refuse temperature annealing for a model or fraction it cannot apply to, before any training."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`anneal_fraction` must be in (0, 1], got {fraction!r}.")
    ffn_type = getattr(config, "ffn_type", None)
    if ffn_type != "mot" or not config.mot_layer_indices:
        mot_layers = getattr(config, "mot_layers", None)
        raise ValueError(
            f"`anneal_temperature` needs a MoTGPT model with MoT layers (ffn_type 'mot', non-empty mot_layers), "
            f"got ffn_type={ffn_type!r}, mot_layers={mot_layers!r}."
        )
    if config.learnable_temperature != "none":
        raise ValueError(
            f"`anneal_temperature` sets the temperature itself: it needs learnable_temperature='none', "
            f"got {config.learnable_temperature!r}."
        )
    if not config.router_temperature > 0:
        raise ValueError(
            f"`anneal_temperature` needs a starting router_temperature > 0, got {config.router_temperature!r}."
        )


class TemperatureAnnealingCallback(TrainerCallback):
    """Anneals every MoT layer's temperature to 0 over the last `fraction` of training (see `annealed_temperature`).

    The temperature is a function of the global step only, so a resumed run continues the schedule where it stopped.
    It is set, in the layers and in `config.router_temperature`, before each step and after it: with s steps done,
    to T(s), so step s + 1 trains at T(s), and evaluations and the checkpoint after step s see T(s). The checkpoint of
    step s thus stores the temperature of the step after it (step s itself ran at T(s - 1)), and the final model
    stores T(max_steps) = 0 (discrete routing), a temperature no step trained at exactly: the last one ran at
    T(max_steps - 1) > 0.
    """

    def __init__(self, start_temperature: float, fraction: float):
        self.start_temperature = start_temperature
        self.fraction = fraction

    def _apply(self, state, model) -> None:
        temperature = annealed_temperature(state.global_step, state.max_steps, self.start_temperature, self.fraction)
        for module in model.modules():
            if isinstance(module, MoTLayer):
                module.temperature = temperature
        model.config.router_temperature = temperature

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)
