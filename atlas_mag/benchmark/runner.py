"""The run: every section for every variant, in one process, into a JSON-ready dict."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..configuration_atlas import AtlasMAGConfig
from .compilation import backend_name, compile_summary
from .goals import evaluate_goals
from .grid import BenchmarkGrid
from .measure import measure_decode_run, measure_prefill, measure_training, summarize_decode_runs
from .peak_memory import memory_method
from .variants import ATLAS_COMPILED, ATLAS_TTL_ON, DECODE_ONLY_VARIANTS, LLAMA, Variant, build_variants


def run_benchmark(
    atlas_config: AtlasMAGConfig,
    grid: BenchmarkGrid,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile_backend: str | Callable[..., Any] | None = "inductor",
    seed: int = 0,
    progress: bool = True,
    compile_scope: str = "model",
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Measure every section for every variant; a measurement that fails (out of memory, a compiler error) is
    recorded with its error and the run goes on. Returns a JSON-ready dict: `meta` (machine, versions, grid,
    model sizes), the `train`, `prefill` and `decode` rows, `compile` (what Dynamo did; with a compile backend
    only) and `goals`."""
    grid.validate()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine.")
    if compile_backend is not None:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    variants = build_variants(
        atlas_config, grid.max_length, device, dtype, compile_backend, seed, compile_scope, compile_mode
    )
    atlas, llama = variants[ATLAS_TTL_ON].model, variants[LLAMA].model
    results: dict[str, Any] = {
        "meta": {
            "device": _device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "memory_method": memory_method(device),
            "compile_backend": backend_name(compile_backend),
            "compile_scope": compile_scope,
            "compile_mode": compile_mode,
            "grid": asdict(grid),
            "atlas_config": atlas_config.to_diff_dict(),
            "atlas_parameters": sum(p.numel() for p in atlas.parameters()),
            "llama_parameters": sum(p.numel() for p in llama.parameters()),
            "decode_ms_per_token": "median over repeats of the mean over the timed steps (memory updates amortised)",
            "training_step": "forward + backward of the next-token loss, no optimiser step",
        },
        "train": [],
        "prefill": [],
        "decode": [],
    }
    tasks: list[tuple[str, str, int, Callable[..., dict[str, Any]]]] = []
    prefill_variants = {name: v for name, v in variants.items() if name not in DECODE_ONLY_VARIANTS}
    training_variants = [name for name in prefill_variants if name != ATLAS_COMPILED]
    tasks += [("train", name, length, measure_training) for length in grid.train_lengths for name in training_variants]
    prefill_cells = _cells(prefill_variants, grid.prefill_lengths, grid.compile_lengths)
    tasks += [("prefill", name, length, measure_prefill) for name, length in prefill_cells]
    # Decode runs go round-robin over the cells, `repeats` times, so that a slow spell of a shared machine falls
    # on every context alike instead of on the last ones (the flatness goal compares contexts).
    decode_cells = _cells(variants, grid.decode_contexts, grid.compile_lengths)
    tasks += [
        ("decode", name, length, measure_decode_run) for _ in range(grid.repeats) for name, length in decode_cells
    ]
    decode_runs: dict[tuple[str, int], list[dict[str, Any]]] = {cell: [] for cell in decode_cells}
    decode_errors: dict[tuple[str, int], str] = {}
    compile_failed: str | None = None
    bar = tqdm(tasks, desc="benchmark", disable=not progress)
    for section, name, length, measure in bar:
        bar.set_postfix_str(f"{section} {name} {length}")
        key = "context" if section == "decode" else "length"
        row: dict[str, Any] = {"variant": name, key: length}
        if name == ATLAS_COMPILED and compile_failed is not None:
            row["error"] = f"skipped: compilation failed earlier ({compile_failed})"
        elif section == "decode" and (name, length) in decode_errors:
            continue
        else:
            try:
                row.update(measure(variants[name], length, grid, device, seed))
            except Exception as error:  # noqa: BLE001 - a failed cell is recorded, the other cells still run
                row["error"] = _error_text(error)
                if name == ATLAS_COMPILED:
                    compile_failed = row["error"]
                bar.write(f"{section} {name} {length}: {row['error']}")
            finally:
                _release_device_memory(device)
        if section != "decode":
            results[section].append(row)
        elif "error" in row:
            decode_errors[(name, length)] = row["error"]
        else:
            decode_runs[(name, length)].append(row)
    for name, length in decode_cells:
        row = {"variant": name, "context": length}
        if (name, length) in decode_errors:
            row["error"] = decode_errors[(name, length)]
        else:
            row.update(summarize_decode_runs(decode_runs[(name, length)]))
        results["decode"].append(row)
    if compile_backend is not None:
        results["compile"] = compile_summary(compile_backend)
    results["goals"] = evaluate_goals(results, grid)
    return results


def _compiled_lengths(lengths: Sequence[int], compile_lengths: Sequence[int] | None) -> list[int]:
    """The lengths the compiled row runs at: those of `compile_lengths` in `lengths`, else the shortest."""
    if compile_lengths is None:
        return list(lengths)
    return [length for length in lengths if length in compile_lengths] or [min(lengths)]


def _cells(
    variants: dict[str, Variant], lengths: Sequence[int], compile_lengths: Sequence[int] | None
) -> list[tuple[str, int]]:
    """(variant, length) cells of a section, by length; the compiled variant only at its lengths."""
    if not lengths:
        return []
    compiled = _compiled_lengths(lengths, compile_lengths)
    return [(name, length) for length in lengths for name in variants if name != ATLAS_COMPILED or length in compiled]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
