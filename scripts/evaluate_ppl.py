"""Perplexity of a saved Atlas-MAG model over long documents, with test-time learning on and off side by side.
Each document is read in order, segment by segment, through the model's cache (never cut to one window).

    python scripts/evaluate_ppl.py --model outputs/tiny/final --data outputs/stdlib.jsonl --num-documents 8
    python scripts/evaluate_ppl.py --model path/to/atlas-mag --data HuggingFaceTB/smollm-corpus --from-hub \
        --name fineweb-edu-dedup --num-documents 64 --min-tokens 4096 --max-tokens 8192 --device cuda
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import atlas_mag  # noqa: F401  (registers the Auto classes)
from atlas_mag.cli import DTYPES, local_or_hub
from atlas_mag.reporting import write_json
from atlas_mag.tasks.perplexity import evaluate_perplexity, format_table, long_documents
from atlas_mag.tokenization import load_tokenizer
from atlas_mag.training.data import DataSource, load_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved Atlas-MAG folder (or Hub id)")
    parser.add_argument("--tokenizer", default=None, help="defaults to the model folder's tokenizer")
    parser.add_argument("--data", required=True, help="local .txt/.jsonl/.parquet, save_to_disk folder, or Hub id")
    parser.add_argument("--from-hub", action="store_true", help="--data is a Hub dataset id (streamed)")
    parser.add_argument("--name", default=None, help="dataset config name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--num-documents", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=1024, help="skip documents shorter than this")
    parser.add_argument("--max-tokens", type=int, default=None, help="cut documents at this many tokens")
    parser.add_argument("--segment-length", type=int, default=512, help="tokens per forward call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    try:
        model_path = local_or_hub(args.model, "--model")
        tokenizer = load_tokenizer(args.tokenizer or model_path)
        source = DataSource(args.data, args.name, args.split, args.from_hub, text_field=args.text_field)
        texts = (row["text"] for row in load_source(source))
        documents = long_documents(texts, tokenizer, args.num_documents, args.min_tokens, args.max_tokens)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[args.dtype]).to(args.device)
    results = evaluate_perplexity(model, documents, args.segment_length, progress=True)
    results.update(model=args.model, data=source.label, dtype=args.dtype)
    print(format_table(results))
    if args.output:
        print(f"wrote {write_json(args.output, results)}")


if __name__ == "__main__":
    main()
