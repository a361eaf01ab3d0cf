"""SparseMoE-VLM: a vision-language model with a sparse, modality-aware Mixture-of-Experts decoder, as a
Hugging Face Transformers model.

Importing the package registers the configs and models with the Auto classes; saved checkpoints also carry the
modeling code, so they load with `trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMTextConfig
from .image_processing_sparsemoe_vlm import SparseMoEVLMImageProcessor
from .modeling_sparsemoe_vlm import (
    SparseMoEVLMCausalLMOutputWithPast,
    SparseMoEVLMForConditionalGeneration,
    SparseMoEVLMModel,
    SparseMoEVLMPreTrainedModel,
    SparseMoEVLMRouting,
    SparseMoEVLMTextModel,
)
from .placement import expert_offload_device_map
from .processing_sparsemoe_vlm import SparseMoEVLMProcessor, build_processor, build_tokenizer


__version__ = "0.1.0"

AutoConfig.register(SparseMoEVLMConfig.model_type, SparseMoEVLMConfig, exist_ok=True)
AutoConfig.register(SparseMoEVLMTextConfig.model_type, SparseMoEVLMTextConfig, exist_ok=True)
AutoModel.register(SparseMoEVLMConfig, SparseMoEVLMModel, exist_ok=True)
AutoModel.register(SparseMoEVLMTextConfig, SparseMoEVLMTextModel, exist_ok=True)
AutoModelForImageTextToText.register(SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(SparseMoEVLMConfig, image_processor_classes={"pil": SparseMoEVLMImageProcessor},
                            exist_ok=True)
AutoProcessor.register(SparseMoEVLMConfig, SparseMoEVLMProcessor, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the defining files next to the weights.
SparseMoEVLMConfig.register_for_auto_class()
SparseMoEVLMModel.register_for_auto_class("AutoModel")
SparseMoEVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SparseMoEVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
SparseMoEVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "SparseMoEVLMCausalLMOutputWithPast",
    "SparseMoEVLMConfig",
    "SparseMoEVLMForConditionalGeneration",
    "SparseMoEVLMImageProcessor",
    "SparseMoEVLMModel",
    "SparseMoEVLMPreTrainedModel",
    "SparseMoEVLMProcessor",
    "SparseMoEVLMRouting",
    "SparseMoEVLMTextConfig",
    "SparseMoEVLMTextModel",
    "build_processor",
    "build_tokenizer",
    "expert_offload_device_map",
]
