"""Convert the published Atlas-MAG training checkpoint (a trusted pickle) into a Hugging Face model folder:
config.json with auto_map, model.safetensors, the model's code, the tokenizer and a model card.

    python scripts/convert_checkpoint.py --checkpoint checkpoint_step008800.pt \\
        --tokenizer tokenizer_atlas_mag_32k.json --output outputs/atlas-mag-43m
    python scripts/convert_checkpoint.py ... --overwrite --push-to-hub user/atlas-mag-43m [--private]
"""

from __future__ import annotations

import argparse
import logging
import sys

from atlas_mag.convert import convert_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="training checkpoint .pt of the original code")
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer.json (tokenizers format) it was trained with"
    )
    parser.add_argument("--output", required=True, help="folder to write (a Hub model repository)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists and is not empty"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the written folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output = convert_checkpoint(
            args.checkpoint,
            args.tokenizer,
            args.output,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (ValueError, OSError) as error:  # bad input (CheckpointError is a ValueError) or output folder
        sys.exit(f"error: {error}")
    print(output)


if __name__ == "__main__":
    main()
