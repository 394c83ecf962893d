"""Timed calls, which synchronise the device before and after the call, and the repeats of a measurement: warm-up
calls, then timed calls, each with its peak memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..cli import synchronize
from .grid import BenchmarkGrid
from .peak_memory import PeakMemory


def timed_call(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds `function()` takes, the device synchronised before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def repeat_timed(
    step: Callable[[], Any], grid: BenchmarkGrid, device: torch.device
) -> tuple[list[float], float, int | None]:
    """Warm-up calls (the first one's time is returned: it includes compilation), then timed repeats with the
    peak memory of each; returns the times, the first call's time and the largest peak."""
    first_call_s = math.nan
    for index in range(grid.warmup):
        seconds, _ = timed_call(step, device)
        if index == 0:
            first_call_s = seconds
    times = []
    peaks = []
    for _ in range(grid.repeats):
        with PeakMemory(device) as peak:
            seconds, _ = timed_call(step, device)
        times.append(seconds)
        peaks.append(peak.peak_bytes)
    known_peaks = [p for p in peaks if p is not None]
    return times, first_call_s, max(known_peaks) if known_peaks else None
