"""The project's performance targets, checked against the numbers of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .grid import BenchmarkGrid
from .results import lookup, ratio_of
from .variants import ATLAS_TTL_OFF, ATLAS_TTL_ON, ATLAS_VARIANTS, LLAMA, VARIANT_LABELS

# Fraction of the machine's measured matmul rate that a TTL-on prefill's analytic FLOPs should reach.
PREFILL_MATMUL_RATE_FRACTION = 0.7
# Speed-up of Newton–Schulz at the largest memory matrix over the direct iteration.
NEWTON_SCHULZ_SPEEDUP = 1.5

# Largest growth exponent of peak memory in length that still counts as linear: fixed costs push a linear
# model below 1 and measurement noise a little above it; a T x T tensor drives it towards 2.
LINEAR_MEMORY_EXPONENT = 1.25


def _goal(goal: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    status = "not measured" if value is None or met is None else ("met" if met else "missed")
    return {"goal": goal, "value": value, "target": target, "status": status}


def _growth_exponent(results: dict[str, Any], section: str, variant: str, lengths: Sequence[int]) -> float | None:
    """Exponent p of memory ~ length^p between the shortest and the longest length (1: linear, 2: T x T)."""
    if len(lengths) < 2:
        return None
    short, long = min(lengths), max(lengths)
    low = lookup(results, section, variant, short, "peak_memory_bytes")
    high = lookup(results, section, variant, long, "peak_memory_bytes")
    if not low or not high or low <= 0 or high <= 0:
        return None
    return math.log(high / low) / math.log(long / short)


def evaluate_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """The project's performance targets, checked at the grid's goal lengths."""
    return [
        *_decode_flatness_goals(results, grid),
        *_decode_against_llama_goals(results, grid),
        *_cache_size_goals(results, grid),
        *_speed_goals(results, grid),
        *_memory_growth_goals(results, grid),
        *_flop_rate_goals(results, grid),
        _newton_schulz_goal(results),
    ]


def _decode_flatness_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """Decode ms/token at the far context at most 1.2x that at the near one."""
    goals = []
    near, far = grid.goal_decode_near, grid.goal_decode_far
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        ratio = ratio_of(
            lookup(results, "decode", variant, far, "ms_per_token"),
            lookup(results, "decode", variant, near, "ms_per_token"),
        )
        met = None if ratio is None else ratio <= 1.2
        goals.append(_goal(f"{label}: decode ms/token at {far} over at {near} context", ratio, "<= 1.2", met))
    return goals


def _decode_against_llama_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """Decode ms/token below the Llama's at every context from `goal_decode_vs_llama_from` on."""
    goals = []
    from_length = grid.goal_decode_vs_llama_from
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        contexts = [c for c in grid.decode_contexts if c >= from_length]
        ratios = [
            ratio_of(
                lookup(results, "decode", variant, c, "ms_per_token"),
                lookup(results, "decode", LLAMA, c, "ms_per_token"),
            )
            for c in contexts
        ]
        worst = None if not ratios or None in ratios else max(ratios)
        goals.append(
            _goal(
                f"{label}: decode ms/token over Llama's at every context >= {from_length} (worst)",
                worst,
                "< 1.0",
                None if worst is None else worst < 1.0,
            )
        )
    return goals


def _cache_size_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """The same cache size at every decode context."""
    goals = []
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        sizes = [lookup(results, "decode", variant, c, "cache_bytes") for c in grid.decode_contexts]
        spread = None if not sizes or None in sizes else max(sizes) / min(sizes)
        goals.append(
            _goal(
                f"{label}: cache bytes, largest over smallest across contexts {min(grid.decode_contexts)}-"
                f"{max(grid.decode_contexts)}",
                spread,
                "== 1.0",
                None if spread is None else spread <= 1.0 + 1e-9,
            )
        )
    return goals


def _speed_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """Training and prefill tokens/s against the Llama's at the short and the long goal lengths."""
    goals = []
    # (variant, length, threshold, strictly faster): TTL on >= 0.5x at the short length and faster at the long
    # one; TTL off >= 0.9x at the short length.
    speed_targets = (
        (ATLAS_TTL_ON, grid.goal_short, 0.5, False),
        (ATLAS_TTL_ON, grid.goal_long, 1.0, True),
        (ATLAS_TTL_OFF, grid.goal_short, 0.9, False),
    )
    for section, what in (("train", "training"), ("prefill", "prefill")):
        for variant, length, threshold, strict in speed_targets:
            ratio = ratio_of(
                lookup(results, section, variant, length, "tokens_per_s"),
                lookup(results, section, LLAMA, length, "tokens_per_s"),
            )
            met = None if ratio is None else (ratio > threshold if strict else ratio >= threshold)
            target = f"{'>' if strict else '>='} {threshold}"
            goals.append(
                _goal(f"{VARIANT_LABELS[variant]}: {what} tokens/s over Llama's at {length}", ratio, target, met)
            )
    return goals


def _memory_growth_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """Peak training and prefill memory growing linearly in the length."""
    goals = []
    for section, lengths, what in (
        ("train", grid.train_lengths, "training"),
        ("prefill", grid.prefill_lengths, "prefill"),
    ):
        for variant in ATLAS_VARIANTS:
            exponent = _growth_exponent(results, section, variant, lengths)
            goals.append(
                _goal(
                    f"{VARIANT_LABELS[variant]}: peak {what} memory growth exponent p (memory ~ length^p), "
                    f"{min(lengths)}-{max(lengths)}",
                    exponent,
                    f"<= {LINEAR_MEMORY_EXPONENT} (linear; T x T tends to 2)",
                    None if exponent is None else exponent <= LINEAR_MEMORY_EXPONENT,
                )
            )
    return goals


def _flop_rate_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """TTL-on prefill at the short and the long goal lengths: its analytic FLOPs per second at least
    `PREFILL_MATMUL_RATE_FRACTION` of the matmul rate measured in the run."""
    goals = []
    for length in (grid.goal_short, grid.goal_long):
        fraction = lookup(results, "prefill", ATLAS_TTL_ON, length, "matmul_rate_fraction")
        goals.append(
            _goal(
                f"{VARIANT_LABELS[ATLAS_TTL_ON]}: prefill FLOP/s over the measured matmul rate at {length}",
                fraction,
                f">= {PREFILL_MATMUL_RATE_FRACTION}",
                None if fraction is None else fraction >= PREFILL_MATMUL_RATE_FRACTION,
            )
        )
    return goals


def _newton_schulz_goal(results: dict[str, Any]) -> dict[str, Any]:
    """Newton–Schulz of the largest memory matrix (the first call of the micro-benchmark): the direct iteration's
    time over that of the evaluation the config chooses."""
    rows = results.get("newton_schulz") or [None]
    row = rows[0]
    shape = "the largest memory matrix" if row is None else f"{row['shape'][1:]}"
    speedup = None if row is None else row["speedup"]
    return _goal(
        f"Newton–Schulz at {shape}: direct ms over the chosen evaluation's",
        speedup,
        f">= {NEWTON_SCHULZ_SPEEDUP}",
        None if speedup is None else speedup >= NEWTON_SCHULZ_SPEEDUP,
    )
