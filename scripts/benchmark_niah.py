"""Needle-in-a-haystack retrieval over a grid of context lengths and needle depths, with test-time learning on,
off, and with the memory gate removed. Writes niah_results.json, niah_table.md and one heatmap per condition."""

import argparse
import logging
from pathlib import Path

import torch

from atlas_mag.tasks.demo import load_model_folder
from atlas_mag.tasks.niah import CONDITIONS, DEFAULT_DEPTHS, niah_table, run_niah, write_niah_report


def numbers(text: str, kind: type) -> list:
    return [kind(item) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a model folder (converted or trained)")
    parser.add_argument("--lengths", help="comma-separated context lengths; default: 1/2 to 8 sliding windows")
    parser.add_argument("--depths", default=",".join(str(depth) for depth in DEFAULT_DEPTHS))
    parser.add_argument("--samples", type=int, default=3, help="prompts per cell")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/niah"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--digits", type=int, default=6, help="digits of each needle's secret number")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    model, tokenizer = load_model_folder(args.model, device=args.device)
    results = run_niah(
        model,
        tokenizer,
        lengths=numbers(args.lengths, int) if args.lengths else None,
        depths=numbers(args.depths, float),
        samples_per_cell=args.samples,
        conditions=args.conditions.split(","),
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        num_digits=args.digits,
    )
    results["model"] = str(args.model)
    written = write_niah_report(results, args.output_dir)
    print(niah_table(results))
    print("\n".join(f"{name}: {path}" for name, path in written.items()))


if __name__ == "__main__":
    main()
