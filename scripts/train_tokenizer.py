"""Train a ByteLevel BPE tokenizer like the published one (32,000 tokens; <pad>=0 <unk>=1 <bos>=2 <eos>=3) and
save it as a PreTrainedTokenizerFast folder.

    python scripts/train_tokenizer.py --data corpus.jsonl --output outputs/tokenizer --max-documents 200000
    python scripts/train_tokenizer.py --data HuggingFaceTB/smollm-corpus --name fineweb-edu-dedup --from-hub \
        --max-documents 500000 --output outputs/tokenizer_32k
    python scripts/train_tokenizer.py --stdlib-corpus outputs/stdlib.jsonl --vocab-size 2048 \
        --output outputs/tokenizer_tiny        # offline: writes the stdlib text and trains on it
"""

from __future__ import annotations

import argparse
from itertools import islice

from atlas_mag.tokenization import train_bpe_tokenizer
from atlas_mag.training.data import DataSource, load_source, stdlib_documents, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="local .txt/.jsonl/.parquet file, save_to_disk folder, or Hub dataset id")
    source.add_argument(
        "--stdlib-corpus", metavar="JSONL", help="write the Python standard library's sources here and train on them"
    )
    parser.add_argument("--name", default=None, help="dataset config name (Hub)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--from-hub", action="store_true", help="--data is a Hub dataset id (streamed)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--split-digits", action="store_true", help="every digit a token of its own")
    parser.add_argument("--output", required=True, help="folder to save the tokenizer into")
    args = parser.parse_args()
    try:
        if args.stdlib_corpus:
            args.data = str(write_jsonl(stdlib_documents(), args.stdlib_corpus))
        spec = DataSource(args.data, args.name, args.split, args.from_hub, text_field=args.text_field)
        texts = (row["text"] for row in islice(load_source(spec), args.max_documents) if row["text"])
        tokenizer = train_bpe_tokenizer(
            texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, split_digits=args.split_digits
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    tokenizer.save_pretrained(args.output)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output}")


if __name__ == "__main__":
    main()
