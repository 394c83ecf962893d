"""The job behind `make niah-lm`: pretrain a small Atlas-MAG on the Python standard library's sources and docs with
needle documents mixed in (CPU, minutes, nothing downloaded), then run the needle-in-a-haystack benchmark on it
(TTL on, off, gate removed; names and filler never seen in training) and the loss by position on held-out text.
A killed run resumes from its latest checkpoint when run again.

    python scripts/train_niah_lm.py
    python scripts/train_niah_lm.py --output-dir outputs/niah_try --set training.max_steps=50
"""

import argparse
import logging
from pathlib import Path

from atlas_mag.cli import add_run_config_overrides
from atlas_mag.niah_lm import DEFAULT_CONFIG, NeedleLMSettings, format_report, run_niah_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=NeedleLMSettings.output_dir)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the run configuration (YAML)")
    add_run_config_overrides(parser, "training.max_steps=50")
    parser.add_argument("--samples", type=int, default=NeedleLMSettings.samples_per_cell, help="prompts per cell")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = NeedleLMSettings(
        output_dir=args.output_dir,
        config=args.config,
        overrides=tuple(args.overrides),
        samples_per_cell=args.samples,
    )
    try:
        result = run_niah_lm(settings)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"error: {error}") from error
    print(format_report(result))


if __name__ == "__main__":
    main()
