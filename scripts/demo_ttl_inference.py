"""Run the same prompts through `generate` with test-time learning on and off and print, per prompt, the prompt's
perplexity, the generated text, the time per token and whether the outputs differ. Every generate call starts
from the model's stored memory, so prompts and settings never influence each other."""

import argparse
from pathlib import Path

import torch

from atlas_mag.reporting import write_json
from atlas_mag.tasks.demo import DEFAULT_PROMPTS, demo_to_json, format_demo, load_model_folder, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a model folder (converted or trained)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); defaults to built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--order", default="on,off", help="settings in the order they run, e.g. off,on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    try:
        model, tokenizer = load_model_folder(args.model, device=args.device)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    report = run_demo(model, tokenizer, args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, args.order.split(","))
    print(format_demo(report))
    if args.json:
        write_json(args.json, demo_to_json(report))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
