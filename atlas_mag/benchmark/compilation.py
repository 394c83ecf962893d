"""Dynamo's counters after a run, summarised for the report, and the name of a compiler backend."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _short_graph_break_reason(text: str) -> str:
    """First line of a Dynamo graph-break reason, plus its debug context and the model line it points at."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = lines[0] if lines else "?"
    for line in lines:
        if line.startswith("Developer debug context:"):
            summary += f" [{line.removeprefix('Developer debug context:').strip()}]"
            break
    for line in lines:
        found = re.match(r'# File "([^"]+)", line (\d+), in (\S+), code: (.*)', line)
        if found:
            file, number, function, code = found.groups()
            summary += f" at {Path(file).name}:{number} ({function}): {code[:120]}"
            break
    return summary


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled since its counters were last cleared."""
    return torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)


def compile_summary(backend: str | Callable[..., Any]) -> dict[str, Any]:
    """What Dynamo did during the run (its global counters, cleared when the run starts): graphs compiled,
    frames it gave up on, and the graph breaks by reason."""
    counters = torch._dynamo.utils.counters
    breaks: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        short = _short_graph_break_reason(reason)
        breaks[short] = breaks.get(short, 0) + count
    return {
        "backend": backend_name(backend),
        "unique_graphs": compiled_graphs(),
        "frames": counters["frames"].get("total", 0),
        "frames_compiled": counters["frames"].get("ok", 0),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": dict(sorted(breaks.items(), key=lambda item: -item[1])),
    }


def backend_name(backend: str | Callable[..., Any] | None) -> str | None:
    if backend is None or isinstance(backend, str):
        return backend
    return getattr(backend, "__name__", repr(backend))
