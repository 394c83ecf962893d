"""The language-modelling loss, and the validation measurements of a run: loss with test-time learning on
and off, and how far it moved the memory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..modeling_atlas import AtlasMAGCache, AtlasMAGForCausalLM
from .data import ScoredTokens, stack_windows

# The label that Transformers' losses skip.
IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits [batch, length, vocab] against targets [batch, length], computed in fp32, summed or
    averaged (`reduction`) over the targets that are `scored` ([batch, length] bool; None: all of them). A batch
    with no scored target has a mean of 0 (a window of prompts only), not NaN."""
    if scored is not None:
        targets = targets.masked_fill(~scored, IGNORE_INDEX)
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets.numel() if scored is None else scored.sum().clamp(min=1))


def memory_update_norm(model: AtlasMAGForCausalLM, cache: AtlasMAGCache) -> torch.Tensor | None:
    """How far test-time learning moved each sequence's memory: ||M_learned - M_0|| / ||M_0|| over all the
    memory's parameters of a layer, averaged over layers ([batch]); None for a model without memory."""
    ratios = [
        layer.memory.drift(learned)
        for layer, learned in zip(model.model.layers, cache.memory_states(), strict=True)
        if learned is not None
    ]
    return torch.stack(ratios).mean(0) if ratios else None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: list[ScoredTokens],
    batch_size: int,
    accelerator: Accelerator,
    measure_memory: bool = True,
) -> dict[str, float]:
    """Validation loss with TTL on and off, and (with `measure_memory`) the TTL memory update norm, over all
    processes."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    rank_windows = windows[accelerator.process_index :: accelerator.num_processes]
    # nll with TTL, nll without, target tokens, sum of memory update norms, sequences measured
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(rank_windows), batch_size):
        batch = stack_windows(rank_windows[start : start + batch_size]).to(accelerator.device)
        inputs, targets, scored = batch.ids[:, :-1], batch.ids[:, 1:], batch.scored[:, 1:]
        with_ttl = model(input_ids=inputs, use_cache=measure_memory, ttl=True)
        without_ttl = model(input_ids=inputs, use_cache=False, ttl=False)
        totals[0] += causal_lm_loss(with_ttl.logits, targets, scored, reduction="sum").double()
        totals[1] += causal_lm_loss(without_ttl.logits, targets, scored, reduction="sum").double()
        totals[2] += scored.sum()
        norms = memory_update_norm(unwrapped, with_ttl.cache) if measure_memory else None
        if norms is not None:
            totals[3] += norms.sum().double()
            totals[4] += norms.numel()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    loss, loss_off = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
    metrics = {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 50.0)),
        "val_loss_ttl_off": loss_off,
        "val_ttl_gain": loss_off - loss,
    }
    if totals[4] > 0:
        metrics["ttl_memory_update_norm"] = (totals[3] / totals[4]).item()
    return metrics
