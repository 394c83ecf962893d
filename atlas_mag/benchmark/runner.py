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
from .compilation import backend_name, compile_summary, compiled_graphs
from .flops import row_flops_per_token
from .goals import evaluate_goals
from .grid import BenchmarkGrid
from .kernels import measure_matmul_rate, measure_newton_schulz
from .measure import measure_decode_run, measure_prefill, measure_training, summarize_decode_runs
from .peak_memory import memory_method
from .variants import ATLAS_COMPILED, ATLAS_TTL_ON, DECODE_ONLY_VARIANTS, LLAMA, Variant, build_variants

# (variant, length) of a section: a row of its table.
Cell = tuple[str, int]
# (section, variant, length, measurement): one measurement of the run.
Task = tuple[str, str, int, Callable[..., dict[str, Any]]]


def run_benchmark(
    atlas_config: AtlasMAGConfig,
    grid: BenchmarkGrid,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile_backend: str | Callable[..., Any] | None = "inductor",
    seed: int = 0,
    progress: bool = True,
    compile_scope: str = "chunks",
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Measure every section for every variant; a measurement that fails (out of memory, a compiler error) is
    recorded with its error and the run goes on. Returns a JSON-ready dict: `meta` (machine, versions, grid,
    model sizes, the matmul rate), the `train`, `prefill` and `decode` rows (each with its analytic FLOPs per token,
    achieved FLOP/s and their fraction of the matmul rate), `newton_schulz` (the micro-benchmark of
    `kernels.measure_newton_schulz`), `compile` (what Dynamo did; with a compile backend only) and `goals`."""
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
    meta = _meta(atlas_config, grid, variants, device, dtype, compile_backend, compile_scope, compile_mode)
    # The machine's product rate, probed before and after the rows (a shared machine can be slower at either end);
    # the faster probe is what the rows' FLOP/s are measured against.
    probes = [measure_matmul_rate(device, dtype)]
    decode_cells = _cells(variants, grid.decode_contexts, grid.compile_lengths)
    tasks = _tasks(variants, grid, decode_cells)
    rows, decode_runs, decode_errors = _run_tasks(tasks, variants, grid, device, seed, progress)
    probes.append(measure_matmul_rate(device, dtype))
    meta["matmul_flops_per_s"] = max(probe["flops_per_s"] for probe in probes)
    meta["matmul_probes_flops_per_s"] = [probe["flops_per_s"] for probe in probes]
    meta["matmul_probe"] = probes[0]["probe"] + ", before and after the rows (the faster counts)"
    meta["flops"] = "analytic matmul FLOPs per token (atlas_mag/benchmark/flops.py); elementwise work not counted"
    results: dict[str, Any] = {
        "meta": meta,
        **rows,
        "decode": [_decode_row(cell, decode_runs, decode_errors) for cell in decode_cells],
    }
    for section in ("train", "prefill", "decode"):
        for row in results[section]:
            if "error" not in row:
                row.update(_achieved_flops(section, row, variants, grid, meta["matmul_flops_per_s"]))
    results["newton_schulz"] = measure_newton_schulz(atlas_config, grid.batch_size, grid.repeats, device, seed)
    if compile_backend is not None:
        results["compile"] = compile_summary(compile_backend)
    results["goals"] = evaluate_goals(results, grid)
    return results


def _meta(
    atlas_config: AtlasMAGConfig,
    grid: BenchmarkGrid,
    variants: dict[str, Variant],
    device: torch.device,
    dtype: torch.dtype,
    compile_backend: str | Callable[..., Any] | None,
    compile_scope: str,
    compile_mode: str | None,
) -> dict[str, Any]:
    """What was measured, on what and how: the machine, the releases, the grid and the model sizes."""
    atlas, llama = variants[ATLAS_TTL_ON].model, variants[LLAMA].model
    return {
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
    }


def _achieved_flops(
    section: str, row: dict[str, Any], variants: dict[str, Variant], grid: BenchmarkGrid, matmul_rate: float
) -> dict[str, Any]:
    """A row's analytic FLOPs per token by kind, the FLOP/s its time achieves and their fraction of the matmul
    rate."""
    length = row["context" if section == "decode" else "length"]
    flops = row_flops_per_token(section, variants[row["variant"]], length, grid)
    tokens_per_s = 1000.0 / row["ms_per_token"] if section == "decode" else row["tokens_per_s"]
    achieved = flops.total * tokens_per_s
    return {
        "flops_per_token": flops.as_dict(),
        "flops_per_s": achieved,
        "matmul_rate_fraction": achieved / matmul_rate,
    }


def _tasks(variants: dict[str, Variant], grid: BenchmarkGrid, decode_cells: list[Cell]) -> list[Task]:
    """Every measurement in running order: training (not the compiled or decode-only variants), prefill (not the
    decode-only variants), then the decode runs."""
    prefill_variants = {name: v for name, v in variants.items() if name not in DECODE_ONLY_VARIANTS}
    training_variants = [name for name in prefill_variants if name != ATLAS_COMPILED]
    tasks: list[Task] = [
        ("train", name, length, measure_training) for length in grid.train_lengths for name in training_variants
    ]
    prefill_cells = _cells(prefill_variants, grid.prefill_lengths, grid.compile_lengths)
    tasks += [("prefill", name, length, measure_prefill) for name, length in prefill_cells]
    # Decode runs go round-robin over the cells, `repeats` times, so that a slow spell of a shared machine falls
    # on every context alike instead of on the last ones (the flatness goal compares contexts).
    tasks += [
        ("decode", name, length, measure_decode_run) for _ in range(grid.repeats) for name, length in decode_cells
    ]
    return tasks


def _run_tasks(
    tasks: list[Task],
    variants: dict[str, Variant],
    grid: BenchmarkGrid,
    device: torch.device,
    seed: int,
    progress: bool,
) -> tuple[dict[str, list[dict[str, Any]]], dict[Cell, list[dict[str, Any]]], dict[Cell, str]]:
    """Run the tasks in order. Returns the `train` and `prefill` rows, the decode runs of each cell and the
    decode cells that failed, with their error (a cell's first failure ends its runs). Once the compiled variant
    has failed, its remaining tasks are recorded as skipped."""
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "prefill": []}
    decode_runs: dict[Cell, list[dict[str, Any]]] = {}
    decode_errors: dict[Cell, str] = {}
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
            graphs_before = compiled_graphs()
            row.update(_measure_or_error(measure, variants[name], length, grid, device, seed))
            if name == ATLAS_COMPILED:
                # What this measurement compiled: nothing, once warm, for a prompt length compiled by chunk.
                row["graphs_compiled"] = compiled_graphs() - graphs_before
            if "error" in row:
                if name == ATLAS_COMPILED:
                    compile_failed = row["error"]
                bar.write(f"{section} {name} {length}: {row['error']}")
        if section != "decode":
            rows[section].append(row)
        elif "error" in row:
            decode_errors[(name, length)] = row["error"]
        else:
            decode_runs.setdefault((name, length), []).append(row)
    return rows, decode_runs, decode_errors


def _measure_or_error(
    measure: Callable[..., dict[str, Any]],
    variant: Variant,
    length: int,
    grid: BenchmarkGrid,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """The measurement, or `{"error": text}` where it raised; device memory is released either way."""
    try:
        return measure(variant, length, grid, device, seed)
    except Exception as error:  # noqa: BLE001 - a failed cell is recorded, the other cells still run
        return {"error": _error_text(error)}
    finally:
        _release_device_memory(device)


def _decode_row(
    cell: Cell, decode_runs: dict[Cell, list[dict[str, Any]]], decode_errors: dict[Cell, str]
) -> dict[str, Any]:
    """A decode cell's row: its error, or the summary of its runs."""
    name, length = cell
    if cell in decode_errors:
        return {"variant": name, "context": length, "error": decode_errors[cell]}
    runs = decode_runs[cell]
    row = {"variant": name, "context": length, **summarize_decode_runs(runs)}
    if "graphs_compiled" in runs[0]:
        row["graphs_compiled"] = sum(run["graphs_compiled"] for run in runs)
    return row


def _compiled_lengths(lengths: Sequence[int], compile_lengths: Sequence[int] | None) -> list[int]:
    """The lengths the compiled row runs at: those of `compile_lengths` in `lengths`, else the shortest."""
    if compile_lengths is None:
        return list(lengths)
    return [length for length in lengths if length in compile_lengths] or [min(lengths)]


def _cells(variants: dict[str, Variant], lengths: Sequence[int], compile_lengths: Sequence[int] | None) -> list[Cell]:
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
