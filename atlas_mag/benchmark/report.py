"""The results as JSON, Markdown tables (ratios against the Llama, the goals) and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..reporting import new_figure, save_figure, write_text
from .results import find_row, lookup, ratio_of
from .variants import ATLAS_COMPILED, ATLAS_NO_CACHE, ATLAS_TTL_ON, LLAMA, VARIANT_LABELS

MIB = 2**20


def _variants_in(rows: Iterable[dict[str, Any]]) -> list[str]:
    present = {row["variant"] for row in rows}
    return [name for name in VARIANT_LABELS if name in present]


def _format_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _cell(row: dict[str, Any] | None, field: str, scale: float, digits: int, llama: float | None) -> str:
    """A table cell: the value (and its ratio to the Llama's), "failed" or "–" (not measured)."""
    if row is None:
        return "–"
    if "error" in row:
        return "failed"
    value = row.get(field)
    if value is None:
        return "–"
    text = _format_number(value * scale, digits)
    ratio = ratio_of(value, llama)
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def _section_table(
    results: dict[str, Any], section: str, key: str, field: str, digits: int, scale: float = 1.0
) -> list[str]:
    """Lengths down, models across (those with a value or an error); speed cells carry their ratio to the Llama of
    the same length."""
    rows = results[section]
    variants = [
        v
        for v in _variants_in(rows)
        if any(r["variant"] == v and (r.get(field) is not None or "error" in r) for r in rows)
    ]
    lengths = sorted({row[key] for row in rows})
    header = f"| {key} | " + " | ".join(VARIANT_LABELS[v] for v in variants) + " |"
    lines = [header, "|" + "---:|" * (len(variants) + 1)]
    with_ratio = field in ("tokens_per_s", "ms_per_token")
    for length in lengths:
        llama = lookup(results, section, LLAMA, length, field) if with_ratio else None
        cells = [
            _cell(find_row(results, section, v, length), field, scale, digits, None if v == LLAMA else llama)
            for v in variants
        ]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return lines


def _no_cache_speedup_lines(results: dict[str, Any]) -> list[str]:
    """How much faster per token cached decoding (TTL on) is than the original's no-cache decoding, by context."""
    speedups = []
    for context in sorted({row["context"] for row in results["decode"]}):
        ratio = ratio_of(
            lookup(results, "decode", ATLAS_NO_CACHE, context, "ms_per_token"),
            lookup(results, "decode", ATLAS_TTL_ON, context, "ms_per_token"),
        )
        if ratio is not None:
            speedups.append(f"{ratio:,.1f}x at {context}")
    if not speedups:
        return []
    return ["", f"Cached decoding with TTL on is faster per token than no-cache decoding: {', '.join(speedups)}."]


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables; ratios in parentheses are relative to the Llama in the same row."""
    meta = results["meta"]
    lines = [
        "# Atlas-MAG speed benchmark",
        "",
        f"Device: {meta['device']}, dtype {meta['dtype']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}. Atlas-MAG {meta['atlas_parameters']:,} parameters, same-size Llama "
        f"{meta['llama_parameters']:,}. Batch size {meta['grid']['batch_size']}; medians of "
        f"{meta['grid']['repeats']} repeats after {meta['grid']['warmup']} warm-up calls. Ratios in "
        "parentheses: against the Llama in the same row (tokens/s: higher is better; ms/token: lower is "
        "better).",
        "",
        f"Matrix-product rate of this machine, measured in the run: {meta['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"({meta['matmul_probe']}). FLOP fractions below: each row's analytic matmul FLOPs (per token: base model, "
        "attention, memory reads, memory gradients, Newton–Schulz; `atlas_mag/benchmark/flops.py`) times its "
        "tokens/s, over that rate.",
        "",
        "## Training step (forward + backward), tokens/s",
        "",
        *_section_table(results, "train", "length", "tokens_per_s", 0),
        "",
        "Fraction of the matmul rate:",
        "",
        *_section_table(results, "train", "length", "matmul_rate_fraction", 2),
        "",
        "Peak training memory, MiB:",
        "",
        *_section_table(results, "train", "length", "peak_memory_bytes", 1, 1 / MIB),
        "",
        "## Prefill, tokens/s",
        "",
        *_section_table(results, "prefill", "length", "tokens_per_s", 0),
        "",
        "Fraction of the matmul rate:",
        "",
        *_section_table(results, "prefill", "length", "matmul_rate_fraction", 2),
        "",
        "Peak prefill memory, MiB:",
        "",
        *_section_table(results, "prefill", "length", "peak_memory_bytes", 1, 1 / MIB),
        "",
        "## Decode, ms per token (median over repeats of the mean over steps; memory updates amortised)",
        "",
        *_section_table(results, "decode", "context", "ms_per_token", 2),
        *_no_cache_speedup_lines(results),
        "",
        "Fraction of the matmul rate:",
        "",
        *_section_table(results, "decode", "context", "matmul_rate_fraction", 2),
        "",
        "Cache after the context, KiB:",
        "",
        *_section_table(results, "decode", "context", "cache_bytes", 0, 1 / 1024),
        "",
        f"Peak memory: {meta['memory_method']}.",
        *_flop_lines(results),
        *_newton_schulz_lines(results),
        *_failure_lines(results),
        *_compile_lines(results),
        "",
        "## Goals",
        "",
        "| goal | measured | target | status |",
        "|---|---:|---|---|",
        *[
            f"| {goal['goal']} | {_format_number(goal['value'], 3)} | {goal['target']} | {goal['status']} |"
            for goal in results["goals"]
        ],
    ]
    return "\n".join(lines) + "\n"


FLOP_KINDS = {
    "base": "base",
    "attention": "attention",
    "memory_reads": "memory reads",
    "memory_gradients": "memory gradients",
    "newton_schulz": "Newton–Schulz",
    "total": "total",
}


def _flop_lines(results: dict[str, Any]) -> list[str]:
    """Every measured row's analytic MFLOP per token by kind, its achieved GFLOP/s and fraction of the matmul
    rate."""
    header = "| section | model | length | " + " | ".join(FLOP_KINDS.values()) + " | GFLOP/s | of matmul rate |"
    lines = ["", "## Analytic FLOPs, MFLOP per token", "", header, "|---|---|" + "---:|" * (len(FLOP_KINDS) + 3)]
    for section in ("train", "prefill", "decode"):
        for row in results[section]:
            if "flops_per_token" not in row:
                continue
            flops = [_format_number(row["flops_per_token"][kind] / 1e6, 2) for kind in FLOP_KINDS]
            lines.append(
                f"| {section} | {VARIANT_LABELS[row['variant']]} | {row.get('length', row.get('context'))} | "
                + " | ".join(flops)
                + f" | {row['flops_per_s'] / 1e9:,.1f} | {row['matmul_rate_fraction']:.2f} |"
            )
    return lines


def _newton_schulz_lines(results: dict[str, Any]) -> list[str]:
    """The Newton–Schulz micro-benchmark: per call shape of an update, both evaluations' time and error."""
    lines = [
        "",
        "## Newton–Schulz per call of a TTL update (ms per call, error relative to an fp64 run)",
        "",
        "| [batch, m, n] | direct ms | Gram ms | direct error | Gram error | chosen | speed-up over direct |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in results["newton_schulz"]:
        lines.append(
            f"| {row['shape']} | {row['direct_ms']:.2f} | {row['gram_ms']:.2f} | {row['direct_error']:.1e} | "
            f"{row['gram_error']:.1e} | {row['chosen']} | {row['speedup']:.2f}x |"
        )
    return lines


def _failure_lines(results: dict[str, Any]) -> list[str]:
    """The measurements that failed, with their errors (none: no lines)."""
    errors = [
        f"- {section} {row['variant']} {row.get('length', row.get('context'))}: {row['error']}"
        for section in ("train", "prefill", "decode")
        for row in results[section]
        if "error" in row
    ]
    return ["", "Failed measurements:", "", *errors] if errors else []


def _compile_lines(results: dict[str, Any]) -> list[str]:
    """What Dynamo compiled, the compiled row's first prefill calls and the graph breaks (no compiled row: no
    lines)."""
    compile_info = results.get("compile")
    if compile_info is None:
        return []
    compiled = [row for row in results["prefill"] if row["variant"] == ATLAS_COMPILED and "error" not in row]
    first_calls = [
        f"{row['length']} tokens: {row['first_call_seconds']:.1f} s, compiling "
        f"{max(0.0, row['first_call_seconds'] - row['seconds']):.1f} s (new graphs: {row['graphs_compiled']})"
        for row in compiled
        if row.get("first_call_seconds") is not None
    ]
    decode_graphs = [
        f"{row['context']}: {row['graphs_compiled']}"
        for row in results["decode"]
        if row["variant"] == ATLAS_COMPILED and "graphs_compiled" in row
    ]
    lines = [
        "",
        f"## torch.compile (backend {compile_info['backend']}, scope: {results['meta']['compile_scope']}, "
        f"mode: {results['meta']['compile_mode'] or 'default'})",
        "",
        f"Dynamo compiled {compile_info['unique_graphs']} graphs from {compile_info['frames']} frames "
        f"({compile_info['frames_compiled']} traced) with {compile_info['graph_breaks']} graph breaks. "
        "First prefill call of each length, in running order (compilation included; compiling: the first call "
        "less the median warm one, 0 where timing noise makes that negative): "
        f"{'; '.join(first_calls) or 'none'}. Its decode row is timed after untimed steps that compile the "
        "decode graphs (two TTL chunks); new graphs over each context's decode runs (their prefills included): "
        f"{', '.join(decode_graphs) or 'none'}.",
    ]
    if compile_info["graph_break_reasons"]:
        lines += ["", "Graph breaks (count, reason):", ""]
        lines += [f"- {count} x {reason}" for reason, count in compile_info["graph_break_reasons"].items()]
    return lines


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """Decode ms/token and cache size against context, and prefill tokens/s against length, as a PNG."""
    from matplotlib.ticker import NullLocator

    panels = (
        ("decode", "context", "ms_per_token", 1.0, "decode: ms per token", "context tokens"),
        ("decode", "context", "cache_bytes", 1 / MIB, "cache after the context (MiB)", "context tokens"),
        ("prefill", "length", "tokens_per_s", 1.0, "prefill: tokens/s", "prompt tokens"),
    )
    figure = new_figure(5 * len(panels), 4)
    axes = figure.subplots(1, len(panels))
    for axis, (section, key, field, scale, title, xlabel) in zip(axes, panels, strict=True):
        for variant in _variants_in(results[section]):
            points = [
                (row[key], row[field] * scale)
                for row in results[section]
                if row["variant"] == variant and row.get(field) is not None
            ]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                # One colour per variant in every panel, so that the one legend holds for all of them.
                color = f"C{list(VARIANT_LABELS).index(variant)}"
                axis.plot(xs, ys, marker="o", color=color, label=VARIANT_LABELS[variant])
        lengths = sorted({row[key] for row in results[section]})
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [_short_length(length) for length in lengths])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(True, which="both", alpha=0.3)
    handles = {label: handle for axis in axes for handle, label in zip(*axis.get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    meta = results["meta"]
    figure.suptitle(f"Atlas-MAG vs same-size Llama — {meta['device']}, {meta['dtype']}")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(figure, path)


def _short_length(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def write_report(results: dict[str, Any], output_dir: str | Path, stem: str = "benchmark_speed") -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into `output_dir` (each via a temporary file)."""
    output_dir = Path(output_dir)
    paths = {kind: output_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    write_text(paths["json"], json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text(paths["md"], render_markdown(results))
    plot_results(results, paths["png"])
    return paths
