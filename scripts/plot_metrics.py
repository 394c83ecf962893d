"""Plot the curves of a training run (loss, validation loss with TTL on and off, learning rate, gradient norm,
throughput, TTL statistics) from its metrics.jsonl into a PNG.

    python scripts/plot_metrics.py outputs/tiny/metrics.jsonl                 # writes outputs/tiny/metrics.png
    python scripts/plot_metrics.py outputs/tiny/metrics.jsonl --output curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atlas_mag.training import plot_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by scripts/train.py")
    parser.add_argument("--output", default=None, help="PNG path (default: beside the metrics file)")
    args = parser.parse_args()
    output = args.output or Path(args.metrics).with_suffix(".png")
    try:
        path = plot_metrics(args.metrics, output)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
