"""The project's end-to-end job (`make main`): with nothing downloaded, on a CPU, in minutes.

1. Train small Atlas-MAG models (one per seed) on multi-query associative recall whose queries lie beyond the
   sliding window (`atlas_mag.recall`).
2. Evaluate recall with test-time learning on, off, and with the memory gate removed, over seeds, and at longer
   distances than trained.
3. Save the model with the lowest final training loss as a Hub-ready folder (safetensors, config with
   `auto_map`, the model's code, a tokenizer over the task's symbols, a model card), reload it with
   `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, check that it scores as before, and
   answer fresh queries through `pipeline("text-generation")` with TTL on and off.
4. Write JSON and plots under the output folder and print a short report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import pipeline

from . import hub
from .reporting import new_figure, save_figure, write_json
from .tasks.demo import load_model_folder
from .tasks.recall import (
    RecallTask,
    TrainingRecipe,
    build_tokenizer,
    evaluate_recall,
    recall_experiment,
    recall_model_config,
    receptive_field,
)

logger = logging.getLogger(__name__)


@dataclass
class MainJobSettings:
    output_dir: Path = Path("outputs/main_job")
    seeds: tuple[int, ...] = (0, 1, 2)
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    task: RecallTask | None = None
    eval_sequences: int = 256
    gap_multiples: tuple[int, ...] = (1, 2, 4, 8)
    # Seeds train in parallel processes, one thread each (0: one per CPU core, at most one per seed).
    workers: int = 0
    overwrite: bool = True


def default_task() -> RecallTask:
    """Pairs, then a gap of exactly the model's receptive field without TTL."""
    return RecallTask(gap=receptive_field(recall_model_config(RecallTask())))


def plot_recall(summary: dict[str, Any], path: Path) -> Path:
    """Bars: mean accuracy per condition over seeds, each seed as a dot; the dashed line is chance."""
    conditions = ("ttl_on", "ttl_off", "gate_removed")
    figure = new_figure(5.0, 3.6)
    axes = figure.add_subplot()
    means = [summary["summary"][condition]["mean"] for condition in conditions]
    axes.bar(range(len(conditions)), means, color=["tab:green", "tab:red", "tab:gray"], alpha=0.7)
    for index, condition in enumerate(conditions):
        values = [run["accuracy"][condition] for run in summary["runs"]]
        axes.scatter([index] * len(values), values, color="black", zorder=3, s=14)
    axes.axhline(summary["chance"], color="black", linestyle="--", linewidth=1, label=f"chance {summary['chance']:.3f}")
    axes.set_xticks(range(len(conditions)), ["TTL on", "TTL off", "memory gate removed"])
    axes.set_ylim(0, 1)
    axes.set_ylabel("recall accuracy")
    axes.set_title(f"Recall beyond the window ({len(summary['runs'])} seeds)")
    axes.legend(loc="upper right", fontsize=8)
    return save_figure(figure, path)


def plot_recall_by_gap(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy against the distance between the pairs and the queries, mean +- std over seeds."""
    gaps = summary["eval_gaps"]
    figure = new_figure(5.0, 3.6)
    axes = figure.add_subplot()
    for condition, color in (("ttl_on", "tab:green"), ("ttl_off", "tab:red")):
        per_seed = [[run["by_gap"][str(gap)][condition] for gap in gaps] for run in summary["runs"]]
        mean = torch.tensor(per_seed).mean(0)
        std = torch.tensor(per_seed).std(0) if len(per_seed) > 1 else torch.zeros(len(gaps))
        axes.errorbar(gaps, mean.tolist(), yerr=std.tolist(), marker="o", color=color, capsize=3, label=condition)
    axes.axhline(summary["chance"], color="black", linestyle="--", linewidth=1, label="chance")
    axes.axvline(summary["task"]["gap"], color="gray", linestyle=":", label="trained gap")
    axes.set_xscale("log", base=2)
    axes.set_xticks(gaps, [str(gap) for gap in gaps])
    axes.set_ylim(0, 1)
    axes.set_xlabel("filler tokens between pairs and queries")
    axes.set_ylabel("recall accuracy")
    axes.set_title("Recall against distance")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def serve_queries(model_dir: Path, task: RecallTask, count: int = 32, seed: int = 7) -> dict[str, Any]:
    """Reload the saved folder as a user would and answer `count` fresh queries (each the first query of a new
    sequence) with `pipeline("text-generation")`, TTL on and off."""
    model, tokenizer = load_model_folder(model_dir)
    input_ids, labels = task.sample(count, torch.Generator().manual_seed(seed))
    first_answer = int((labels[0] != -100).nonzero()[0])  # the same position in every sequence
    prompts = [tokenizer.decode(row[:first_answer]) for row in input_ids]
    expected = tokenizer.convert_ids_to_tokens(input_ids[:, first_answer].tolist())
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=-1)
    answers = {}
    for setting, ttl in (("ttl_on", True), ("ttl_off", False)):
        outputs = generator(prompts, max_new_tokens=1, do_sample=False, return_full_text=False, ttl=ttl)
        answers[setting] = [output[0]["generated_text"].strip() for output in outputs]
    correct = {
        setting: sum(answer == target for answer, target in zip(given, expected, strict=True))
        for setting, given in answers.items()
    }
    return {"prompts": prompts, "expected": expected, "answers": answers, "correct": correct, "model": model}


def run_main_job(settings: MainJobSettings) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    task = settings.task or default_task()
    config = recall_model_config(task)
    reach = receptive_field(config)
    logger.info(
        "training %d model(s) on recall: %d pairs, %d filler tokens (receptive field without TTL: %d), %d steps",
        len(settings.seeds),
        task.num_pairs,
        task.gap,
        reach,
        settings.recipe.steps,
    )
    eval_gaps = sorted({max(task.gap, reach) * multiple for multiple in settings.gap_multiples})
    workers = settings.workers or min(len(settings.seeds), os.cpu_count() or 1)
    summary, models = recall_experiment(
        task, config, settings.recipe, settings.seeds, settings.eval_sequences, eval_gaps, workers=workers
    )

    # The folder gets the seed whose training ended with the lowest loss (training data only, no test peeking).
    final_losses = [run["history"][-1]["loss"] for run in summary["runs"]]
    saved = min(range(len(final_losses)), key=final_losses.__getitem__)
    summary["saved_seed"] = settings.seeds[saved]
    model_dir = output_dir / "atlas-mag-recall"
    tokenizer = build_tokenizer(task)
    accuracy = summary["runs"][saved]["accuracy"]
    card = hub.render_model_card(
        models[saved],
        title="Atlas-MAG, associative recall demo",
        summary=(
            "A tiny Atlas-MAG trained from scratch on multi-query associative recall whose queries lie beyond its "
            f"sliding window. Recall: {accuracy['ttl_on']:.1%} with test-time learning, {accuracy['ttl_off']:.1%} "
            f"without (chance {task.chance:.1%})."
        ),
        provenance=(
            f"Trained by `make main` (atlas_mag.main_job), seed {settings.seeds[saved]}, {settings.recipe.steps} AdamW "
            f"steps of batch {settings.recipe.batch_size} (the first {settings.recipe.single_pair_steps} on a single "
            f"pair) on synthetic sequences ({task})."
        ),
        datasets=[],
    )
    hub.save_model_folder(models[saved], model_dir, tokenizer=tokenizer, card=card, overwrite=settings.overwrite)

    served = serve_queries(model_dir, task)
    reloaded_accuracy = evaluate_recall(served.pop("model"), task, settings.eval_sequences)
    # A broken save or load changes far more than the odd near-tie that another thread count may flip.
    if abs(reloaded_accuracy["ttl_on"] - accuracy["ttl_on"]) > 0.01:
        raise RuntimeError(
            f"the reloaded model scores {reloaded_accuracy['ttl_on']:.4f} with TTL, the trained one "
            f"{accuracy['ttl_on']:.4f}: saving or loading changed the model"
        )

    files = {
        "results": write_json(output_dir / "recall_results.json", summary | {"served": served}),
        "plot": plot_recall(summary, output_dir / "recall_accuracy.png"),
        "plot_by_gap": plot_recall_by_gap(summary, output_dir / "recall_by_gap.png"),
        "model": model_dir,
    }
    return {"summary": summary, "served": served, "files": files, "seconds": time.perf_counter() - started}


def format_report(result: dict[str, Any]) -> str:
    summary, served = result["summary"], result["served"]

    def spread(condition: str) -> str:
        stats = summary["summary"][condition]
        return f"{stats['mean']:.3f} +- {stats['std']:.3f} (min {stats['min']:.3f}, max {stats['max']:.3f})"

    task = summary["task"]
    lines = [
        "Atlas-MAG main job: associative recall beyond the sliding window",
        f"  task: {task['num_pairs']} key-value pairs, {task['gap']} filler tokens, {task['num_queries']} queries; "
        f"receptive field without TTL {summary['receptive_field_without_ttl']} tokens",
        f"  model: {summary['num_parameters']:,} parameters; {summary['recipe']['steps']} steps per seed (the first "
        f"{summary['recipe']['single_pair_steps']} on one pair), "
        f"seeds {summary['seeds']}; {summary['eval_queries_per_seed']} test queries per seed",
        f"  recall, TTL on:              {spread('ttl_on')}",
        f"  recall, TTL off:             {spread('ttl_off')}",
        f"  recall, memory gate removed: {spread('gate_removed')}",
        f"  chance:                      {summary['chance']:.3f} (binomial std {summary['chance_binomial_std']:.3f})",
        "  per seed (TTL on / off / gate removed):",
    ]
    for run in summary["runs"]:
        accuracy = run["accuracy"]
        by_query = ", ".join(f"{entry['right']:.2f} / {entry['other_pair']:.2f}" for entry in run["by_query"])
        lines.append(
            f"    seed {run['seed']}: {accuracy['ttl_on']:.3f} / {accuracy['ttl_off']:.3f} / "
            f"{accuracy['gate_removed']:.3f}; TTL on by query (right / another pair's value): {by_query}"
        )
    for gap in summary["eval_gaps"]:
        on = [run["by_gap"][str(gap)]["ttl_on"] for run in summary["runs"]]
        off = [run["by_gap"][str(gap)]["ttl_off"] for run in summary["runs"]]
        lines.append(f"    gap {gap:4d}: TTL on {sum(on) / len(on):.3f}, TTL off {sum(off) / len(off):.3f}")
    count = len(served["expected"])
    lines += [
        f"  served through pipeline('text-generation') from {result['files']['model']} (seed {summary['saved_seed']}):",
        f"    {count} fresh queries, correct: TTL on {served['correct']['ttl_on']}/{count}, "
        f"TTL off {served['correct']['ttl_off']}/{count}",
        f"    e.g. {served['prompts'][0]!r} -> expected {served['expected'][0]}, "
        f"TTL on {served['answers']['ttl_on'][0]}, TTL off {served['answers']['ttl_off'][0]}",
        "  written:",
    ]
    lines += [f"    {name}: {path}" for name, path in result["files"].items()]
    lines.append(f"  total time: {result['seconds']:.0f} s")
    return "\n".join(lines)
