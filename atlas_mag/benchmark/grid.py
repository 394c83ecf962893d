"""What to measure: the lengths of each section, repeats and warm-up, and the lengths the goals are checked at."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class BenchmarkGrid:
    """What to measure. The `goal_*` lengths are where the goals are checked: the project's targets name 2048,
    8192, 1k and 32k tokens; the quick grid checks the same goals at proportionally shorter lengths."""

    train_lengths: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    # Timed steps per decode run: a multiple of the model's `ttl_chunk_size`, so that each run pays its share of
    # memory updates (one per chunk) and no more.
    decode_tokens: int
    repeats: int
    warmup: int
    batch_size: int
    goal_short: int
    goal_long: int
    goal_decode_near: int
    goal_decode_far: int
    goal_decode_vs_llama_from: int
    # Prefill lengths and decode contexts of the compiled row (None: all of them). Compiling is slow on a CPU.
    compile_lengths: tuple[int, ...] | None = None
    # Timed steps of the no-cache row: each is a forward pass over the whole context, so a few suffice.
    no_cache_decode_tokens: int = 4

    def validate(self) -> None:
        for name in ("train_lengths", "prefill_lengths", "decode_contexts"):
            values = getattr(self, name)
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"`{name}` must hold positive integers, got {values!r}")
        for name in ("decode_tokens", "no_cache_decode_tokens", "repeats", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"`warmup` must be >= 0, got {self.warmup!r}")

    @property
    def max_length(self) -> int:
        """Longest sequence any model sees (the Llama's `max_position_embeddings`)."""
        steps = max(self.decode_tokens, self.no_cache_decode_tokens)
        decode_end = max(self.decode_contexts, default=0) + self.warmup + steps
        return max(*self.train_lengths, *self.prefill_lengths, decode_end, 1)


FULL_GRID = BenchmarkGrid(
    train_lengths=(512, 2048, 8192),
    prefill_lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    decode_contexts=(1024, 4096, 8192, 16384, 32768),
    # One TTL chunk of the published model: every timed window holds exactly one memory update per layer.
    decode_tokens=256,
    repeats=5,
    warmup=2,
    batch_size=1,
    goal_short=2048,
    goal_long=8192,
    goal_decode_near=1024,
    goal_decode_far=32768,
    goal_decode_vs_llama_from=8192,
    compile_lengths=(1024, 8192, 32768),
)

# The quick model is the published one at a quarter of the width and of every window, so the goals are checked at
# a quarter of their lengths (the same length-to-width and length-to-window ratios), except the decode flatness
# goal, which is checked over the full 256-32k range (stricter than a quarter's 256-8k). The decode contexts reach
# 32k to show where a full-attention Llama's per-token cost overtakes Atlas's constant one.
QUICK_GRID = BenchmarkGrid(
    train_lengths=(128, 512, 2048),
    prefill_lengths=(256, 512, 1024, 2048),
    decode_contexts=(256, 1024, 2048, 8192, 32768),
    decode_tokens=64,
    repeats=3,
    warmup=1,
    batch_size=1,
    goal_short=512,
    goal_long=2048,
    goal_decode_near=256,
    goal_decode_far=32768,
    goal_decode_vs_llama_from=2048,
    # Three prompt lengths: after the first, compiled by chunk, a new length compiles nothing.
    compile_lengths=(256, 512, 1024),
    no_cache_decode_tokens=2,
)


def override_grid(grid: BenchmarkGrid, **changes: Any) -> BenchmarkGrid:
    """`grid` with the given fields replaced (None leaves a field as it is)."""
    return replace(grid, **{name: value for name, value in changes.items() if value is not None})
