"""Names that differ between the Transformers releases this package supports (see `setup.cfg`).

Transformers renamed gradient checkpointing to activation checkpointing (the old names warn on the newest
releases); the tooling goes through these helpers so that no release sees a deprecated name from us. The cache
argument's rename lives in the modeling file (`modeling_atlas.CACHE_FIELD`), which must stand alone on the Hub.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PreTrainedModel, TrainingArguments

from .modeling_atlas import CACHE_FIELD

__all__ = [
    "CACHE_FIELD",
    "checkpointing_training_arguments",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "is_activation_checkpointing",
]

_NEW_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")
_TRAINING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {field.name for field in fields(TrainingArguments)}
    else "gradient_checkpointing"
)

# Non-reentrant checkpointing: it replays an Atlas-MAG block exactly (a block returns its state change).
_CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation (gradient) checkpointing of every block."""
    if _NEW_NAMES:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(_CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_CHECKPOINT_KWARGS))


def disable_activation_checkpointing(model: PreTrainedModel) -> None:
    if _NEW_NAMES:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_activation_checkpointing(model: PreTrainedModel) -> bool:
    return model.is_activation_checkpointing if _NEW_NAMES else model.is_gradient_checkpointing


def checkpointing_training_arguments() -> dict[str, Any]:
    """`TrainingArguments` fields that turn on non-reentrant activation checkpointing."""
    return {_TRAINING_ARGUMENT: True, f"{_TRAINING_ARGUMENT}_kwargs": dict(_CHECKPOINT_KWARGS)}
