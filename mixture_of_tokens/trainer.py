"""`MoTTrainer`: the `Trainer` of `mot-train`, with MoT's weight-decay exemptions and FSDP on CPU and in saving."""

import os
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, Trainer

from .modeling_mot import save_filler_bank

# Parameters exempt from weight decay besides those `Trainer` finds by name (biases, expert and router biases
# included, and LayerNorms): a learned temperature would be pulled towards T = 1.
NO_DECAY_SUFFIXES = ("log_temperature",)


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameters `MoTTrainer` decays: those `Trainer` decays (its rule reads only the model) but learned
    temperatures."""
    return [name for name in Trainer.get_decay_parameter_names(None, model) if not name.endswith(NO_DECAY_SUFFIXES)]


class MoTTrainer(Trainer):
    """`Trainer` that also exempts learned MoT temperatures from weight decay, shards with FSDP on
    CPU too, and saves an FSDP model whole."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def create_accelerator_and_postprocess(self) -> None:
        """As `Trainer`'s, with FSDP on CPU too, and under `accelerate launch` with an FSDP config that names no wrap
        policy, one FSDP unit per `_no_split_modules` block (`MoTGPTBlock`), as `--fsdp` does (accelerate's own
        default is one unit for the whole model, which gathers every parameter at once)."""
        if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # set by `accelerate launch` with an FSDP config
            os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        # Read again: with `--fsdp`, `Trainer` sets the flag in the call above.
        if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            # Accelerate turns FSDP on only on accelerators and would silently train with DDP on CPU, although FSDP2
            # shards over gloo. Set up as accelerate does on a GPU, where both states record FSDP.
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            if state.mixed_precision != "no":
                state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer`'s, but an FSDP model is saved whole from a plain copy (FSDP2 changes the model's class, so
        its own `save_pretrained` would write torch's source files and their names in `auto_map`), and a sharded
        run's checkpoints hold the config and tokenizer beside their shards."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        # A sharded run's checkpoint: its weights are the shards `Trainer` writes next to it.
        shards_only = _internal_call and "SHARDED" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        state_dict = None if shards_only else self.accelerator.get_state_dict(self.model)  # a gather: every process
        if not self.args.should_save:
            return
        if shards_only:
            self.model.config.save_pretrained(output_dir)
            if getattr(self.model, "group_fillers", None) is not None:  # a MoTGPT model's bank: not in the shards
                save_filler_bank(self.model.group_fillers.cpu(), output_dir, self.model.config.group_size)
        else:
            unsharded_copy(self.model, state_dict).save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / "training_args.bin")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain model of the class FSDP2 wrapped in `model`, holding the gathered `state_dict` (no second copy)."""
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        plain = model_class(model.config)
    plain.load_state_dict(state_dict, assign=True)
    plain.tie_weights()  # `assign` replaced the tied output embedding by a copy
    plain.generation_config = model.generation_config
    if getattr(model, "group_fillers", None) is not None:  # a MoTGPT model's filler bank is not in the state dict
        plain.set_group_fillers(model.group_fillers)
    return plain
