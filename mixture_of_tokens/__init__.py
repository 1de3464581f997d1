"""Mixture of Tokens (continuous Mixture of Experts) for Hugging Face Transformers.

Importing this package registers `MoTGPTConfig` with `AutoConfig` and the models with `AutoModel` and
`AutoModelForCausalLM`, and marks them for remote code, so that `save_pretrained` copies their source files and a
saved checkpoint loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mot import MoTGPTConfig
from .modeling_mot import MoTGPTForCausalLM, MoTGPTModel, MoTGPTPreTrainedModel, MoTLayer, mixing_weights

__version__ = "0.1.0"

AutoConfig.register(MoTGPTConfig.model_type, MoTGPTConfig)
AutoModel.register(MoTGPTConfig, MoTGPTModel)
AutoModelForCausalLM.register(MoTGPTConfig, MoTGPTForCausalLM)
MoTGPTConfig.register_for_auto_class()
MoTGPTModel.register_for_auto_class("AutoModel")
MoTGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MoTGPTConfig",
    "MoTGPTForCausalLM",
    "MoTGPTModel",
    "MoTGPTPreTrainedModel",
    "MoTLayer",
    "mixing_weights",
]
