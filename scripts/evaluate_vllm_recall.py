"""Recall served by vLLM, TTL on and off: a saved recall model (the main job's by default) answers the queries of
the main job's recall evaluation (the same sequences `evaluate_recall` and the lm-eval tasks score: every query
is a request whose prompt is its sequence up to the queried value), greedily, through `vllm.LLM` with many
requests in flight; TTL off is the same folder with `ttl_enabled=False` (vLLM's `hf_overrides`). Writes JSON and
prints a Markdown table. Runs in vLLM's venv (`make setup-vllm`):

    .venv-vllm/bin/python scripts/evaluate_vllm_recall.py                       # outputs/main_job/atlas-mag-recall
    .venv-vllm/bin/python scripts/evaluate_vllm_recall.py path/to/folder --sequences 64
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm import LLM, SamplingParams  # noqa: E402

from atlas_mag.lm_eval_harness import EVAL_SEQUENCES, recall_documents, recall_task_for  # noqa: E402
from atlas_mag.reporting import markdown_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=Path("outputs/main_job/atlas-mag-recall"))
    parser.add_argument("--sequences", type=int, default=EVAL_SEQUENCES, help="recall sequences (2 queries each)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--output", type=Path, default=Path("outputs/vllm_recall/results.json"))
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a saved model folder (no config.json); run `make main` first")

    task = recall_task_for(args.model)
    ids = {token: index for index, token in enumerate(task.vocab)}
    documents = recall_documents(task, args.sequences)
    prompts = [{"prompt_token_ids": [ids[token] for token in doc["context"].split()]} for doc in documents]
    answers = [ids[doc["answer"]] for doc in documents]
    results = []
    for ttl in (True, False):
        llm = LLM(
            str(args.model),
            hf_overrides={"ttl_enabled": ttl},
            max_model_len=task.sequence_length + 1,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_bytes=256 << 20,
            seed=0,
        )
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        seconds = time.perf_counter() - start
        correct = sum(out.outputs[0].token_ids[0] == answer for out, answer in zip(outputs, answers, strict=True))
        results.append({"ttl": ttl, "accuracy": correct / len(answers), "queries": len(answers), "seconds": seconds})
        print(f"TTL {'on' if ttl else 'off'}: {correct}/{len(answers)} right in {seconds:.1f}s", flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm

    write_json(args.output, {"model": str(args.model), "chance": task.chance, "results": results})
    rows = [[f"TTL {'on' if r['ttl'] else 'off'}", f"{r['accuracy']:.3f}", r["queries"]] for r in results]
    rows.append(["chance", f"{task.chance:.3f}", ""])
    print(markdown_table(["served by vLLM", "recall accuracy", "queries"], rows))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
