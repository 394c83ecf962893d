"""Micro-benchmarks of one run: the machine's matrix-product rate (what the FLOP fractions are measured against)
and Newton–Schulz per memory matrix shape, evaluated directly and in Gram space."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..configuration_atlas import AtlasMAGConfig
from ..memory_atlas import AtlasMAGMemory
from ..ops_atlas import newton_schulz, newton_schulz_choice, newton_schulz_flops
from .timing import timed_call

MATMUL_PROBE_SIZE = 2048
MATMUL_PROBE_CALLS = 4


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype whose product rate a run is held to: bfloat16 on an accelerator running bfloat16, else float32
    (Atlas-MAG's memory runs in fp32 whatever the model's dtype)."""
    return dtype if device.type != "cpu" and dtype == torch.bfloat16 else torch.float32


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """FLOP/s of a square `MATMUL_PROBE_SIZE` product in `matmul_dtype`, best of `MATMUL_PROBE_CALLS` after a
    warm-up call, with the run's threads."""
    probe_dtype = matmul_dtype(dtype, device)
    size = MATMUL_PROBE_SIZE
    left = torch.randn(size, size, device=device, dtype=probe_dtype)
    right = torch.randn(size, size, device=device, dtype=probe_dtype)
    timed_call(lambda: left @ right, device)
    best = min(timed_call(lambda: left @ right, device)[0] for _ in range(MATMUL_PROBE_CALLS))
    return {
        "flops_per_s": 2 * size**3 / best,
        "probe": f"{size}x{size} @ {size}x{size} {str(probe_dtype).removeprefix('torch.')}, best of "
        f"{MATMUL_PROBE_CALLS} after a warm-up call",
    }


def newton_schulz_shapes(config: AtlasMAGConfig, batch_size: int) -> list[tuple[int, int, int]]:
    """[batch, m, n] (m <= n) of the batched calls one Muon update makes (`ops_atlas.newton_schulz_grouped`:
    matrices with the same smaller Gram side share a call), largest first."""
    counts: dict[tuple[int, int], int] = {}
    for weight in AtlasMAGMemory(config).weights().tensors():
        if weight.dim() == 2:
            oriented = (min(weight.shape), max(weight.shape))
            counts[oriented] = counts.get(oriented, 0) + 1
    shapes = [(count * batch_size, m, n) for (m, n), count in counts.items()]
    return sorted(shapes, key=lambda shape: shape[1] * shape[2], reverse=True)


def measure_newton_schulz(
    config: AtlasMAGConfig, batch_size: int, repeats: int, device: torch.device, seed: int = 0
) -> list[dict[str, Any]]:
    """Per call shape of an update: ms per call of the direct and the Gram evaluation (median of `repeats` after
    a warm-up call), each one's error relative to an fp64 run of the direct iteration, and the evaluation that
    `config.ttl_ns_evaluation` chooses."""
    generator = torch.Generator().manual_seed(seed)
    steps = config.ttl_ns_steps
    rows = []
    for batch, m, n in newton_schulz_shapes(config, batch_size):
        matrices = torch.randn(batch, m, n, generator=generator).to(device)
        reference = newton_schulz(matrices.double(), steps, "direct")
        row: dict[str, Any] = {
            "shape": [batch, m, n],
            "chosen": newton_schulz_choice(m, n, steps, config.ttl_ns_evaluation),
        }
        for evaluation in ("direct", "gram"):

            def call(x: torch.Tensor = matrices, e: str = evaluation) -> torch.Tensor:
                return newton_schulz(x, steps, e)

            timed_call(call, device)
            times = [timed_call(call, device) for _ in range(repeats)]
            result = times[-1][1]
            row[f"{evaluation}_ms"] = 1000.0 * statistics.median(seconds for seconds, _ in times)
            row[f"{evaluation}_error"] = ((result.double() - reference).norm() / reference.norm()).item()
            row[f"{evaluation}_flops"] = batch * newton_schulz_flops(m, n, steps, evaluation)
        row["speedup"] = row["direct_ms"] / row[f"{row['chosen']}_ms"]
        rows.append(row)
    return rows
