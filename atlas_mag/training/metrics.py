"""The metrics of a training run: metrics.jsonl (one JSON record per logged step and per validation), the
flat hyperparameter table for the trackers, and the plot of the curves."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..reporting import atomic_write_bytes, new_figure, write_text


class MetricsLog:
    """metrics.jsonl, written by the main process. A resumed run drops records after its checkpoint's step, so
    the file reads like one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [json.dumps(r) + "\n" for r in iterate_metrics(path) if r["step"] <= resume_step]
        write_text(path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def flatten_config(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"a.b": scalar} for the trackers' hyperparameter tables."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def iterate_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Metrics file {path} does not exist")
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


# Panels of `plot_metrics`: title and the metrics.jsonl keys drawn in it.
METRIC_PANELS = (
    ("loss", ("loss", "val_loss", "val_loss_ttl_off")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens / s", ("tokens_per_second",)),
    ("TTL gain (val loss off - on)", ("val_ttl_gain",)),
    ("TTL memory update norm", ("ttl_memory_update_norm",)),
    ("TTL memory gradient norm", ("ttl_gradient_norm",)),
)


def plot_metrics(metrics_path: str | Path, output_path: str | Path) -> Path:
    """Draw the curves of a metrics.jsonl into a PNG (written atomically)."""
    records = list(iterate_metrics(metrics_path))
    if not records:
        raise ValueError(f"Metrics file {metrics_path} has no records")
    panels = [(title, keys) for title, keys in METRIC_PANELS if any(k in r for r in records for k in keys)]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(6 * columns, 3.2 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o", markersize=2, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    return atomic_write_bytes(output_path, png.getvalue())
