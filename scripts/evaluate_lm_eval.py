"""lm-evaluation-harness (the `hf` backend, `trust_remote_code=True`) on a saved recall model, with test-time
learning on and off: the local tasks of atlas_mag/tasks/lm_eval_tasks (associative recall, documents made for the
model: see atlas_mag/lm_eval_harness.py). Prints a table TTL on vs off and writes the scores as JSON.

    python scripts/evaluate_lm_eval.py outputs/main_job/atlas-mag-recall --output outputs/lm_eval/results.json
    python scripts/evaluate_lm_eval.py FOLDER --tasks atlas_recall_gen --limit 64 --metadata recall_gap=32

The same through lm-eval's own command line (TTL off; drop ttl_enabled=False for TTL on):

    lm_eval run --model hf --model_args pretrained=FOLDER,trust_remote_code=True,ttl_enabled=False \
        --include_path atlas_mag/tasks/lm_eval_tasks --tasks atlas_recall --device cpu

Needs the `evaluation` extra: pip install -e ".[evaluation]".
"""

from __future__ import annotations

import argparse

from atlas_mag.cli import parse_assignment
from atlas_mag.lm_eval_harness import TASK_NAMES, compare_ttl, ttl_table
from atlas_mag.reporting import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder written by save_model_folder (or a Hub repository id)")
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument(
        "--metadata",
        type=parse_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="how the documents are made: recall_sequences (256), recall_seed (1234), recall_gap (the model's "
        "receptive field without TTL), recall_pairs, recall_queries (RecallTask's)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="for the perplexity's standard error")
    parser.add_argument(
        "--max-length", type=int, default=None, help="longest input in tokens (lm-eval cuts longer ones; default 2048)"
    )
    parser.add_argument("--output", default=None, help="write the scores as JSON here")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    try:
        summary = compare_ttl(
            args.model,
            args.tasks,
            args.limit,
            device=args.device,
            batch_size=args.batch_size,
            bootstrap_iters=args.bootstrap_iters,
            max_length=args.max_length,
            metadata=dict(args.metadata),
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    task = summary["recall_task"]
    print(
        f"{args.model}: recall of {task['num_pairs']} pairs over {task['num_values']} values, gap {task['gap']}, "
        f"{task['num_queries']} queries per sequence (chance {task['chance']:.3f}); lm-eval "
        f"{summary['lm_eval_version']}"
    )
    print(ttl_table(summary))
    if args.output:
        print(f"wrote {write_json(args.output, summary)}")


if __name__ == "__main__":
    main()
