"""The vLLM plugin (entry point `vllm.general_plugins: atlas_mag`): vLLM calls `register` in each of its processes
before it loads a model, so that `vllm serve <folder>` and `vllm.LLM(<folder>)` run a saved Atlas-MAG folder
(`architectures: ["AtlasMAGForCausalLM"]`) with `atlas_mag.vllm_model`, its memory learning per request.

Importing `atlas_mag` registers `AtlasMAGConfig` with Transformers' `AutoConfig`, so vLLM reads the folder's
config without `trust_remote_code`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.models.config import MambaModelConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

ARCHITECTURE = "AtlasMAGForCausalLM"
# The name of our state backend (`atlas_mag.vllm_model.AtlasMAGStateBackend`) among vLLM's Mamba-like backends.
STATE_BACKEND = "ATLAS_MAG"
logger = init_logger(__name__)


class AtlasMAGVllmConfig(MambaModelConfig):
    """Checks a vLLM configuration for Atlas-MAG before the engine starts; refuses what cannot be served, with
    the reason."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            raise ValueError(
                "Atlas-MAG cannot share prefixes between requests (--enable-prefix-caching): a request's memory "
                "has learned from its whole prefix, so a cached prefix would need the memory state at that point "
                "too; run with --no-enable-prefix-caching"
            )
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "Atlas-MAG does not support speculative decoding: the memory learns from every token it sees and "
                "cannot be rolled back to drop rejected draft tokens"
            )
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "Atlas-MAG on vLLM runs on one device: its layers and per-request memory states are not sharded "
                f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
                f"pipeline_parallel_size={parallel.pipeline_parallel_size})"
            )
        super().verify_and_update_config(vllm_config)
        compilation = vllm_config.compilation_config
        if compilation.cudagraph_mode is not None and compilation.cudagraph_mode.has_full_cudagraphs():
            # Each step splits its requests on the host (decodes, then each prefill chunk), which a captured graph
            # cannot replay.
            from vllm.config import CUDAGraphMode

            logger.warning("Atlas-MAG runs without CUDA graphs: cudagraph_mode %s -> NONE", compilation.cudagraph_mode)
            compilation.cudagraph_mode = CUDAGraphMode.NONE


def register() -> None:
    """Register the model, its config checks and its state backend with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    import atlas_mag  # noqa: F401  (registers AtlasMAGConfig with AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "atlas_mag.vllm_model:AtlasMAGForCausalLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = AtlasMAGVllmConfig
    if STATE_BACKEND not in MambaAttentionBackendEnum.__members__:
        register_backend(STATE_BACKEND, "atlas_mag.vllm_model.AtlasMAGStateBackend", is_mamba=True)
