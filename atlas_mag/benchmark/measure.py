"""The measurements of one model at one length:
- training step (forward + backward of the next-token loss, no optimiser step): tokens/s and peak memory;
- prefill (`use_cache=True`, logits of the last position only): tokens/s and peak memory;
- decode: after prefilling a context, single-token steps that pass the cache back; milliseconds per token
  (mean over the steps, so Atlas's one memory update per `ttl_chunk_size` tokens is amortised) and the cache
  size in bytes.
Throughputs are medians over the grid's repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..compat import CACHE_FIELD
from ..modeling_atlas import AtlasMAGCache
from .grid import BenchmarkGrid
from .timing import repeat_timed, timed_call
from .variants import Variant


def random_ids(vocab_size: int, batch_size: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    """`batch_size` x `length` token ids drawn from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    # Skip the special ids 0-3 so that every position is an ordinary token.
    return torch.randint(4, vocab_size, (batch_size, length), generator=generator).to(device)


def cache_nbytes(cache: Any) -> int:
    """Bytes of a model cache: `AtlasMAGCache.nbytes()`, or the key and value tensors of a DynamicCache."""
    if isinstance(cache, AtlasMAGCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def measure_training(
    variant: Variant, length: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Forward + backward of the next-token loss on `batch_size` x `length` random tokens (no optimiser
    step)."""
    model = variant.model
    ids = random_ids(model.config.vocab_size, grid.batch_size, length, device, seed)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        variant(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    model.train()
    try:
        times, first_call_s, peak = repeat_timed(step, grid, device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return _throughput(times, first_call_s, peak, grid.batch_size * length)


def _throughput(times: list[float], first_call_s: float, peak: int | None, tokens: int) -> dict[str, Any]:
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peak,
        "first_call_seconds": _finite_or_none(first_call_s),
    }


def measure_prefill(
    variant: Variant, length: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """One forward pass over `length` tokens that builds the cache (logits of the last position only)."""
    ids = random_ids(variant.model.config.vocab_size, grid.batch_size, length, device, seed)

    def step() -> Any:
        with torch.inference_mode():
            return variant(input_ids=ids, use_cache=True, logits_to_keep=1)

    times, first_call_s, peak = repeat_timed(step, grid, device)
    return _throughput(times, first_call_s, peak, grid.batch_size * length)


def measure_decode_run(
    variant: Variant, context: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """One decode run: prefill `context` tokens with the cache, take `warmup` untimed single-token steps, then
    time `decode_tokens` single-token steps that each pass the cache back. A `recompute_prefix` variant has no
    cache: each step is a forward pass over the whole sequence so far (`no_cache_decode_tokens` of them timed)."""
    vocab_size = variant.model.config.vocab_size
    ids = random_ids(vocab_size, grid.batch_size, context, device, seed)
    warmup = variant.decode_warmup + grid.warmup
    timed = grid.no_cache_decode_tokens if variant.recompute_prefix else grid.decode_tokens
    steps = random_ids(vocab_size, grid.batch_size, warmup + timed, device, seed + 1)
    step_times = []
    cache = cache_bytes = cache_bytes_after = None
    with torch.inference_mode():
        if not variant.recompute_prefix:
            # The Llama too: the cache under the installed release's name (see `compat.CACHE_FIELD`).
            cache = getattr(variant(input_ids=ids, use_cache=True, logits_to_keep=1), CACHE_FIELD)
            cache_bytes = cache_nbytes(cache)
        for index in range(warmup + timed):
            token = steps[:, index : index + 1]
            if variant.recompute_prefix:
                ids = torch.cat([ids, token], dim=1)
                seconds, _ = timed_call(lambda s=ids: variant(input_ids=s, use_cache=False, logits_to_keep=1), device)
            else:
                seconds, output = timed_call(
                    lambda t=token, c=cache: variant(input_ids=t, use_cache=True, **{CACHE_FIELD: c}), device
                )
                cache = getattr(output, CACHE_FIELD)
            if index >= warmup:
                step_times.append(seconds)
        if cache is not None:
            cache_bytes_after = cache_nbytes(cache)
    return {"step_seconds": step_times, "cache_bytes": cache_bytes, "cache_bytes_after_decode": cache_bytes_after}


def summarize_decode_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A decode cell from its runs: ms/token is the median over the runs of each run's mean step time (memory
    updates amortised), so that one disturbed run on a shared machine does not decide it."""
    means = [statistics.fmean(run["step_seconds"]) for run in runs]
    steps = [seconds for run in runs for seconds in run["step_seconds"]]
    return {
        "ms_per_token": 1000.0 * statistics.median(means),
        "ms_per_token_runs": [1000.0 * mean for mean in means],
        "ms_per_token_median": 1000.0 * statistics.median(steps),
        "ms_per_token_max": 1000.0 * max(steps),
        "cache_bytes": runs[-1]["cache_bytes"],
        "cache_bytes_after_decode": runs[-1]["cache_bytes_after_decode"],
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
