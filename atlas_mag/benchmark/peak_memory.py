"""Peak memory of a block of code above what was held when it started: `torch.cuda.max_memory_allocated` on CUDA;
on CPU the peak resident set size, sampled every millisecond from `/proc/self/statm` after returning freed heap to
the OS (`malloc_trim`): an estimate (None where `/proc` does not exist)."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import torch


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS so that the RSS before a call does not hide its allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the peak memory a block allocates above what was held when it started
    (`.peak_bytes`, None where it cannot be measured). CUDA: allocator statistics. CPU: sampled RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.001) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._baseline = _resident_bytes()
            if self._baseline is not None:
                self._max = self._baseline
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            resident = _resident_bytes()
            if resident is not None:
                self._max = max(self._max, resident)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            resident = _resident_bytes()
            self._max = max(self._max, resident or 0)
            self.peak_bytes = self._max - self._baseline


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the call"
    if _resident_bytes() is None:
        return "not measured (no /proc/self/statm on this system)"
    return "peak RSS above the RSS before the call, sampled every 1 ms after malloc_trim (estimate)"
