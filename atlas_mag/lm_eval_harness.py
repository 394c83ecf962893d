"""lm-evaluation-harness on saved Atlas-MAG folders, with test-time learning on and off.

The harness's `hf` backend loads a folder written by `atlas_mag.hub.save_model_folder` with
`trust_remote_code=True`; its extra model arguments go to `AutoModelForCausalLM.from_pretrained`
(lm_eval/models/huggingface.py, `HFLM._create_model`), which sets the config fields they name, so
`ttl_enabled=False` turns TTL off for the whole run. The local tasks (`TASKS_DIR`, for `--include_path`) are the
associative-recall task of `atlas_mag.tasks.recall` in three forms:

- `atlas_recall_mc` (loglikelihood, multiple choice): which of the task's values follows the queried key
  (`acc`: the correct value has the highest loglikelihood among all values);
- `atlas_recall_loglik` (loglikelihood): the loglikelihood of the correct value (`perplexity` = exp(-mean), and
  `acc`: the value is the greedy token over the whole vocabulary, the main job's recall accuracy);
- `atlas_recall_gen` (generate_until): the greedy answer through `generate` (`exact_match`).

Their documents are made offline, when the harness loads the task (`recall_dataset`, the tasks' `custom_dataset`):
the harness passes the model arguments to it, so the sequences match the evaluated folder: its tokenizer's
symbols, and a gap of the model's receptive field without TTL (as the main job trains). One document per query;
each context is the sequence up to the queried value (earlier queries answered, as in training). By default they
are the sequences `evaluate_recall` scores (256 sequences from `EVAL_SEED`), so `atlas_recall_loglik`'s `acc`
with TTL on is the main job's TTL-on recall of the folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer

from .cli import local_or_hub
from .configuration_atlas import AtlasMAGConfig
from .main_job import MainJobSettings
from .reporting import markdown_table
from .tasks.demo import CONDITIONS
from .tasks.recall import EVAL_SEED, TTL_SETTINGS, RecallTask, receptive_field

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "lm_eval_tasks"
TASK_NAMES = ("atlas_recall_mc", "atlas_recall_loglik", "atlas_recall_gen")
# As many sequences as the main job's recall evaluation.
EVAL_SEQUENCES = MainJobSettings.eval_sequences
# The arguments of `recall_dataset` that shape the documents (lm-eval `--metadata`, the script's `--metadata`).
DOCUMENT_OPTIONS = ("recall_sequences", "recall_seed", "recall_gap", "recall_pairs", "recall_queries")
# The metrics each task reports (lm-eval's result keys are `metric,filter`; these tasks have no filters).
TASK_METRICS = {
    "atlas_recall_mc": ("acc",),
    "atlas_recall_loglik": ("acc", "perplexity"),
    "atlas_recall_gen": ("exact_match",),
}


def recall_task_for(
    pretrained: str | Path, gap: int | None = None, num_pairs: int | None = None, num_queries: int | None = None
) -> RecallTask:
    """The recall task of a saved recall model: keys, values and filler counted in its tokenizer (which must be
    `build_tokenizer`'s, symbol for symbol), the gap of the model's receptive field without TTL unless `gap` is
    given, and `RecallTask`'s pairs and queries unless given (the main job's task)."""
    path = local_or_hub(pretrained, "model")
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    counts = {prefix: sum(bool(re.fullmatch(rf"{prefix}\d+", token)) for token in vocab) for prefix in "kvf"}
    shape = {"num_keys": counts["k"], "num_values": counts["v"], "num_filler": counts["f"]}
    if num_pairs is not None:
        shape["num_pairs"] = num_pairs
    if num_queries is not None:
        shape["num_queries"] = num_queries
    config = AtlasMAGConfig.from_pretrained(path)
    try:
        task = RecallTask(**shape, gap=receptive_field(config) if gap is None else gap)
    except ValueError as error:
        raise ValueError(f"{pretrained}: no recall task fits its tokenizer ({error})") from error
    if vocab != {token: index for index, token in enumerate(task.vocab)}:
        raise ValueError(
            f"{pretrained}: its tokenizer is not a recall task's (atlas_mag.tasks.recall.build_tokenizer): the "
            "lm-eval recall tasks need a model trained on them, such as the main job's"
        )
    return task


def recall_documents(task: RecallTask, num_sequences: int = EVAL_SEQUENCES, seed: int = EVAL_SEED) -> list[dict]:
    """One document per query of `task.sample(num_sequences)` from `seed`: `context` (the sequence as text up to
    the queried value, e.g. "<bos> k3 v17 k9 v2 f5 ... k3"), `answer` (the value, "v17"), `choices` (every value)
    and `label` (the answer's index in `choices`), with the `sequence` and `query` it comes from."""
    input_ids, labels = task.sample(num_sequences, torch.Generator().manual_seed(seed))
    vocab = task.vocab
    choices = vocab[task.value_offset : task.filler_offset]
    documents = []
    for sequence, (ids, label) in enumerate(zip(input_ids.tolist(), labels, strict=True)):
        for query, position in enumerate((label != -100).nonzero().flatten().tolist()):
            answer = ids[position]
            documents.append(
                {
                    "sequence": sequence,
                    "query": query,
                    "context": " ".join(vocab[token] for token in ids[:position]),
                    "answer": vocab[answer],
                    "choices": choices,
                    "label": answer - task.value_offset,
                }
            )
    return documents


def recall_dataset(
    pretrained: str | None = None,
    recall_sequences: int = EVAL_SEQUENCES,
    recall_seed: int = EVAL_SEED,
    recall_gap: int | None = None,
    recall_pairs: int | None = None,
    recall_queries: int | None = None,
    **unused: Any,
) -> datasets.DatasetDict:
    """The tasks' `custom_dataset`: lm-eval calls it with the task's metadata, which holds the model arguments
    (`pretrained=FOLDER`, ...) and `--metadata` (`{"recall_sequences": 64, "recall_gap": 32}`); the other
    arguments it passes (`trust_remote_code`, `ttl_enabled`, `version`, ...) do not change the documents."""
    if not isinstance(pretrained, str):
        raise ValueError(
            "the atlas_recall tasks make their documents for the evaluated model: pass it as a path, "
            "--model_args pretrained=FOLDER (or metadata={'pretrained': FOLDER} with a model object)"
        )
    task = recall_task_for(pretrained, recall_gap, recall_pairs, recall_queries)
    documents = recall_documents(task, recall_sequences, recall_seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents)})


def run_lm_eval(
    pretrained: str | Path,
    tasks: Sequence[str] = TASK_NAMES,
    ttl: bool = True,
    limit: int | None = None,
    device: str | None = None,
    batch_size: int = 1,
    bootstrap_iters: int = 1000,
    metadata: dict[str, Any] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` with the `hf` backend on a saved folder and the local tasks, TTL on or off
    (`ttl_enabled` as a model argument, as `--model_args pretrained=FOLDER,trust_remote_code=True,
    ttl_enabled=False` does on the command line). `max_length`: the longest input lm-eval passes (it cuts longer
    ones from the left; Atlas-MAG has no position limit, so lm-eval's default is 2048). Returns simple_evaluate's
    output, samples included."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": local_or_hub(pretrained, "model"), "trust_remote_code": True, "ttl_enabled": ttl}
    if max_length is not None:
        model_args["max_length"] = max_length
    # As lm-eval's CLI does: the model arguments reach the tasks' custom_dataset through their metadata.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=model_args | (metadata or {}))
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        limit=limit,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=batch_size,
        bootstrap_iters=bootstrap_iters,
        task_manager=manager,
        log_samples=True,
    )


def task_scores(output: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Each task's metrics (and their standard errors, None where lm-eval computed none) from a
    `simple_evaluate` output."""
    scores: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        result = output["results"][task]
        scores[task] = {"n_samples": output["n-samples"][task]["effective"]}
        for metric in TASK_METRICS[task]:
            stderr = result.get(f"{metric}_stderr,none")
            scores[task][metric] = result[f"{metric},none"]
            scores[task][f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
    return scores


def compare_ttl(
    pretrained: str | Path,
    tasks: Sequence[str] = TASK_NAMES,
    limit: int | None = None,
    settings: Sequence[str] = TTL_SETTINGS,
    **options: Any,
) -> dict[str, Any]:
    """`run_lm_eval` on the same folder and tasks once per TTL setting (`ttl_on`, `ttl_off`); returns a
    JSON-ready summary: the scores per setting and task, the recall task the documents follow and the lm-eval
    release. `options` go to `run_lm_eval` (device, batch_size, bootstrap_iters, max_length, metadata:
    `DOCUMENT_OPTIONS` only)."""
    import lm_eval

    if set(settings) - set(TTL_SETTINGS):
        raise ValueError(f"settings must be among {list(TTL_SETTINGS)} (lm-eval can switch TTL, not the gate)")
    metadata = options.get("metadata") or {}
    unknown = sorted(set(metadata) - set(DOCUMENT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown metadata {unknown}; the documents take {list(DOCUMENT_OPTIONS)}")
    summary: dict[str, Any] = {"model": str(pretrained), "tasks": list(tasks), "limit": limit}
    task = recall_task_for(
        pretrained, metadata.get("recall_gap"), metadata.get("recall_pairs"), metadata.get("recall_queries")
    )
    summary["recall_task"] = asdict(task) | {"chance": task.chance}
    summary["recall_sequences"] = metadata.get("recall_sequences", EVAL_SEQUENCES)
    summary["recall_seed"] = metadata.get("recall_seed", EVAL_SEED)
    summary["lm_eval_version"] = lm_eval.__version__
    summary["settings"] = {}
    for setting in settings:
        ttl = CONDITIONS[setting]["ttl"]
        output = run_lm_eval(pretrained, tasks, ttl=ttl, limit=limit, **options)
        summary["settings"][setting] = {"ttl_enabled": ttl, "scores": task_scores(output, tasks)}
    return summary


def ttl_table(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per task and metric, one column per TTL setting (value +- standard error)."""

    def cell(scores: dict[str, Any], metric: str) -> str:
        value, stderr = scores[metric], scores[f"{metric}_stderr"]
        text = f"{value:.3f}" if math.isfinite(value) else str(value)
        return f"{text} ± {stderr:.3f}" if stderr is not None else text

    settings = list(summary["settings"])
    rows = []
    for task in summary["tasks"]:
        first = summary["settings"][settings[0]]["scores"][task]
        metrics = [key for key in first if key != "n_samples" and not key.endswith("_stderr")]
        for metric in metrics:
            rows.append(
                [task, metric, first["n_samples"]]
                + [cell(summary["settings"][setting]["scores"][task], metric) for setting in settings]
            )
    return markdown_table(["task", "metric", "docs", *settings], rows)
