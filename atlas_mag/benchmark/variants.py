"""Which models are benchmarked: Atlas-MAG with test-time learning on and off, `torch.compile`d, and decoding
without a cache as the original implementation does, against a `transformers.LlamaForCausalLM` of the same width,
depth, heads, vocabulary and FFN size (full causal attention, KV cache, sdpa); and the small model of quick runs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..configuration_atlas import AtlasMAGConfig
from ..modeling_atlas import AtlasMAGForCausalLM

ATLAS_TTL_ON = "atlas_ttl_on"
ATLAS_TTL_OFF = "atlas_ttl_off"
ATLAS_COMPILED = "atlas_ttl_on_compiled"
ATLAS_NO_CACHE = "atlas_no_cache"
LLAMA = "llama"
VARIANT_LABELS = {
    ATLAS_TTL_ON: "Atlas TTL on",
    ATLAS_TTL_OFF: "Atlas TTL off",
    ATLAS_COMPILED: "Atlas TTL on, compiled",
    ATLAS_NO_CACHE: "Atlas, no cache (original decoding)",
    LLAMA: "Llama",
}
ATLAS_VARIANTS = (ATLAS_TTL_ON, ATLAS_TTL_OFF)
# Variants measured in the decode section only.
DECODE_ONLY_VARIANTS = (ATLAS_NO_CACHE,)

# A small Atlas-MAG for CPU runs: windows and chunks shrink with the lengths of QUICK_GRID, in the published
# model's proportions (sliding window 512 : Omega window 256 : TTL chunk 256).
QUICK_MODEL = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=344,
    sliding_window=128,
    memory_key_dim=16,
    poly_rank=128,
    omega_window=64,
    gamma_gate_hidden_size=16,
    ttl_chunk_size=64,
)


def quick_config() -> AtlasMAGConfig:
    return AtlasMAGConfig(**QUICK_MODEL)


def llama_config_for(config: AtlasMAGConfig, max_position_embeddings: int) -> LlamaConfig:
    """A Llama with the Atlas model's width, depth, heads (no grouped KV), vocabulary, FFN size, RoPE base and
    norm epsilon, using full causal sdpa attention."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="sdpa",
    )


@dataclass
class Variant:
    """A model and how to call it: `call(**kwargs)` runs a forward pass with the variant's extra arguments.
    `decode_warmup` untimed decode steps come before the grid's warm-up (a compiled model compiles its decode
    graphs, with and without a memory update, in its first steps). `recompute_prefix` decodes without a cache:
    every step is a forward pass over the whole sequence so far, as the original implementation generates."""

    name: str
    model: nn.Module
    forward: Callable[..., Any]
    extra_kwargs: dict[str, Any]
    decode_warmup: int = 0
    recompute_prefix: bool = False

    def __call__(self, **kwargs: Any) -> Any:
        return self.forward(**kwargs, **self.extra_kwargs)


COMPILE_SCOPES = ("chunks", "blocks", "model")


def build_variants(
    atlas_config: AtlasMAGConfig,
    max_length: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_backend: str | Callable[..., Any] | None,
    seed: int = 0,
    compile_scope: str = "chunks",
    compile_mode: str | None = None,
) -> dict[str, Variant]:
    """The Atlas model (TTL on and off share its weights) and the same-size Llama, randomly initialised, and a
    decode-only baseline: the same Atlas weights generating the way the original implementation does (no cache,
    the whole prefix recomputed for every token, TTL off as in its `eval()`; our attention kernels, so the
    original's T x T masks make it slower still). The compiled variant is a copy whose blocks are compiled and
    run one TTL chunk at a time (`compile_scope="chunks"`, `compile_by_chunk`: the same graphs serve every
    layer and every prompt length), a copy whose blocks are compiled one by one (`"blocks"`, regional
    compilation: every new number of TTL chunks compiles anew) or the same module (`"model"`: `torch.compile`
    of the whole forward). `compile_mode` is `torch.compile`'s mode (e.g. "reduce-overhead": CUDA graphs on a
    GPU)."""
    torch.manual_seed(seed)
    atlas = AtlasMAGForCausalLM(atlas_config).to(device=device, dtype=dtype)
    llama = LlamaForCausalLM(llama_config_for(atlas_config, max_length)).to(device=device, dtype=dtype)
    variants = {
        ATLAS_TTL_ON: Variant(ATLAS_TTL_ON, atlas, atlas, {"ttl": True}),
        ATLAS_TTL_OFF: Variant(ATLAS_TTL_OFF, atlas, atlas, {"ttl": False}),
        ATLAS_NO_CACHE: Variant(ATLAS_NO_CACHE, atlas, atlas, {"ttl": False}, recompute_prefix=True),
    }
    if compile_backend is not None:
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        if compile_scope == "model":
            compiled_model, compiled_forward = atlas, torch.compile(atlas, backend=compile_backend, mode=compile_mode)
        else:
            compiled_model = compiled_forward = copy.deepcopy(atlas)
            if compile_scope == "chunks":
                compiled_model.compile_by_chunk(backend=compile_backend, mode=compile_mode)
            else:
                for block in compiled_model.model.layers:
                    block.compile(backend=compile_backend, mode=compile_mode)
        variants[ATLAS_COMPILED] = Variant(
            ATLAS_COMPILED,
            compiled_model,
            compiled_forward,
            {"ttl": True},
            decode_warmup=2 * atlas_config.ttl_chunk_size,
        )
    variants[LLAMA] = Variant(LLAMA, llama, llama, {})
    return variants
