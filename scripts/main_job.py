"""The end-to-end job behind `make main`: train a small Atlas-MAG on associative recall beyond its attention window
(CPU, minutes, nothing downloaded), save it as a Hub-ready folder, reload it with trust_remote_code, serve a query
through a text-generation pipeline, and report recall with test-time learning on and off."""

import argparse
import logging
from pathlib import Path

from atlas_mag.main_job import MainJobSettings, format_report, run_main_job
from atlas_mag.tasks.recall import TrainingRecipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/main_job"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one trained model per seed")
    parser.add_argument("--steps", type=int, default=TrainingRecipe.steps, help="training steps per seed")
    parser.add_argument(
        "--single-pair-steps",
        type=int,
        default=TrainingRecipe.single_pair_steps,
        help="the first steps train on one pair and one query (curriculum)",
    )
    parser.add_argument("--eval-sequences", type=int, default=256, help="test sequences per seed and condition")
    parser.add_argument("--workers", type=int, default=0, help="parallel training processes (0: one per core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = MainJobSettings(
        output_dir=args.output_dir,
        seeds=tuple(args.seeds),
        recipe=TrainingRecipe(steps=args.steps, single_pair_steps=args.single_pair_steps),
        eval_sequences=args.eval_sequences,
        workers=args.workers,
    )
    print(format_report(run_main_job(settings)))


if __name__ == "__main__":
    main()
