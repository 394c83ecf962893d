"""vLLM throughput: generated tokens/s and requests/s of vLLM's engine (`vllm.LLM`) serving a random Atlas-MAG (the
`atlas_mag` plugin) and a same-size LlamaForCausalLM (vLLM's own Llama), both saved to folders and run in the
same process one after the other, with 8 and 32 requests in flight at once, at a short prompt and a long one
(several sliding windows). Every request is greedy and generates exactly --new-tokens tokens. Writes JSON and
prints a Markdown table. Runs in vLLM's venv (`make setup-vllm`):

    .venv-vllm/bin/python scripts/benchmark_vllm.py                 # the small CPU model of benchmark_speed --quick
    .venv-vllm/bin/python scripts/benchmark_vllm.py --long-tokens 2048 --output outputs/benchmark_vllm/long.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from atlas_mag import AtlasMAGForCausalLM  # noqa: E402
from atlas_mag.benchmark import llama_config_for, quick_config  # noqa: E402
from atlas_mag.hub import save_model_folder  # noqa: E402
from atlas_mag.reporting import markdown_table, write_json  # noqa: E402

CONCURRENCY = (8, 32)


def save_models(root: Path, max_tokens: int) -> dict[str, Path]:
    """The random Atlas-MAG and the same-size Llama, in folders vLLM loads (no tokenizer: prompts are token ids)."""
    torch.manual_seed(0)
    config = quick_config()
    atlas = save_model_folder(AtlasMAGForCausalLM(config), root / "atlas-mag")
    LlamaForCausalLM(llama_config_for(config, max_position_embeddings=max_tokens)).save_pretrained(root / "llama")
    return {"Atlas-MAG": atlas, "Llama": root / "llama"}


def measure(llm: LLM, prompt_tokens: int, requests: int, new_tokens: int, vocab_size: int) -> dict:
    """`requests` greedy requests of `prompt_tokens` random ids each, all submitted at once, each generating exactly
    `new_tokens` tokens; the engine runs them together (its max_num_seqs is the largest concurrency measured)."""
    generator = torch.Generator().manual_seed(requests)
    prompts = [
        {"prompt_token_ids": torch.randint(4, vocab_size, (prompt_tokens,), generator=generator).tolist()}
        for _ in range(requests)
    ]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {
        "seconds": elapsed,
        "requests_per_second": requests / elapsed,
        "generated_tokens_per_second": generated / elapsed,
        "total_tokens_per_second": (generated + requests * prompt_tokens) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--short-tokens", type=int, default=32, help="short prompt length, in tokens")
    parser.add_argument("--long-tokens", type=int, default=640, help="long prompt length (5 windows of 128)")
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_vllm/results.json"))
    args = parser.parse_args()

    max_tokens = args.long_tokens + args.new_tokens + 64
    vocab_size = quick_config().vocab_size
    prompts = {"short": args.short_tokens, "long": args.long_tokens}
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark-vllm-") as root:
        for name, folder in save_models(Path(root), max_tokens).items():
            llm = LLM(
                str(folder),
                skip_tokenizer_init=True,
                enforce_eager=True,
                dtype=args.dtype,
                max_model_len=max_tokens,
                max_num_seqs=max(CONCURRENCY),
                kv_cache_memory_bytes=1 << 30,
                seed=0,
            )
            measure(llm, args.short_tokens, 2, 4, vocab_size)  # warm-up
            for prompt_name, prompt_tokens in prompts.items():
                for concurrency in CONCURRENCY:
                    numbers = measure(llm, prompt_tokens, concurrency, args.new_tokens, vocab_size)
                    row = {"model": name, "prompt": prompt_name, "prompt_tokens": prompt_tokens}
                    results.append({**row, "concurrent_requests": concurrency, **numbers})
                    print(f"{name} {prompt_name} x{concurrency}: {numbers}", flush=True)
            llm.llm_engine.engine_core.shutdown()
            del llm

    settings = {key: value for key, value in vars(args).items() if key != "output"}
    write_json(args.output, {"settings": {**settings, "model": quick_config().to_dict()}, "results": results})
    llama = {(r["prompt"], r["concurrent_requests"]): r for r in results if r["model"] == "Llama"}
    header = ["model", "prompt (tokens)", "requests in flight", "generated tokens/s", "requests/s", "vs Llama"]
    rows = []
    for r in results:
        peer = llama[(r["prompt"], r["concurrent_requests"])]
        ratio = r["generated_tokens_per_second"] / peer["generated_tokens_per_second"]
        rows.append(
            [
                r["model"],
                f"{r['prompt']} ({r['prompt_tokens']})",
                r["concurrent_requests"],
                f"{r['generated_tokens_per_second']:.1f}",
                f"{r['requests_per_second']:.2f}",
                f"{ratio:.2f}x",
            ]
        )
    print(markdown_table(header, rows))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
