"""Pretrain Atlas-MAG from a YAML config, on a CPU, one GPU or many.

python scripts/train.py configs/tiny.yaml
python scripts/train.py configs/tiny.yaml --set training.max_steps=20 --set output_dir=outputs/try
python scripts/train.py configs/tiny.yaml --resume                  # continue from the latest checkpoint
python scripts/train.py configs/tiny.yaml --resume outputs/tiny/checkpoints/step_00000100
accelerate launch --num_processes 8 scripts/train.py configs/atlas_mag_43m.yaml          # DDP
accelerate launch --config_file configs/accelerate_fsdp.yaml scripts/train.py configs/atlas_mag_43m.yaml \
    --set training.sharding=fsdp2                                                          # FSDP2
"""

from __future__ import annotations

import argparse

from atlas_mag.cli import add_run_config_overrides
from atlas_mag.training import load_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run configuration (see configs/)")
    add_run_config_overrides(parser, "training.max_steps=20 or data.sources.0.path=my.jsonl")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint folder, or from the latest one of output_dir when no path is given",
    )
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        train(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
