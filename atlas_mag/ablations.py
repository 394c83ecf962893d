"""Ablations applied to a loaded model from the outside, without editing its code.

`memory_gate_removed` is a stand-in for a model-level switch: the model has no option to bypass the memory gate,
so the context manager replaces every block's memory read by a constant for the duration of a `with` block.
It works on models loaded with `trust_remote_code=True` too (their classes come from the model folder, not from
this package), because it patches module instances, not classes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _memory_modules(model: nn.Module) -> list[nn.Module]:
    memories = [module for module in model.modules() if hasattr(module, "read_and_learn")]
    if not memories:
        raise ValueError(
            f"{type(model).__name__} has no memory modules (no `read_and_learn`): is it an attention-only "
            "(use_memory=False) model? There is no memory gate to remove."
        )
    return memories


@contextmanager
def memory_gate_removed(model: nn.Module, gate: float = 1.0) -> Iterator[nn.Module]:
    """Inside the block, every block of `model` ignores its memory.

    MAG blocks compute `x + attn(x) * sigmoid(Memory(q'))`; here the memory's output is replaced by the constant
    logit of `gate`, so each block becomes `x + gate * attn(x)`: `gate=1.0` (the default) is attention with no
    gate at all, `gate=0.5` is what a memory that outputs zeros would give. MAL blocks add the memory's output to
    the attention input; there it is replaced by zeros whatever `gate` is. Call the model with `ttl=False` inside
    the block: the memory's output is ignored, so learning it would only cost time.
    """
    if not 0.0 < gate <= 1.0:
        raise ValueError(f"`gate` must be in (0, 1], got {gate!r}")
    block_type = getattr(model.config, "block_type", "mag")
    logit = math.inf if gate == 1.0 else math.log(gate / (1.0 - gate))
    constant = logit if block_type == "mag" else 0.0
    memories = _memory_modules(model)

    def constant_read(read_and_learn: Any) -> Any:
        # Signature-agnostic: the memory still runs (and learns, if the call has TTL on) so that the cache it
        # returns stays consistent; only the output the block sees is replaced.
        def read(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            output, *rest = read_and_learn(*args, **kwargs)
            return (torch.full_like(output, constant), *rest)

        return read

    # An instance attribute shadows the class's method; remember any earlier one (a nested use) to restore it.
    previous = [memory.__dict__.get("read_and_learn") for memory in memories]
    for memory in memories:
        memory.read_and_learn = constant_read(memory.read_and_learn)
    try:
        yield model
    finally:
        for memory, earlier in zip(memories, previous, strict=True):
            if earlier is None:
                del memory.read_and_learn
            else:
                memory.read_and_learn = earlier
