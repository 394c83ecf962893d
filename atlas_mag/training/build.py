"""The parts of a training run built from its configuration: the Accelerator, the training and validation
data, the model, and the optimizer with its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from datasets import IterableDataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..cli import local_or_hub
from ..configuration_atlas import AtlasMAGConfig
from ..modeling_atlas import AtlasMAGForCausalLM
from .checkpoints import drop_tied_aliases
from .config import LoopConfig, TrainConfig
from .data import PackedWindows, ScoredTokens, load_source, mix_sources, split_holdout


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator: its mixed precision, gradient accumulation and trackers (logging under
    `output_dir`), with tied weights saved once in checkpoints."""
    precision = config.training.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        # The scheduler steps once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=config.logging.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    accelerator.register_save_state_pre_hook(drop_tied_aliases)
    return accelerator


def build_datasets(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, rank: int, world_size: int
) -> tuple[PackedWindows, list[ScoredTokens]]:
    """The training windows of this process (an endless, resumable iterator) and the fixed validation set."""
    data = config.data
    window = data.seq_len + 1
    loaded = [load_source(source) for source in data.sources]
    if data.validation_sources is None:
        splits = [
            split_holdout(d, data.validation_documents, s.label) for d, s in zip(loaded, data.sources, strict=True)
        ]
        train_parts = [train for train, _ in splits]
        validation_parts, validation_specs = [validation for _, validation in splits], data.sources
    else:
        train_parts = loaded
        validation_parts = [load_source(source) for source in data.validation_sources]
        validation_specs = data.validation_sources
    if data.shuffle:
        train_parts = [
            part.shuffle(seed=config.seed, buffer_size=max(data.shuffle_buffer, 1))
            if isinstance(part, IterableDataset)
            else part.shuffle(seed=config.seed)
            for part in train_parts
        ]
    probabilities = [source.probability for source in data.sources]
    train_stream = mix_sources(train_parts, probabilities, config.seed, data.stopping_strategy)
    validation_stream = mix_sources(
        validation_parts, [s.probability for s in validation_specs], config.seed, data.stopping_strategy
    )
    validation = PackedWindows(validation_stream, tokenizer, window, cycle=False, label="validation data")
    validation_windows = list(islice(validation, data.validation_windows))
    if not validation_windows:
        raise ValueError(
            f"The validation data gives no window of {window} tokens (data.seq_len + 1): its documents are "
            "empty or shorter than needed. Lower data.seq_len, raise data.validation_documents or add data."
        )
    train = PackedWindows(train_stream, tokenizer, window, rank=rank, world_size=world_size, label="training data")
    return train, validation_windows


def load_atlas_model(path: str) -> AtlasMAGForCausalLM:
    """The model saved at `path` (a folder or a Hub id), refused unless it is an Atlas-MAG model."""
    model = AutoModelForCausalLM.from_pretrained(path)
    if not isinstance(model, AtlasMAGForCausalLM):
        raise ValueError(f"{path} holds a {type(model).__name__}, not an Atlas-MAG model")
    return model


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> AtlasMAGForCausalLM:
    """A new model from `config.model` (vocabulary and special ids from the tokenizer) or `init_from`."""
    if config.init_from:
        model = load_atlas_model(local_or_hub(config.init_from, "init_from"))
    else:
        fields_ = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **config.model,
        }
        model = AtlasMAGForCausalLM(AtlasMAGConfig(**fields_))
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"The model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)})"
        )
    return model


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1 over `warmup_steps`, then a cosine from 1 down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_schedule(loop: LoopConfig) -> Callable[[int], float]:
    """The learning-rate multiplier of each step under `loop`'s settings, for `LambdaLR`."""
    return partial(
        lr_multiplier, warmup_steps=loop.warmup_steps, max_steps=loop.max_steps, min_ratio=loop.min_lr_ratio
    )


def make_optimizer(model: torch.nn.Module, loop: LoopConfig) -> torch.optim.AdamW:
    """AdamW with `weight_decay` on the matrices and none on the vectors and scalars."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": loop.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=loop.learning_rate, betas=tuple(loop.betas))
