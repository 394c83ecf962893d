"""Perplexity of a model over long documents, read in order through the cache the way a served model reads
them, with test-time learning on and off side by side.

A document is fed segment by segment, each call continuing the previous one through `past_key_values` (the
`AtlasMAGCache`: attention window, Q-K history, and the memory as TTL left it), so nothing is truncated to one
window. Token 0 of segment k+1 is predicted by the last logit of segment k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..training.data import encode_document


@torch.no_grad()
def document_token_nll(
    model: PreTrainedModel, token_ids: Sequence[int], segment_length: int, ttl: bool
) -> torch.Tensor:
    """NLL of tokens 1..T-1 of one document ([T - 1], fp32), predicted left to right through the cache."""
    if len(token_ids) < 2:
        raise ValueError("A document needs at least 2 tokens to be scored")
    if segment_length < 1:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], device=device)
    cache = None
    previous_logits = None
    losses = []
    for start in range(0, ids.shape[1], segment_length):
        segment = ids[:, start : start + segment_length]
        output = model(input_ids=segment, cache=cache, use_cache=True, ttl=ttl)
        cache = output.cache
        logits = output.logits[0].float()
        if previous_logits is not None:
            losses.append(F.cross_entropy(previous_logits[None], segment[0, :1], reduction="none"))
        losses.append(F.cross_entropy(logits[:-1], segment[0, 1:], reduction="none"))
        previous_logits = logits[-1]
    return torch.cat(losses)


def position_buckets(max_length: int, first: int = 128) -> list[tuple[int, int]]:
    """Doubling position ranges [0, first), [first, 2 first), ... covering `max_length` positions."""
    edges = [0, first]
    while edges[-1] < max_length:
        edges.append(edges[-1] * 2)
    return [(lo, min(hi, max_length)) for lo, hi in zip(edges, edges[1:], strict=False) if lo < max_length]


def evaluate_perplexity(
    model: PreTrainedModel,
    documents: Sequence[Sequence[int]],
    segment_length: int = 512,
    ttl_settings: Iterable[bool] = (True, False),
    progress: bool = False,
    first_bucket: int = 128,
) -> dict[str, Any]:
    """Token-level perplexity over `documents` for each TTL setting, overall and by position in the document
    (the memory's effect grows with the context read so far), in position ranges doubling from
    `first_bucket`."""
    from tqdm.auto import tqdm

    model.eval()
    max_length = max(len(document) for document in documents)
    buckets = position_buckets(max_length, first_bucket)
    results: dict[str, Any] = {"documents": len(documents), "segment_length": segment_length, "settings": {}}
    for ttl in ttl_settings:
        nll_sum = torch.zeros(len(buckets), dtype=torch.float64)
        counts = torch.zeros(len(buckets), dtype=torch.long)
        for document in tqdm(documents, desc=f"ttl={'on' if ttl else 'off'}", disable=not progress):
            losses = document_token_nll(model, document, segment_length, ttl).double().cpu()
            positions = torch.arange(1, len(document))
            for index, (lo, hi) in enumerate(buckets):
                selected = (positions >= lo) & (positions < hi)
                nll_sum[index] += losses[selected].sum()
                counts[index] += selected.sum()
        total = nll_sum.sum().item() / counts.sum().item()
        results["settings"]["ttl_on" if ttl else "ttl_off"] = {
            "nll": total,
            "perplexity": math.exp(total),
            "tokens": int(counts.sum()),
            "by_position": [
                {"start": lo, "end": hi, "tokens": int(n), "perplexity": math.exp(s / n) if n else None}
                for (lo, hi), s, n in zip(buckets, nll_sum.tolist(), counts.tolist(), strict=True)
            ],
        }
    return results


def long_documents(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    num_documents: int,
    min_tokens: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The first `num_documents` texts of at least `min_tokens` tokens (`<bos> text <eos>`), cut at
    `max_tokens`."""
    documents = []
    for text in texts:
        if not text:
            continue
        ids = encode_document(tokenizer, text).ids
        if len(ids) >= min_tokens:
            documents.append(ids[:max_tokens])
            if len(documents) == num_documents:
                break
    if not documents:
        raise ValueError(f"No document of the data has at least {min_tokens} tokens; lower --min-tokens")
    return documents


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: perplexity by position range, one column per TTL setting."""
    settings = results["settings"]
    names = list(settings)
    lines = ["| positions | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = zip(*(settings[name]["by_position"] for name in names), strict=True)
    for cells in rows:
        values = " | ".join("-" if c["perplexity"] is None else f"{c['perplexity']:.2f}" for c in cells)
        lines.append(f"| {cells[0]['start']}-{cells[0]['end']} | {values} |")
    lines.append("| all | " + " | ".join(f"{settings[name]['perplexity']:.2f}" for name in names) + " |")
    return "\n".join(lines)
