"""Serving benchmark: requests/s and latency (p50, p95) of `transformers serve` (through scripts/serve.py) with
concurrent clients, for a random Atlas-MAG and a same-size LlamaForCausalLM, each saved to a folder and served
the same way, at a short prompt and a long one (several sliding windows). Every request is a greedy
/v1/completions call for exactly --new-tokens tokens. Writes JSON and prints a Markdown table.

    python scripts/benchmark_serving.py                      # the small CPU model of benchmark_speed --quick
    python scripts/benchmark_serving.py --requests 64 --long-tokens 2048 --output outputs/serving/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from atlas_mag import AtlasMAGForCausalLM  # noqa: E402
from atlas_mag.benchmark import llama_config_for, quick_config  # noqa: E402
from atlas_mag.hub import save_model_folder  # noqa: E402
from atlas_mag.reporting import markdown_table, write_json  # noqa: E402
from atlas_mag.serving import free_port, running_server  # noqa: E402
from atlas_mag.tokenization import train_bpe_tokenizer  # noqa: E402

SERVE_SCRIPT = Path(__file__).resolve().parent / "serve.py"


def save_models(root: Path, long_tokens: int, new_tokens: int) -> tuple[dict[str, Path], object]:
    """The random Atlas-MAG (with save_model_folder) and the same-size Llama (save_pretrained: a built-in class
    needs no code in its folder), sharing one small BPE tokenizer; returns the folders and the tokenizer."""
    torch.manual_seed(0)
    config = quick_config()
    words = [f"{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{i % 7}" for i in range(4000)]
    tokenizer = train_bpe_tokenizer([" ".join(words[i : i + 50]) for i in range(0, 4000, 10)], config.vocab_size)
    atlas = save_model_folder(AtlasMAGForCausalLM(config), root / "atlas-mag", tokenizer=tokenizer)
    llama = LlamaForCausalLM(llama_config_for(config, max_position_embeddings=long_tokens + new_tokens + 64))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return {"Atlas-MAG": atlas, "Llama": root / "llama"}, tokenizer


def prompt_of(tokenizer, tokens: int, seed: int) -> tuple[str, int]:
    """A text of about `tokens` tokens (random ids, decoded) and its length in tokens once encoded again."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tokenizer), (tokens,), generator=generator).tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text, len(tokenizer(text)["input_ids"])


def measure(url: str, model: str, prompt: str, requests: int, clients: int, new_tokens: int) -> dict:
    """`requests` greedy completions of exactly `new_tokens` tokens from `clients` concurrent clients."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    # A whole generation config (no EOS), so both models generate the same number of tokens.
    fixed = {"generation_config": json.dumps({"max_new_tokens": new_tokens, "do_sample": False})}

    def one(_: int) -> float:
        start = time.perf_counter()
        client.completions.create(model=model, prompt=prompt, extra_body=fixed)
        return time.perf_counter() - start

    one(0)  # warm-up
    with ThreadPoolExecutor(max_workers=clients) as pool:
        start = time.perf_counter()
        latencies = sorted(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - start
    client.close()
    return {
        "requests_per_second": requests / elapsed,
        "p50_seconds": statistics.median(latencies),
        "p95_seconds": statistics.quantiles(latencies, n=20, method="inclusive")[18],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="requests per model and prompt")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--short-tokens", type=int, default=32, help="short prompt length, in tokens")
    parser.add_argument("--long-tokens", type=int, default=640, help="long prompt length (5 windows of 128)")
    parser.add_argument("--device", default="cpu", help="passed to `transformers serve --device`")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_serving/results.json"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark-serving-") as root:
        folders, tokenizer = save_models(Path(root), args.long_tokens, args.new_tokens)
        prompts = {"short": prompt_of(tokenizer, args.short_tokens, 0)}
        prompts["long"] = prompt_of(tokenizer, args.long_tokens, 1)
        for name, folder in folders.items():
            port = free_port()
            command = [sys.executable, str(SERVE_SCRIPT), str(folder), "--port", str(port), "--device", args.device]
            with running_server(command, port, Path(root) / f"{name}.log") as (_, url):
                for prompt_name, (prompt, prompt_tokens) in prompts.items():
                    numbers = measure(url, str(folder), prompt, args.requests, args.clients, args.new_tokens)
                    results.append({"model": name, "prompt": prompt_name, "prompt_tokens": prompt_tokens, **numbers})
                    print(f"{name} {prompt_name}: {numbers}", flush=True)

    settings = {key: value for key, value in vars(args).items() if key != "output"}
    write_json(args.output, {"settings": {**settings, "model": quick_config().to_dict()}, "results": results})
    header = ["model", "prompt (tokens)", "requests/s", "p50 latency (s)", "p95 latency (s)"]
    rows = [
        [r["model"], f"{r['prompt']} ({r['prompt_tokens']})", f"{r['requests_per_second']:.2f}",
         f"{r['p50_seconds']:.2f}", f"{r['p95_seconds']:.2f}"]
        for r in results
    ]
    print(markdown_table(header, rows))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
