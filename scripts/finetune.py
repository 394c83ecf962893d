"""Fine-tune a saved Atlas-MAG model (converted or pretrained) with the Transformers Trainer, gradient
checkpointing on. Any TrainingArguments field can be set with --set KEY=VALUE.

    python scripts/finetune.py --model outputs/tiny/final --data my_texts.jsonl --output-dir outputs/ft \
        --block-size 256 --set max_steps=200 --set learning_rate=1e-4
    accelerate launch --num_processes 4 scripts/finetune.py --model path/to/atlas-mag \
        --data HuggingFaceTB/smollm-corpus --from-hub --name cosmopedia-v2 --set max_steps=1000 --output-dir outputs/ft
"""

from __future__ import annotations

import argparse

from atlas_mag.cli import parse_assignment
from atlas_mag.training import DataSource, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved Atlas-MAG folder (or Hub id)")
    parser.add_argument("--tokenizer", default=None, help="defaults to the model folder's tokenizer")
    parser.add_argument("--data", required=True, help="local .txt/.jsonl/.parquet, save_to_disk folder, or Hub id")
    parser.add_argument("--from-hub", action="store_true", help="--data is a Hub dataset id (streamed; set max_steps)")
    parser.add_argument("--name", default=None, help="dataset config name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--eval-documents", type=int, default=50, help="documents held out for evaluation")
    parser.add_argument("--block-size", type=int, default=1024, help="tokens per training sequence")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--set", dest="overrides", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE"
    )
    args = parser.parse_args()
    source = DataSource(args.data, args.name, args.split, args.from_hub, text_field=args.text_field)
    try:
        _, metrics = finetune(
            args.model,
            source,
            args.output_dir,
            block_size=args.block_size,
            eval_documents=args.eval_documents,
            tokenizer_path=args.tokenizer,
            training_arguments=dict(args.overrides),
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"evaluation: {metrics}")
    print(f"saved the fine-tuned model to {args.output_dir}/final")


if __name__ == "__main__":
    main()
