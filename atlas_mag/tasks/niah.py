"""Needle in a haystack: can the model retrieve one fact from far back in its context?

A needle "The secret number for <name> is <digits>." is put at a chosen depth of filler text; the prompt ends with
the question and the start of the answer ("... The secret number for <name> is"). The model's greedy continuation
(`generate`, as a server would run it) is correct when its first number equals the digits. Every cell of the grid
(context length x depth) is scored under three conditions on the same prompts:

- `ttl_on`: test-time learning on (the memory learns from the prompt while reading it);
- `ttl_off`: the memory keeps the weights stored in the model (`generate(..., ttl=False)`);
- `gate_removed`: the memory is taken out of every block (`generate(..., memory_gate=False)`): each block is
  `x + attn(x)`, so only the sliding window can carry the needle.

Filler and needles come from a seeded generator (no files, no network): the same seed gives the same prompts.

`NeedleDocuments` makes the training side: documents of real text (a language model's training data) with facts
in the same template stated at random depths and asked at the end, so a model can learn to answer them. Their
names are never one of `NAMES` and their filler is the training text, so the benchmark's needles and filler are
never seen in training.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..reporting import markdown_table, new_figure, save_figure, write_json, write_text
from ..training.data import Document
from .demo import CONDITIONS, condition_switches, greedy_generate
from .recall import check_minimum

logger = logging.getLogger(__name__)

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
    "Marco", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamara", "Umar", "Vera", "Wilhelm", "Ximena",
    "Yusuf", "Zoe",
)  # fmt: skip
SUBJECTS = (
    "The old farmer", "A young painter", "The river", "Our neighbour", "The small village", "A tired traveller",
    "The library", "The committee", "A grey cat", "The mountain road", "The baker", "An early train",
)  # fmt: skip
VERBS = (
    "walked past", "looked at", "waited near", "talked about", "forgot", "painted", "followed", "remembered",
    "carried", "described",
)  # fmt: skip
OBJECTS = (
    "the wooden bridge", "a quiet garden", "the market square", "an empty field", "the blue door",
    "a long letter", "the harbour", "the autumn leaves", "a broken clock", "the evening sky",
)  # fmt: skip
ENDINGS = (
    "in the morning", "after the rain", "before dinner", "for a while", "without a word", "once again",
    "during the festival", "as usual",
)  # fmt: skip


# Training names are made of these syllables (2-3 of them), never one of NAMES.
SYLLABLES = (
    "ka", "lo", "mi", "ra", "zu", "be", "no", "ti", "sa", "ve", "do", "ri", "fu", "ga", "pe", "xo", "lu", "ne",
    "wa", "yo", "ha", "ki", "mo", "su",
)  # fmt: skip


def needle_sentence(name: str, answer: str) -> str:
    return f" The secret number for {name} is {answer}."


def question_sentence(name: str) -> str:
    """The question and the start of its answer: the model's continuation is the answer."""
    return f" What is the secret number for {name}? The secret number for {name} is"


def random_answer(rng: random.Random, num_digits: int) -> str:
    return str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."


def default_lengths(sliding_window: int, shortest: int = 1) -> list[int]:
    """From half the attention window to eight times it, leaving out lengths below `shortest`."""
    lengths = [sliding_window // 2, sliding_window, 2 * sliding_window, 4 * sliding_window, 8 * sliding_window]
    return [length for length in lengths if length >= shortest]


@dataclass
class NeedlePrompt:
    """One prompt of the grid: token ids, where the needle is, and the expected answer."""

    input_ids: list[int]
    name: str
    answer: str
    needle_start: int
    needle_depth: float

    @property
    def distance(self) -> int:
        """Tokens from the needle's first token to the end of the prompt."""
        return len(self.input_ids) - self.needle_start


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def shortest_context(tokenizer: PreTrainedTokenizerBase, num_digits: int = 6) -> int:
    """A context length that fits BOS, the needle and the question for every name, with a few tokens to spare for
    numbers that tokenize longer than the probe."""
    prefix = 1 if tokenizer.bos_token_id is not None else 0
    probe = "9" * num_digits
    longest = max(
        len(_encode(tokenizer, needle_sentence(name, probe))) + len(_encode(tokenizer, question_sentence(name)))
        for name in NAMES
    )
    return prefix + longest + 4


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random, num_digits: int = 6
) -> NeedlePrompt:
    """A prompt of exactly `length` tokens (a leading BOS included when the tokenizer has one) with the needle
    placed at the sentence boundary nearest to `depth` (0 = first thing after BOS, 1 = just before the
    question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    name = rng.choice(NAMES)
    answer = random_answer(rng, num_digits)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    needle = _encode(tokenizer, needle_sentence(name, answer))
    question = _encode(tokenizer, question_sentence(name))
    budget = length - len(prefix) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"context length {length} is too short: the needle and the question alone take "
            f"{len(prefix) + len(needle) + len(question)} tokens"
        )
    sentences: list[list[int]] = []
    filled = 0
    while filled < budget:
        sentence = _encode(tokenizer, " " + filler_sentence(rng))[: budget - filled]
        sentences.append(sentence)
        filled += len(sentence)
    boundaries = [0]
    for sentence in sentences:
        boundaries.append(boundaries[-1] + len(sentence))
    cut = min(boundaries, key=lambda boundary: abs(boundary - depth * budget))
    haystack = [token for sentence in sentences for token in sentence]
    input_ids = prefix + haystack[:cut] + needle + haystack[cut:] + question
    return NeedlePrompt(
        input_ids=input_ids,
        name=name,
        answer=answer,
        needle_start=len(prefix) + cut,
        needle_depth=cut / budget if budget else 1.0,
    )


def training_name(rng: random.Random) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in NAMES:
            return name


@dataclass(frozen=True)
class NeedleDocuments:
    """Training documents for retrieval: `needles` facts ("The secret number for <name> is <digits>.") at
    uniformly random depths of `min_filler_tokens`..`max_filler_tokens` tokens of filler cut from training text,
    then every fact asked and answered in random order (" What is the secret number for <name>? The secret number
    for <name> is <digits>."). A language model trained on them with the next-token loss learns to answer the
    questions; when the filler is longer than its receptive field without TTL, only the memory can carry the
    facts there. The names are `training_name`s, never the benchmark's. Each document's completion is the last
    answer (" <digits>."): the loss counts only it, not the filler, the random digits of the facts or the
    questions (whose tokens would otherwise outnumber the answer's some 50 to 1)."""

    needles: int = 2
    num_digits: int = 4
    min_filler_tokens: int = 32
    max_filler_tokens: int = 256

    def __post_init__(self) -> None:
        check_minimum(self, 1, "needles", "num_digits", "min_filler_tokens")
        if self.max_filler_tokens < self.min_filler_tokens:
            raise ValueError(
                f"NeedleDocuments.max_filler_tokens ({self.max_filler_tokens}) is below min_filler_tokens "
                f"({self.min_filler_tokens})"
            )

    def document(
        self, tokenizer: PreTrainedTokenizerBase, filler_ids: Sequence[int], rng: random.Random
    ) -> Document:
        """One document, its filler a random run of `filler_ids` (token ids of training text)."""
        length = rng.randint(self.min_filler_tokens, self.max_filler_tokens)
        if len(filler_ids) < length:
            raise ValueError(f"the filler text has {len(filler_ids)} tokens, fewer than the {length} needed")
        start = rng.randrange(len(filler_ids) - length + 1)
        filler = filler_ids[start : start + length]
        names: list[str] = []
        while len(names) < self.needles:
            name = training_name(rng)
            if name not in names:
                names.append(name)
        answers = [random_answer(rng, self.num_digits) for _ in names]
        cuts = sorted(rng.randrange(length + 1) for _ in names)
        pieces = [tokenizer.decode(filler[: cuts[0]])]
        for index, (name, answer) in enumerate(zip(names, answers, strict=True)):
            end = cuts[index + 1] if index + 1 < len(cuts) else length
            pieces += [needle_sentence(name, answer), tokenizer.decode(filler[cuts[index] : end])]
        *earlier, last = rng.sample(range(len(names)), len(names))
        pieces += [f"{question_sentence(names[index])} {answers[index]}." for index in earlier]
        pieces.append(question_sentence(names[last]))
        return Document("".join(pieces), f" {answers[last]}.")

    def documents(
        self, tokenizer: PreTrainedTokenizerBase, filler_texts: Sequence[str], count: int, seed: int
    ) -> list[Document]:
        """`count` documents with filler from `filler_texts` (concatenated), the same ones for the same seed."""
        filler_ids = [token for text in filler_texts for token in _encode(tokenizer, text)]
        rng = random.Random(f"needle-documents-{seed}")
        return [self.document(tokenizer, filler_ids, rng) for _ in range(count)]


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def is_correct(generated: str, answer: str) -> bool:
    """Exact match: the first number in the continuation is the needle's number."""
    return first_number(generated) == answer


def answer_under(
    condition: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: NeedlePrompt,
    max_new_tokens: int,
) -> str:
    """The greedy answer to `prompt` under one of `CONDITIONS`."""
    switches = condition_switches(condition)
    ids = torch.tensor([prompt.input_ids], device=next(model.parameters()).device)
    new_ids = greedy_generate(model, tokenizer, ids, max_new_tokens, **switches)
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def run_niah(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples_per_cell: int = 3,
    conditions: Sequence[str] = tuple(CONDITIONS),
    seed: int = 0,
    max_new_tokens: int = 12,
    num_digits: int = 6,
) -> dict[str, Any]:
    """Score every (condition, length, depth) cell on `samples_per_cell` prompts of `num_digits`-digit needles;
    the prompts of a cell are the same under every condition. Returns a JSON-ready dict (see
    `write_niah_report`)."""
    unknown = [condition for condition in conditions if condition not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; expected a subset of {tuple(CONDITIONS)}")
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
    if not lengths:
        shortest = shortest_context(tokenizer, num_digits)
        lengths = default_lengths(model.config.sliding_window, shortest)
        if not lengths:
            raise ValueError(
                f"every default context length is too short for the needle and question ({shortest} tokens); "
                "pass lengths explicitly"
            )
    lengths = list(lengths)
    model.eval()
    cells = []
    grid = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(grid, desc="NIAH cells", unit="cell"):
        prompts = [
            build_prompt(
                tokenizer, length, depth, random.Random(f"niah-{seed}-{length}-{depth}-{index}"), num_digits
            )
            for index in range(samples_per_cell)
        ]
        for condition in conditions:
            answers = [
                answer_under(condition, model, tokenizer, prompt, max_new_tokens) for prompt in prompts
            ]
            correct = [is_correct(answer, prompt.answer) for answer, prompt in zip(answers, prompts, strict=True)]
            cells.append(
                {
                    "condition": condition,
                    "length": length,
                    "depth": depth,
                    "accuracy": sum(correct) / len(correct),
                    "samples": [
                        {
                            "name": prompt.name,
                            "answer": prompt.answer,
                            "generated": answer,
                            "correct": ok,
                            "needle_depth": round(prompt.needle_depth, 4),
                            "needle_distance": prompt.distance,
                        }
                        for prompt, answer, ok in zip(prompts, answers, correct, strict=True)
                    ],
                }
            )
        logger.info(
            "length %d depth %.2f: %s",
            length,
            depth,
            ", ".join(f"{cell['condition']} {cell['accuracy']:.2f}" for cell in cells[-len(conditions) :]),
        )
    return {
        "sliding_window": model.config.sliding_window,
        "ttl_chunk_size": model.config.ttl_chunk_size,
        "lengths": lengths,
        "depths": list(depths),
        "conditions": list(conditions),
        "samples_per_cell": samples_per_cell,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "num_digits": num_digits,
        "cells": cells,
    }


def accuracy_grid(results: dict[str, Any], condition: str) -> list[list[float]]:
    """Accuracy of one condition as rows = depths, columns = lengths."""
    lookup = {
        (cell["length"], cell["depth"]): cell["accuracy"] for cell in results["cells"] if cell["condition"] == condition
    }
    return [[lookup[(length, depth)] for length in results["lengths"]] for depth in results["depths"]]


def niah_table(results: dict[str, Any]) -> str:
    """A Markdown table per condition: depth down, context length across (a * marks lengths past the window)."""
    window = results["sliding_window"]
    header = ["depth \\ length"] + [f"{length}{'*' if length > window else ''}" for length in results["lengths"]]
    sections = []
    for condition in results["conditions"]:
        rows = [
            [f"{depth:.2f}"] + [f"{value:.2f}" for value in row]
            for depth, row in zip(results["depths"], accuracy_grid(results, condition), strict=True)
        ]
        sections.append(f"**{condition}** (exact match; * = longer than the {window}-token window)\n\n")
        sections[-1] += markdown_table(header, rows)
    return "\n\n".join(sections)


def plot_heatmap(results: dict[str, Any], condition: str, path: str | Path) -> Path:
    grid = accuracy_grid(results, condition)
    lengths, depths = results["lengths"], results["depths"]
    figure = new_figure(1.2 + 0.9 * len(lengths), 1.0 + 0.55 * len(depths))
    axes = figure.add_subplot()
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    beyond = [i for i, length in enumerate(lengths) if length > results["sliding_window"]]
    if beyond:
        axes.axvline(beyond[0] - 0.5, color="black", linewidth=1.5, linestyle="--")
    axes.set_xlabel(f"context length (tokens; dashed: beyond the {results['sliding_window']}-token window)")
    axes.set_ylabel("needle depth")
    axes.set_title(f"Needle in a haystack, {condition}")
    figure.colorbar(image, ax=axes, label="exact match")
    return save_figure(figure, path)


def write_niah_report(results: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """niah_results.json, niah_table.md and one heatmap per condition (niah_<condition>.png) in `output_dir`."""
    output_dir = Path(output_dir)
    written = {
        "json": write_json(output_dir / "niah_results.json", results),
        "table": write_text(output_dir / "niah_table.md", niah_table(results) + "\n"),
    }
    for condition in results["conditions"]:
        written[condition] = plot_heatmap(results, condition, output_dir / f"niah_{condition}.png")
    return written


__all__ = [
    "CONDITIONS",
    "NeedlePrompt",
    "build_prompt",
    "is_correct",
    "niah_table",
    "run_niah",
    "write_niah_report",
]
