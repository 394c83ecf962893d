"""Speed benchmark of Atlas-MAG (TTL on, TTL off, torch.compile) against a same-size Llama: training, prefill
and decoding throughput, peak memory and cache size. Writes JSON, Markdown and a PNG plot.

    python scripts/benchmark_speed.py --quick                               # small model, CPU, ~minutes
    python scripts/benchmark_speed.py --device cuda --dtype bfloat16       # published model size, full grid
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from atlas_mag import AtlasMAGConfig  # noqa: E402
from atlas_mag.benchmark import (  # noqa: E402
    COMPILE_SCOPES,
    FULL_GRID,
    QUICK_GRID,
    override_grid,
    profile_atlas,
    quick_config,
    render_markdown,
    run_benchmark,
    write_report,
)
from atlas_mag.cli import DTYPES  # noqa: E402
from atlas_mag.reporting import write_text  # noqa: E402


def lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and short lengths (a CPU run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/benchmark_speed"))
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend of the compiled row (default: inductor; eager with --quick, because "
        "inductor's C++ code generation takes minutes on a small CPU)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default="chunks",
        help="compile each block and run it one TTL chunk at a time (chunks, the default: after warm-up a new "
        "prompt length compiles nothing), each block over the whole call (blocks: every new number of TTL chunks "
        "compiles anew) or the whole forward (model: slowest to compile)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the compiled row (reduce-overhead: CUDA graphs on a GPU, which remove the "
        "per-kernel launch cost of decoding; ignored by the eager backend)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 for fp32 matrix products (Atlas-MAG's memory and its test-time learning run in fp32)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--train-lengths", type=lengths)
    parser.add_argument("--prefill-lengths", type=lengths)
    parser.add_argument("--decode-contexts", type=lengths)
    parser.add_argument(
        "--compile-lengths",
        type=lengths,
        help="prefill lengths and decode contexts of the compiled row (outside the chunks scope, each prefill "
        "length compiles anew)",
    )
    parser.add_argument("--decode-tokens", type=int, help="timed decode steps per context")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 with --quick, whose small ops time far more "
        "steadily on one thread of a shared CPU)",
    )
    parser.add_argument("--profile", action="store_true", help="also write a cProfile of Atlas prefill and decode")
    args = parser.parse_args()

    if args.tf32:
        torch.set_float32_matmul_precision("high")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    config = quick_config() if args.quick else AtlasMAGConfig()
    grid = override_grid(
        QUICK_GRID if args.quick else FULL_GRID,
        train_lengths=args.train_lengths,
        prefill_lengths=args.prefill_lengths,
        decode_contexts=args.decode_contexts,
        compile_lengths=args.compile_lengths,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        batch_size=args.batch_size,
    )
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    try:
        results = run_benchmark(
            config,
            grid,
            args.device,
            dtype,
            compile_backend=None if args.no_compile else backend,
            compile_scope=args.compile_scope,
            compile_mode=args.compile_mode,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    paths = write_report(results, args.output_dir)
    print(render_markdown(results))
    if args.profile:
        profile = profile_atlas(config, max(grid.prefill_lengths), grid.decode_tokens, args.device, dtype)
        paths["profile"] = args.output_dir / "benchmark_speed_profile.txt"
        write_text(paths["profile"], profile)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
