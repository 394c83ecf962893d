"""Atlas-MAG, a test-time-learning language model, as a Hugging Face Transformers model.

Importing the package registers `AtlasMAGConfig` and the models with the Auto classes, so that
`AutoConfig`, `AutoModel` and `AutoModelForCausalLM` resolve `model_type="atlas_mag"`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_atlas import AtlasMAGCache, AtlasMAGLayerState
from .configuration_atlas import AtlasMAGConfig
from .memory_atlas import AtlasMAGMemory
from .modeling_atlas import AtlasMAGForCausalLM, AtlasMAGModel, AtlasMAGPreTrainedModel

AutoConfig.register(AtlasMAGConfig.model_type, AtlasMAGConfig, exist_ok=True)
AutoModel.register(AtlasMAGConfig, AtlasMAGModel, exist_ok=True)
AutoModelForCausalLM.register(AtlasMAGConfig, AtlasMAGForCausalLM, exist_ok=True)

__all__ = [
    "AtlasMAGCache",
    "AtlasMAGConfig",
    "AtlasMAGForCausalLM",
    "AtlasMAGLayerState",
    "AtlasMAGMemory",
    "AtlasMAGModel",
    "AtlasMAGPreTrainedModel",
]
