"""Writing results: JSON, Markdown tables and matplotlib figures, each written to a temporary file beside the
target and renamed into place, so an interrupted run never leaves a truncated file where a good one was (and the
same for whole folders: `move_folder_into_place`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def umask_mode(mode: int) -> int:
    """`mode` less the process's umask: what `open()` or `mkdir()` would give. `tempfile` creates owner-only
    files and folders, which must not leak into results that others read."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, umask_mode(0o666))
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def move_folder_into_place(staging: Path, final: Path) -> None:
    """Rename the finished folder `staging` (beside `final`) to `final`, replacing the folder there: `final` is
    the old folder or the new one, never a mix (between the two renames it is briefly absent)."""
    if final.exists():
        previous = final.with_name(f".{final.name}.old-{staging.name}")
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous)
    else:
        staging.rename(final)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no display, no global figure state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(figure: Any, path: str | Path) -> Path:
    """Save a figure from `new_figure` as PNG (atomically)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
