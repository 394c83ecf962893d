"""Speed benchmark: Atlas-MAG (test-time learning on and off, and `torch.compile`d) against a
`transformers.LlamaForCausalLM` of the same width, depth, heads, vocabulary and FFN size (full causal
attention, KV cache, sdpa), all measured in one process on one machine.

Measured per model:
- training step (forward + backward of the next-token loss, no optimiser step): tokens/s and peak memory;
- prefill (`use_cache=True`, logits of the last position only): tokens/s and peak memory;
- decode: after prefilling a context, single-token steps that pass the cache back; milliseconds per token
  (mean over the steps, so Atlas's one memory update per `ttl_chunk_size` tokens is amortised) and the cache
  size in bytes.

Timings synchronise the device, follow warm-up calls and are medians over repeats. Peak memory is
`torch.cuda.max_memory_allocated` above the memory held before the call on CUDA; on CPU it is the peak
resident set size above the RSS before the call, sampled every millisecond from `/proc/self/statm` after
returning freed heap to the OS (`malloc_trim`): an estimate (null where `/proc` does not exist).

`run_benchmark` returns a JSON-ready dict that `write_report` saves as JSON, Markdown and a PNG; the Markdown
and JSON include a "goals" section that checks the numbers against the performance targets of the project.
"""

from __future__ import annotations

import copy
import cProfile
import ctypes
import io
import json
import math
import os
import platform
import pstats
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ..cli import synchronize
from ..compat import CACHE_FIELD
from ..configuration_atlas import AtlasMAGConfig
from ..modeling_atlas import AtlasMAGCache, AtlasMAGForCausalLM
from ..reporting import new_figure, save_figure, write_text

ATLAS_TTL_ON = "atlas_ttl_on"
ATLAS_TTL_OFF = "atlas_ttl_off"
ATLAS_COMPILED = "atlas_ttl_on_compiled"
ATLAS_NO_CACHE = "atlas_no_cache"
LLAMA = "llama"
VARIANT_LABELS = {
    ATLAS_TTL_ON: "Atlas TTL on",
    ATLAS_TTL_OFF: "Atlas TTL off",
    ATLAS_COMPILED: "Atlas TTL on, compiled",
    ATLAS_NO_CACHE: "Atlas, no cache (original decoding)",
    LLAMA: "Llama",
}
ATLAS_VARIANTS = (ATLAS_TTL_ON, ATLAS_TTL_OFF)
# Variants measured in the decode section only.
DECODE_ONLY_VARIANTS = (ATLAS_NO_CACHE,)
MIB = 2**20
# Largest growth exponent of peak memory in length that still counts as linear: fixed costs push a linear
# model below 1 and measurement noise a little above it; a T x T tensor drives it towards 2.
LINEAR_MEMORY_EXPONENT = 1.25


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
    compile_lengths=(256,),
    no_cache_decode_tokens=2,
)

# A small Atlas-MAG for CPU runs: windows and chunks shrink with the lengths of QUICK_GRID, in the published
# model's proportions (sliding window 512 : Omega window 256 : TTL chunk 256).
QUICK_MODEL = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=344,
    sliding_window=128,
    memory_key_dim=16,
    poly_rank=128,
    omega_window=64,
    gamma_gate_hidden_size=16,
    ttl_chunk_size=64,
)


def quick_config() -> AtlasMAGConfig:
    return AtlasMAGConfig(**QUICK_MODEL)


def llama_config_for(config: AtlasMAGConfig, max_position_embeddings: int) -> LlamaConfig:
    """A Llama with the Atlas model's width, depth, heads (no grouped KV), vocabulary, FFN size, RoPE base and
    norm epsilon, using full causal sdpa attention."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="sdpa",
    )


def cache_nbytes(cache: Any) -> int:
    """Bytes of a model cache: `AtlasMAGCache.nbytes()`, or the key and value tensors of a DynamicCache."""
    if isinstance(cache, AtlasMAGCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------------------


def _timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


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


# ------------------------------------------------------------------------------------------------------------
# Models under test
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """A model and how to call it: `call(**kwargs)` runs a forward pass with the variant's extra arguments.
    `decode_warmup` untimed decode steps come before the grid's warm-up (a compiled model compiles its decode
    graphs, with and without a memory update, in its first steps). `recompute_prefix` decodes without a cache:
    every step is a forward pass over the whole sequence so far, as the original implementation generates."""

    name: str
    model: nn.Module
    forward: Callable[..., Any]
    extra_kwargs: dict[str, Any]
    decode_warmup: int = 0
    recompute_prefix: bool = False

    def __call__(self, **kwargs: Any) -> Any:
        return self.forward(**kwargs, **self.extra_kwargs)


COMPILE_SCOPES = ("model", "blocks")


def build_variants(
    atlas_config: AtlasMAGConfig,
    max_length: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_backend: str | Callable[..., Any] | None,
    seed: int = 0,
    compile_scope: str = "model",
    compile_mode: str | None = None,
) -> dict[str, Variant]:
    """The Atlas model (TTL on and off share its weights) and the same-size Llama, randomly initialised, and a
    decode-only baseline: the same Atlas weights generating the way the original implementation does (no cache,
    the whole prefix recomputed for every token, TTL off as in its `eval()`; our attention kernels, so the
    original's T x T masks make it slower still). The compiled variant wraps the same module
    (`compile_scope="model"`: `torch.compile` of the whole forward) or a copy whose blocks are compiled one by
    one (`"blocks"`, regional compilation: one graph serves every layer, so compiling takes a fraction of the
    time). `compile_mode` is `torch.compile`'s mode (e.g. "reduce-overhead": CUDA graphs on a GPU)."""
    torch.manual_seed(seed)
    atlas = AtlasMAGForCausalLM(atlas_config).to(device=device, dtype=dtype)
    llama = LlamaForCausalLM(llama_config_for(atlas_config, max_length)).to(device=device, dtype=dtype)
    variants = {
        ATLAS_TTL_ON: Variant(ATLAS_TTL_ON, atlas, atlas, {"ttl": True}),
        ATLAS_TTL_OFF: Variant(ATLAS_TTL_OFF, atlas, atlas, {"ttl": False}),
        ATLAS_NO_CACHE: Variant(ATLAS_NO_CACHE, atlas, atlas, {"ttl": False}, recompute_prefix=True),
    }
    if compile_backend is not None:
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        if compile_scope == "model":
            compiled_model, compiled_forward = atlas, torch.compile(atlas, backend=compile_backend, mode=compile_mode)
        else:
            compiled_model = compiled_forward = copy.deepcopy(atlas)
            for block in compiled_model.model.layers:
                block.compile(backend=compile_backend, mode=compile_mode)
        variants[ATLAS_COMPILED] = Variant(
            ATLAS_COMPILED,
            compiled_model,
            compiled_forward,
            {"ttl": True},
            decode_warmup=2 * atlas_config.ttl_chunk_size,
        )
    variants[LLAMA] = Variant(LLAMA, llama, llama, {})
    return variants


def _random_ids(vocab_size: int, batch_size: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Skip the special ids 0-3 so that every position is an ordinary token.
    return torch.randint(4, vocab_size, (batch_size, length), generator=generator).to(device)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _repeat_timed(
    step: Callable[[], Any], grid: BenchmarkGrid, device: torch.device
) -> tuple[list[float], float, int | None]:
    """Warm-up calls (the first one's time is returned: it includes compilation), then timed repeats with the
    peak memory of each; returns the times, the first call's time and the largest peak."""
    first_call_s = math.nan
    for index in range(grid.warmup):
        seconds, _ = _timed(step, device)
        if index == 0:
            first_call_s = seconds
    times = []
    peaks = []
    for _ in range(grid.repeats):
        with PeakMemory(device) as peak:
            seconds, _ = _timed(step, device)
        times.append(seconds)
        peaks.append(peak.peak_bytes)
    known_peaks = [p for p in peaks if p is not None]
    return times, first_call_s, max(known_peaks) if known_peaks else None


def measure_training(
    variant: Variant, length: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Forward + backward of the next-token loss on `batch_size` x `length` random tokens (no optimiser
    step)."""
    model = variant.model
    ids = _random_ids(model.config.vocab_size, grid.batch_size, length, device, seed)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        variant(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    model.train()
    try:
        times, first_call_s, peak = _repeat_timed(step, grid, device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return _throughput(times, first_call_s, peak, grid.batch_size * length)


def _throughput(times: list[float], first_call_s: float, peak: int | None, tokens: int) -> dict[str, Any]:
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peak,
        "first_call_seconds": _finite_or_none(first_call_s),
    }


def measure_prefill(
    variant: Variant, length: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """One forward pass over `length` tokens that builds the cache (logits of the last position only)."""
    ids = _random_ids(variant.model.config.vocab_size, grid.batch_size, length, device, seed)

    def step() -> Any:
        with torch.inference_mode():
            return variant(input_ids=ids, use_cache=True, logits_to_keep=1)

    times, first_call_s, peak = _repeat_timed(step, grid, device)
    return _throughput(times, first_call_s, peak, grid.batch_size * length)


def measure_decode_run(
    variant: Variant, context: int, grid: BenchmarkGrid, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """One decode run: prefill `context` tokens with the cache, take `warmup` untimed single-token steps, then
    time `decode_tokens` single-token steps that each pass the cache back. A `recompute_prefix` variant has no
    cache: each step is a forward pass over the whole sequence so far (`no_cache_decode_tokens` of them timed)."""
    vocab_size = variant.model.config.vocab_size
    ids = _random_ids(vocab_size, grid.batch_size, context, device, seed)
    warmup = variant.decode_warmup + grid.warmup
    timed = grid.no_cache_decode_tokens if variant.recompute_prefix else grid.decode_tokens
    steps = _random_ids(vocab_size, grid.batch_size, warmup + timed, device, seed + 1)
    step_times = []
    cache = cache_bytes = cache_bytes_after = None
    with torch.inference_mode():
        if not variant.recompute_prefix:
            # The Llama too: the cache under the installed release's name (see `compat.CACHE_FIELD`).
            cache = getattr(variant(input_ids=ids, use_cache=True, logits_to_keep=1), CACHE_FIELD)
            cache_bytes = cache_nbytes(cache)
        for index in range(warmup + timed):
            token = steps[:, index : index + 1]
            if variant.recompute_prefix:
                ids = torch.cat([ids, token], dim=1)
                seconds, _ = _timed(lambda s=ids: variant(input_ids=s, use_cache=False, logits_to_keep=1), device)
            else:
                seconds, output = _timed(
                    lambda t=token, c=cache: variant(input_ids=t, use_cache=True, **{CACHE_FIELD: c}), device
                )
                cache = getattr(output, CACHE_FIELD)
            if index >= warmup:
                step_times.append(seconds)
        if cache is not None:
            cache_bytes_after = cache_nbytes(cache)
    return {"step_seconds": step_times, "cache_bytes": cache_bytes, "cache_bytes_after_decode": cache_bytes_after}


def summarize_decode_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A decode cell from its runs: ms/token is the median over the runs of each run's mean step time (memory
    updates amortised), so that one disturbed run on a shared machine does not decide it."""
    means = [statistics.fmean(run["step_seconds"]) for run in runs]
    steps = [seconds for run in runs for seconds in run["step_seconds"]]
    return {
        "ms_per_token": 1000.0 * statistics.median(means),
        "ms_per_token_runs": [1000.0 * mean for mean in means],
        "ms_per_token_median": 1000.0 * statistics.median(steps),
        "ms_per_token_max": 1000.0 * max(steps),
        "cache_bytes": runs[-1]["cache_bytes"],
        "cache_bytes_after_decode": runs[-1]["cache_bytes_after_decode"],
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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


def compile_summary(backend: str | Callable[..., Any]) -> dict[str, Any]:
    """What Dynamo did during the run (its global counters, cleared when the run starts): graphs compiled,
    frames it gave up on, and the graph breaks by reason."""
    counters = torch._dynamo.utils.counters
    breaks: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        short = _short_graph_break_reason(reason)
        breaks[short] = breaks.get(short, 0) + count
    return {
        "backend": _backend_name(backend),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "frames": counters["frames"].get("total", 0),
        "frames_compiled": counters["frames"].get("ok", 0),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": dict(sorted(breaks.items(), key=lambda item: -item[1])),
    }


def _backend_name(backend: str | Callable[..., Any] | None) -> str | None:
    if backend is None or isinstance(backend, str):
        return backend
    return getattr(backend, "__name__", repr(backend))


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------


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
    recorded with its error and the run goes on. Returns a JSON-ready dict (see the module docstring)."""
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
            "compile_backend": _backend_name(compile_backend),
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


# ------------------------------------------------------------------------------------------------------------
# Goals
# ------------------------------------------------------------------------------------------------------------


def _lookup(results: dict[str, Any], section: str, variant: str, length: int, field: str) -> float | None:
    row = _find_row(results, section, variant, length)
    return None if row is None else row.get(field)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _goal(goal: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    status = "not measured" if value is None or met is None else ("met" if met else "missed")
    return {"goal": goal, "value": value, "target": target, "status": status}


def _growth_exponent(results: dict[str, Any], section: str, variant: str, lengths: Sequence[int]) -> float | None:
    """Exponent p of memory ~ length^p between the shortest and the longest length (1: linear, 2: T x T)."""
    if len(lengths) < 2:
        return None
    short, long = min(lengths), max(lengths)
    low = _lookup(results, section, variant, short, "peak_memory_bytes")
    high = _lookup(results, section, variant, long, "peak_memory_bytes")
    if not low or not high or low <= 0 or high <= 0:
        return None
    return math.log(high / low) / math.log(long / short)


def evaluate_goals(results: dict[str, Any], grid: BenchmarkGrid) -> list[dict[str, Any]]:
    """The project's performance targets, checked at the grid's goal lengths."""
    goals = []
    near, far, from_length = grid.goal_decode_near, grid.goal_decode_far, grid.goal_decode_vs_llama_from
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        ratio = _ratio(
            _lookup(results, "decode", variant, far, "ms_per_token"),
            _lookup(results, "decode", variant, near, "ms_per_token"),
        )
        met = None if ratio is None else ratio <= 1.2
        goals.append(_goal(f"{label}: decode ms/token at {far} over at {near} context", ratio, "<= 1.2", met))
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        contexts = [c for c in grid.decode_contexts if c >= from_length]
        ratios = [
            _ratio(
                _lookup(results, "decode", variant, c, "ms_per_token"),
                _lookup(results, "decode", LLAMA, c, "ms_per_token"),
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
    for variant in ATLAS_VARIANTS:
        label = VARIANT_LABELS[variant]
        sizes = [_lookup(results, "decode", variant, c, "cache_bytes") for c in grid.decode_contexts]
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
    # (variant, length, threshold, strictly faster): TTL on >= 0.5x at the short length and faster at the long
    # one; TTL off >= 0.9x at the short length.
    speed_targets = (
        (ATLAS_TTL_ON, grid.goal_short, 0.5, False),
        (ATLAS_TTL_ON, grid.goal_long, 1.0, True),
        (ATLAS_TTL_OFF, grid.goal_short, 0.9, False),
    )
    for section, what in (("train", "training"), ("prefill", "prefill")):
        for variant, length, threshold, strict in speed_targets:
            ratio = _ratio(
                _lookup(results, section, variant, length, "tokens_per_s"),
                _lookup(results, section, LLAMA, length, "tokens_per_s"),
            )
            met = None if ratio is None else (ratio > threshold if strict else ratio >= threshold)
            target = f"{'>' if strict else '>='} {threshold}"
            goals.append(
                _goal(f"{VARIANT_LABELS[variant]}: {what} tokens/s over Llama's at {length}", ratio, target, met)
            )
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


# ------------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------------


def _variants_in(rows: Iterable[dict[str, Any]]) -> list[str]:
    present = {row["variant"] for row in rows}
    return [name for name in VARIANT_LABELS if name in present]


def _format_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _find_row(results: dict[str, Any], section: str, variant: str, length: int) -> dict[str, Any] | None:
    key = "context" if section == "decode" else "length"
    return next((row for row in results[section] if row["variant"] == variant and row[key] == length), None)


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
    ratio = _ratio(value, llama)
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
        llama = _lookup(results, section, LLAMA, length, field) if with_ratio else None
        cells = [
            _cell(_find_row(results, section, v, length), field, scale, digits, None if v == LLAMA else llama)
            for v in variants
        ]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return lines


def _no_cache_speedup_lines(results: dict[str, Any]) -> list[str]:
    """How much faster per token cached decoding (TTL on) is than the original's no-cache decoding, by context."""
    speedups = []
    for context in sorted({row["context"] for row in results["decode"]}):
        ratio = _ratio(
            _lookup(results, "decode", ATLAS_NO_CACHE, context, "ms_per_token"),
            _lookup(results, "decode", ATLAS_TTL_ON, context, "ms_per_token"),
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
        "## Training step (forward + backward), tokens/s",
        "",
        *_section_table(results, "train", "length", "tokens_per_s", 0),
        "",
        "Peak training memory, MiB:",
        "",
        *_section_table(results, "train", "length", "peak_memory_bytes", 1, 1 / MIB),
        "",
        "## Prefill, tokens/s",
        "",
        *_section_table(results, "prefill", "length", "tokens_per_s", 0),
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
        "Cache after the context, KiB:",
        "",
        *_section_table(results, "decode", "context", "cache_bytes", 0, 1 / 1024),
        "",
        f"Peak memory: {meta['memory_method']}.",
    ]
    errors = [
        f"- {section} {row['variant']} {row.get('length', row.get('context'))}: {row['error']}"
        for section in ("train", "prefill", "decode")
        for row in results[section]
        if "error" in row
    ]
    if errors:
        lines += ["", "Failed measurements:", "", *errors]
    compile_info = results.get("compile")
    if compile_info is not None:
        first_calls = [
            f"{row['length']} tokens: {row['first_call_seconds']:.1f} s"
            for row in results["prefill"]
            if row["variant"] == ATLAS_COMPILED and row.get("first_call_seconds") is not None
        ]
        lines += [
            "",
            f"## torch.compile (backend {compile_info['backend']}, scope: {results['meta']['compile_scope']}, "
            f"mode: {results['meta']['compile_mode'] or 'default'})",
            "",
            f"Dynamo compiled {compile_info['unique_graphs']} graphs from {compile_info['frames']} frames "
            f"({compile_info['frames_compiled']} traced) with {compile_info['graph_breaks']} graph breaks. "
            f"First prefill call (compilation included): {', '.join(first_calls) or 'none'}. Its decode row "
            "is timed after untimed steps that compile the decode graphs (two TTL chunks).",
        ]
        if compile_info["graph_break_reasons"]:
            lines += ["", "Graph breaks (count, reason):", ""]
            lines += [f"- {count} x {reason}" for reason, count in compile_info["graph_break_reasons"].items()]
    lines += ["", "## Goals", "", "| goal | measured | target | status |", "|---|---:|---|---|"]
    for goal in results["goals"]:
        lines.append(f"| {goal['goal']} | {_format_number(goal['value'], 3)} | {goal['target']} | {goal['status']} |")
    return "\n".join(lines) + "\n"


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


# ------------------------------------------------------------------------------------------------------------
# Profile
# ------------------------------------------------------------------------------------------------------------


def profile_atlas(
    config: AtlasMAGConfig,
    prefill_length: int,
    decode_tokens: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ttl: bool = True,
    top: int = 20,
) -> str:
    """cProfile of an Atlas-MAG prefill of `prefill_length` tokens, then of `decode_tokens` single-token
    steps: the functions with the most cumulative and own time, as text (to find what to optimise)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = AtlasMAGForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = _random_ids(config.vocab_size, 1, prefill_length, device, seed=0)
    steps = _random_ids(config.vocab_size, 1, decode_tokens, device, seed=1)
    with torch.inference_mode():
        model(input_ids=ids[:, : min(prefill_length, 2 * config.ttl_chunk_size)], ttl=ttl)  # warm-up
    sections = []
    cache = None

    def prefill() -> None:
        nonlocal cache
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1, ttl=ttl).cache

    def decode() -> None:
        nonlocal cache
        for index in range(decode_tokens):
            cache = model(
                input_ids=steps[:, index : index + 1], cache=cache, use_cache=True, ttl=ttl
            ).cache

    for title, function in (
        (f"prefill of {prefill_length} tokens", prefill),
        (f"{decode_tokens} decode steps", decode),
    ):
        profiler = cProfile.Profile()
        with torch.inference_mode():
            synchronize(device)
            profiler.enable()
            function()
            synchronize(device)
            profiler.disable()
        for sort in ("cumulative", "tottime"):
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(sort)
            stats.print_stats(top)
            body = stream.getvalue()
            sections.append(f"=== {title}, TTL {'on' if ttl else 'off'}, sorted by {sort} ===\n{body.strip()}\n")
    return "\n".join(sections)


def override_grid(grid: BenchmarkGrid, **changes: Any) -> BenchmarkGrid:
    """`grid` with the given fields replaced (None leaves a field as it is)."""
    return replace(grid, **{name: value for name, value in changes.items() if value is not None})
