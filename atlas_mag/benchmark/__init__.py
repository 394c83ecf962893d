"""Speed benchmark: Atlas-MAG (test-time learning on and off, and `torch.compile`d) against a
`transformers.LlamaForCausalLM` of the same width, depth, heads, vocabulary and FFN size (full causal
attention, KV cache, sdpa), all measured in one process on one machine.

- `grid`: what to measure (`BenchmarkGrid`, `FULL_GRID`, `QUICK_GRID`);
- `variants`: the models measured and the small model of quick runs;
- `timing`, `peak_memory`: timed calls and the peak memory they allocate;
- `measure`: training step, prefill and decode of one model at one length;
- `kernels`: the machine's matmul rate and the Newton–Schulz micro-benchmark;
- `flops`: the analytic FLOPs per token of every row, by kind;
- `compilation`: what Dynamo compiled, and its graph breaks;
- `runner`: `run_benchmark`, every measurement of a grid into a JSON-ready dict;
- `goals`: the project's performance targets checked against those numbers;
- `report`: JSON, Markdown and a PNG plot of the results;
- `profiling`: a cProfile of Atlas-MAG prefill and decoding.
"""

from .goals import evaluate_goals
from .grid import FULL_GRID, QUICK_GRID, BenchmarkGrid, override_grid
from .measure import cache_nbytes, measure_decode_run
from .peak_memory import PeakMemory
from .profiling import profile_atlas
from .report import render_markdown, write_report
from .runner import run_benchmark
from .variants import (
    ATLAS_COMPILED,
    ATLAS_NO_CACHE,
    ATLAS_TTL_OFF,
    ATLAS_TTL_ON,
    COMPILE_SCOPES,
    LLAMA,
    Variant,
    build_variants,
    llama_config_for,
    quick_config,
)

__all__ = [
    "ATLAS_COMPILED",
    "ATLAS_NO_CACHE",
    "ATLAS_TTL_OFF",
    "ATLAS_TTL_ON",
    "COMPILE_SCOPES",
    "FULL_GRID",
    "LLAMA",
    "QUICK_GRID",
    "BenchmarkGrid",
    "PeakMemory",
    "Variant",
    "build_variants",
    "cache_nbytes",
    "evaluate_goals",
    "llama_config_for",
    "measure_decode_run",
    "override_grid",
    "profile_atlas",
    "quick_config",
    "render_markdown",
    "run_benchmark",
    "write_report",
]
