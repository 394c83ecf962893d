"""A cProfile of Atlas-MAG prefill and decoding, to find what to optimise."""

from __future__ import annotations

import cProfile
import io
import pstats

import torch

from ..cli import synchronize
from ..configuration_atlas import AtlasMAGConfig
from ..modeling_atlas import AtlasMAGForCausalLM
from .measure import random_ids


def profile_atlas(
    config: AtlasMAGConfig,
    prefill_length: int,
    decode_tokens: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ttl: bool = True,
    top: int = 20,
) -> str:
    """cProfile of an Atlas-MAG prefill of `prefill_length` tokens, then of `decode_tokens` single-token
    steps: the functions with the most cumulative and own time, as text (to find what to optimise)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = AtlasMAGForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = random_ids(config.vocab_size, 1, prefill_length, device, seed=0)
    steps = random_ids(config.vocab_size, 1, decode_tokens, device, seed=1)
    with torch.inference_mode():
        model(input_ids=ids[:, : min(prefill_length, 2 * config.ttl_chunk_size)], ttl=ttl)  # warm-up
    sections = []
    cache = None

    def prefill() -> None:
        nonlocal cache
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1, ttl=ttl).cache

    def decode() -> None:
        nonlocal cache
        for index in range(decode_tokens):
            cache = model(input_ids=steps[:, index : index + 1], cache=cache, use_cache=True, ttl=ttl).cache

    for title, function in (
        (f"prefill of {prefill_length} tokens", prefill),
        (f"{decode_tokens} decode steps", decode),
    ):
        profiler = cProfile.Profile()
        with torch.inference_mode():
            synchronize(device)
            profiler.enable()
            function()
            synchronize(device)
            profiler.disable()
        for sort in ("cumulative", "tottime"):
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(sort)
            stats.print_stats(top)
            body = stream.getvalue()
            sections.append(f"=== {title}, TTL {'on' if ttl else 'off'}, sorted by {sort} ===\n{body.strip()}\n")
    return "\n".join(sections)
