"""Pretraining Atlas-MAG with Accelerate: the YAML run configuration, and a training loop that runs
unchanged on a CPU, one GPU or many (`accelerate launch`, DDP or FSDP), with bf16 mixed precision, gradient
accumulation, clipping, gradient checkpointing with TTL on, resumable checkpoints that lose nothing, and
metrics.

Output folder of a run:
    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON record per logged step and per validation
    tensorboard/                Accelerate trackers
    checkpoints/step_XXXXXXXX/  `accelerator.save_state` + `trainer_state_rank{r}.json` (step, data position)
    final/                      the trained model as a Hub folder (safetensors, custom code, model card)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import re
import shutil
import time
import types
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from datasets import IterableDataset
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..cli import coerce_model_fields, coerce_scalar, local_or_hub, parse_assignment
from ..compat import enable_activation_checkpointing
from ..configuration_atlas import AtlasMAGConfig
from ..hub import render_model_card, save_model_folder
from ..modeling_atlas import AtlasMAGCache, AtlasMAGForCausalLM
from ..tokenization import load_tokenizer
from .data import DataSource, PackedWindows, batches, load_source, mix_sources, split_holdout

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
TRACKER_CHOICES = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema below."""


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    sources: list[DataSource]
    # Tokens per training sequence; documents are packed into windows of seq_len + 1 (input + target).
    seq_len: int = 2048
    # Separate validation sources; without them the first `validation_documents` of every source are held out.
    validation_sources: list[DataSource] | None = None
    validation_documents: int = 200
    # Size of the fixed validation set, in windows.
    validation_windows: int = 32
    # Shuffle local datasets (a seeded permutation) and streamed ones (shard order + a buffer of
    # `shuffle_buffer` documents; a resumed run refills that buffer, so its order then differs slightly).
    shuffle: bool = False
    shuffle_buffer: int = 10_000
    stopping_strategy: str = "first_exhausted"


@dataclass
class LoopConfig:
    max_steps: int
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Applied to matrices; vectors and scalars (norms, w_init, output_scale) are not decayed.
    weight_decay: float = 0.1
    warmup_steps: int = 100
    # The cosine decays the learning rate to min_lr_ratio * learning_rate at max_steps.
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # "auto": bf16 on a GPU that supports it, else fp32.
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    # Stop (after a checkpoint) at this step without changing the schedule, e.g. for a time-limited job.
    stop_at_step: int | None = None


@dataclass
class LoggingConfig:
    log_every: int = 10
    # Validation every `eval_every` steps (0: only at the start and the end).
    eval_every: int = 200
    eval_batch_size: int | None = None
    save_every: int = 500
    keep_last: int = 3
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress_bar: bool = True


@dataclass
class ExportConfig:
    title: str = "Atlas-MAG"
    summary: str = "An Atlas-MAG language model pretrained with atlas_mag.training."


@dataclass
class TrainConfig:
    output_dir: str
    tokenizer: str
    data: DataConfig
    training: LoopConfig
    # AtlasMAGConfig fields of a new model (vocab_size defaults to the tokenizer's length).
    model: dict[str, Any] = field(default_factory=dict)
    # A saved Atlas-MAG folder to start from instead of a new model (then `model` must be empty).
    init_from: str | None = None
    seed: int = 0
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{where or 'config'}` must be a mapping, got {type(data).__name__}")
    names = [item.name for item in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"Unknown config key(s) {[prefix + key for key in unknown]}; known keys: {names}")
    hints = get_type_hints(cls)
    values = {}
    for item in fields(cls):
        key = f"{where}.{item.name}" if where else item.name
        if item.name in data:
            values[item.name] = _coerce(hints[item.name], data[item.name], key)
        elif item.default is MISSING and item.default_factory is MISSING:
            raise ConfigError(f"Missing required config key `{key}`")
    return cls(**values)


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        return _coerce(annotation, value, where)
    if annotation is Any:
        return value
    if is_dataclass(annotation):
        return _build(annotation, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{where}` must be a list, got {value!r}")
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}")
        return dict(value)
    if annotation in (float, int, bool):
        try:
            return coerce_scalar(annotation, value, where)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    if not isinstance(value, annotation):
        raise ConfigError(f"`{where}` must be {annotation.__name__}, got {value!r}")
    return value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `dotted.key=value` to a raw config mapping; the value is parsed as YAML (`20`, `true`, `[1, 2]`,
    `null`), and list items are addressed by index (`data.sources.0.path=...`)."""
    try:
        key, value = parse_assignment(assignment)
    except argparse.ArgumentTypeError as error:
        raise ConfigError(f"Override {assignment!r} is not of the form key=value") from error
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Override {key!r}: {part!r} is not an index of a list of {len(node)}")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
        else:
            raise ConfigError(f"Override {key!r}: {'.'.join(parts[:depth])!r} is not a mapping or list")
        if last:
            node[index] = value
        else:
            node = node[index]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML run configuration, apply `key=value` overrides and check it (see `TrainConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, raw, "")
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    """Value checks that the types alone do not catch, each naming its key."""
    known_model_keys = set(inspect.signature(AtlasMAGConfig.__init__).parameters) - {"self", "kwargs"}
    unknown_model = sorted(set(config.model) - known_model_keys)
    if unknown_model:
        raise ConfigError(f"Unknown model config key(s) {['model.' + k for k in unknown_model]} (see AtlasMAGConfig)")
    if config.init_from and config.model:
        raise ConfigError("Set either `init_from` (a saved model) or `model` (a new one), not both")
    try:
        config.model = coerce_model_fields(config.model, "model.")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    try:
        AtlasMAGConfig(**config.model)  # every model field checked now, not after the data is loaded
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error
    data, loop, logging = config.data, config.training, config.logging
    positive = {
        "data.seq_len": data.seq_len,
        "data.validation_windows": data.validation_windows,
        "training.max_steps": loop.max_steps,
        "training.micro_batch_size": loop.micro_batch_size,
        "training.gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "training.learning_rate": loop.learning_rate,
        "logging.log_every": logging.log_every,
        "logging.save_every": logging.save_every,
        "logging.keep_last": logging.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"`{key}` must be positive, got {value}")
    non_negative = {
        "data.validation_documents": data.validation_documents,
        "data.shuffle_buffer": data.shuffle_buffer,
        "training.warmup_steps": loop.warmup_steps,
        "training.weight_decay": loop.weight_decay,
        "training.max_grad_norm": loop.max_grad_norm,
        "logging.eval_every": logging.eval_every,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"`{key}` must be >= 0, got {value}")
    if not data.sources:
        raise ConfigError("`data.sources` is empty: give at least one source")
    if data.validation_sources is None and data.validation_documents == 0:
        raise ConfigError("Give `data.validation_sources` or hold out `data.validation_documents` > 0")
    if len(loop.betas) != 2 or not all(0 <= b < 1 for b in loop.betas):
        raise ConfigError(f"`training.betas` must be two numbers in [0, 1), got {loop.betas}")
    if not 0 <= loop.min_lr_ratio <= 1:
        raise ConfigError(f"`training.min_lr_ratio` must be in [0, 1], got {loop.min_lr_ratio}")
    if loop.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ConfigError(f"`training.mixed_precision` must be one of {MIXED_PRECISION_CHOICES}")
    if loop.stop_at_step is not None and not 0 < loop.stop_at_step <= loop.max_steps:
        raise ConfigError(f"`training.stop_at_step` must be in [1, max_steps], got {loop.stop_at_step}")
    unknown_trackers = sorted(set(logging.trackers) - set(TRACKER_CHOICES))
    if unknown_trackers:
        raise ConfigError(f"Unknown tracker(s) {unknown_trackers} in `logging.trackers`; choose from {TRACKER_CHOICES}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------


def build_datasets(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, rank: int, world_size: int
) -> tuple[PackedWindows, list[list[int]]]:
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


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> AtlasMAGForCausalLM:
    """A new model from `config.model` (vocabulary and special ids from the tokenizer) or `init_from`."""
    if config.init_from:
        model = AutoModelForCausalLM.from_pretrained(local_or_hub(config.init_from, "init_from"))
        if not isinstance(model, AtlasMAGForCausalLM):
            raise ValueError(f"{config.init_from} holds a {type(model).__name__}, not an Atlas-MAG model")
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


def make_optimizer(model: torch.nn.Module, loop: LoopConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": loop.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=loop.learning_rate, betas=tuple(loop.betas))


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


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
    model: torch.nn.Module, windows: list[list[int]], batch_size: int, accelerator: Accelerator
) -> dict[str, float]:
    """Validation loss with TTL on and off, and the TTL memory update norm, over all processes."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    # FSDP shards the parameters, so the initial memory is not available whole on each process.
    measure_memory = accelerator.distributed_type != DistributedType.FSDP
    rank_windows = windows[accelerator.process_index :: accelerator.num_processes]
    # nll with TTL, nll without, target tokens, sum of memory update norms, sequences measured
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(rank_windows), batch_size):
        batch = torch.tensor(rank_windows[start : start + batch_size], device=accelerator.device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with_ttl = model(input_ids=inputs, use_cache=measure_memory, ttl=True)
        without_ttl = model(input_ids=inputs, use_cache=False, ttl=False)
        totals[0] += causal_lm_loss(with_ttl.logits, targets, reduction="sum").double()
        totals[1] += causal_lm_loss(without_ttl.logits, targets, reduction="sum").double()
        totals[2] += targets.numel()
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


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of this process's parameter bytes: equal on every process of a data-parallel run."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders being written are hidden and not listed)."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (a file truncated or unreadable, say after a full disk or a copy cut
    short), or None if every file in it reads back."""
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):  # checks the header against the file's length
                    pass
            elif zipfile.is_zipfile(path):  # torch.save files (optimizer, scheduler, random states)
                with zipfile.ZipFile(path) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{path.name}: corrupt entry {bad}"
            elif path.suffix in (".bin", ".pt"):
                return f"{path.name}: not a complete torch.save archive"
        except Exception as error:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            return f"{path.name}: {error}"
    return None


def resolve_checkpoint(resume: str | Path, output_dir: Path) -> Path:
    """`resume` is "latest" (the newest intact checkpoint of `output_dir`; corrupt newer ones are skipped with
    a warning) or a checkpoint folder, which must be intact."""
    if str(resume) == "latest":
        root = output_dir / "checkpoints"
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        problems = []
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate)
            if problem is None:
                if problems:
                    warnings.warn(
                        f"--resume: skipped corrupt checkpoint(s) {'; '.join(problems)}; resuming from {candidate}",
                        stacklevel=2,
                    )
                return candidate
            problems.append(f"{candidate} ({problem})")
        raise ValueError(f"--resume: no intact checkpoint under {root}: {'; '.join(problems)}")
    path = Path(resume)
    if not (path / "trainer_state_rank0.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder written by atlas_mag.training")
    if (problem := checkpoint_problem(path)) is not None:
        raise ValueError(f"--resume: checkpoint {path} is corrupt ({problem})")
    return path


def save_checkpoint(
    accelerator: Accelerator, checkpoint_root: Path, step: int, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Write `accelerator.save_state` and every process's trainer state into a hidden folder, then rename it
    to `step_XXXXXXXX`: a run killed while saving leaves no half-written checkpoint behind. Keeps the last
    `keep_last`. All processes must call it (the folder is shared)."""
    final = checkpoint_root / f"step_{step:08d}"
    staging = checkpoint_root / f".step_{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    state_file = staging / f"trainer_state_rank{accelerator.process_index}.json"
    state_file.write_text(json.dumps(trainer_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            previous = checkpoint_root / f".{final.name}.old"
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
            staging.rename(final)
            shutil.rmtree(previous)
        else:
            staging.rename(final)
        for old in list_checkpoints(checkpoint_root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    saved_ranks = len(list(checkpoint.glob("trainer_state_rank*.json")))
    if saved_ranks != world_size:
        raise ValueError(
            f"Checkpoint {checkpoint} was written by {saved_ranks} process(es); resume it with as many "
            f"(this run has {world_size}), since each process's data position is saved separately"
        )
    return json.loads((checkpoint / f"trainer_state_rank{rank}.json").read_text())


def _resume_signature(config: TrainConfig) -> dict[str, Any]:
    """The settings that fix what the data position means; they must not change across a resume."""
    return {
        "data": asdict(config.data),
        "micro_batch_size": config.training.micro_batch_size,
        "gradient_accumulation_steps": config.training.gradient_accumulation_steps,
        "seed": config.seed,
    }


def _schedule_settings(loop: LoopConfig) -> dict[str, Any]:
    """The settings of the learning-rate schedule, saved with each checkpoint so a resume can say what changed."""
    return {"max_steps": loop.max_steps, "warmup_steps": loop.warmup_steps, "min_lr_ratio": loop.min_lr_ratio}


class MetricsLog:
    """metrics.jsonl, written by the main process. A resumed run drops records after its checkpoint's step, so
    the file reads like one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            kept = [json.dumps(r) + "\n" for r in records if r["step"] <= resume_step]
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"a.b": scalar} for the trackers' hyperparameter tables."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


# ------------------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig) -> Accelerator:
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
    accelerator.register_save_state_pre_hook(_drop_tied_aliases)
    return accelerator


def _drop_tied_aliases(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """Save each tied tensor once (the tied LM head is the embedding): safetensors cannot hold aliases, and
    Accelerate would drop them itself with a warning at every checkpoint. Loading re-ties them."""
    for state in weights:
        seen = set()
        for name in list(state):
            tensor = state[name]
            if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
                continue  # sharded (DTensor) states have no plain storage to compare
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                del state[name]
            seen.add(key)


def train(config: TrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or, with `resume`, continue) pretraining. Returns the exported model folder, or the checkpoint
    when the run stops early at `training.stop_at_step`. Every check of data and configuration happens before
    the first step."""
    loop, logging = config.training, config.logging
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    accelerator = make_accelerator(config)
    rank, world_size, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(config.seed)

    checkpoint = resolve_checkpoint(resume, output_dir) if resume is not None else None
    trainer_state = read_trainer_state(checkpoint, rank, world_size) if checkpoint else None
    if checkpoint is None and list_checkpoints(checkpoint_root):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or use another output_dir"
        )
    if trainer_state is not None and trainer_state["signature"] != _resume_signature(config):
        raise ValueError(
            f"Checkpoint {checkpoint} was written with other data/batch settings: {trainer_state['signature']}"
        )

    tokenizer = load_tokenizer(config.tokenizer)
    train_windows, validation_windows = build_datasets(config, tokenizer, rank, world_size)
    start_step, tokens_seen = 0, 0
    if trainer_state is not None:
        start_step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        train_windows.load_state_dict(trainer_state["data"])
    train_batches = batches(iter(train_windows), loop.micro_batch_size)
    # Pull the first batch now, so that data too small for one window fails before any training.
    train_batches = chain([next(train_batches)], train_batches)

    model = build_model(config, tokenizer)
    model.train()
    if loop.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = accelerator.prepare(model)
    # After `prepare`, so that FSDP hands the optimizer its sharded parameters.
    optimizer = make_optimizer(model, loop)
    schedule = partial(
        lr_multiplier, warmup_steps=loop.warmup_steps, max_steps=loop.max_steps, min_ratio=loop.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        # The schedule is a function of the step: a new max_steps or warm-up reshapes it from here on.
        scheduler.scheduler.last_epoch = start_step
        saved_schedule = trainer_state.get("schedule", {})
        changed = {
            key: (saved_schedule[key], value)
            for key, value in _schedule_settings(loop).items()
            if key in saved_schedule and saved_schedule[key] != value
        }
        if changed:
            for group, base_lr in zip(optimizer.param_groups, scheduler.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * schedule(start_step)
        if changed and is_main:
            warnings.warn(
                "--resume: learning-rate schedule settings changed since the checkpoint ("
                + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
                + f"); the schedule follows the new settings from step {start_step}",
                stacklevel=2,
            )
        accelerator.print(
            f"resumed from {checkpoint}: step {start_step} of {loop.max_steps}, {tokens_seen:,} tokens seen, "
            f"learning rate {optimizer.param_groups[0]['lr']:.3g}"
        )

    stop_step = loop.stop_at_step or loop.max_steps
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", is_main, start_step if checkpoint else None)
    if logging.trackers:
        accelerator.init_trackers("atlas_mag", config=_flatten(config_to_dict(config)))
    eval_batch_size = logging.eval_batch_size or loop.micro_batch_size
    tokens_per_step = loop.micro_batch_size * config.data.seq_len * loop.gradient_accumulation_steps * world_size

    def record(step: int, metrics: dict[str, float]) -> None:
        metrics_log.write({"step": step, **metrics})
        accelerator.log(metrics, step=step)

    def checkpoint_at(step: int) -> Path:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "data": train_windows.state_dict(),
            "signature": _resume_signature(config),
            "schedule": _schedule_settings(loop),
            "param_sha256": parameter_fingerprint(accelerator.unwrap_model(model)),
        }
        return save_checkpoint(accelerator, checkpoint_root, step, state, logging.keep_last)

    if checkpoint is None:
        record(0, evaluate(model, validation_windows, eval_batch_size, accelerator))
    progress = tqdm(
        total=loop.max_steps,
        initial=start_step,
        desc="training",
        disable=not (is_main and logging.progress_bar),
    )
    interval_loss = torch.zeros((), device=accelerator.device)
    interval_ttl_norm = torch.zeros((), device=accelerator.device)
    interval_steps, interval_start = 0, time.perf_counter()
    last_checkpoint = checkpoint
    for step in range(start_step + 1, stop_step + 1):
        learning_rate = optimizer.param_groups[0]["lr"]
        for _ in range(loop.gradient_accumulation_steps):
            batch = next(train_batches).to(accelerator.device)
            with accelerator.accumulate(model):
                outputs = model(input_ids=batch[:, :-1])
                loss = causal_lm_loss(outputs.logits, batch[:, 1:])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad()
            interval_loss += loss.detach() / loop.gradient_accumulation_steps
            if outputs.ttl_gradient_norms is not None:
                interval_ttl_norm += outputs.ttl_gradient_norms.mean() / loop.gradient_accumulation_steps
        scheduler.step()
        tokens_seen += tokens_per_step
        interval_steps += 1
        progress.update(1)

        if step % logging.log_every == 0 or step == stop_step:
            mean_loss = accelerator.reduce(interval_loss, reduction="mean").item() / interval_steps
            elapsed = time.perf_counter() - interval_start
            metrics = {
                "loss": mean_loss,
                "perplexity": math.exp(min(mean_loss, 50.0)),
                "lr": learning_rate,
                "grad_norm": float(grad_norm),
                "tokens_per_second": interval_steps * tokens_per_step / elapsed,
                "tokens_seen": tokens_seen,
                "epoch": train_windows.epoch,
                # Mean norm of the memory gradients of the test-time updates made during the training forwards.
                "ttl_gradient_norm": accelerator.reduce(interval_ttl_norm, reduction="mean").item() / interval_steps,
            }
            record(step, metrics)
            progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{learning_rate:.2e}")
            interval_loss.zero_()
            interval_ttl_norm.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        if (logging.eval_every and step % logging.eval_every == 0) or step == loop.max_steps:
            metrics = evaluate(model, validation_windows, eval_batch_size, accelerator)
            record(step, metrics)
            if is_main:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step % logging.save_every == 0 or step == stop_step:
            last_checkpoint = checkpoint_at(step)
    progress.close()

    if stop_step < loop.max_steps:
        accelerator.end_training()
        accelerator.print(f"stopped at step {stop_step}; resume from {last_checkpoint}")
        return last_checkpoint
    final_dir = export_final_model(config, accelerator, model, tokenizer, tokens_seen)
    accelerator.end_training()
    accelerator.print(f"saved the trained model to {final_dir}")
    return final_dir


def export_final_model(
    config: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tokens_seen: int,
) -> Path:
    """Save the trained weights as a Hub folder (`output_dir/final`). The full state dict is gathered from
    every process (FSDP included) into a plain fp32 model."""
    state_dict = accelerator.get_state_dict(model)
    final_dir = Path(config.output_dir) / "final"
    if accelerator.is_main_process:
        trained = AtlasMAGForCausalLM(accelerator.unwrap_model(model).config)
        trained.load_state_dict(state_dict)
        sources = ", ".join(f"{s.label} (p={s.probability:g})" for s in config.data.sources)
        provenance = (
            f"Pretrained from scratch with `scripts/train.py` for {config.training.max_steps} steps "
            f"({tokens_seen:,} tokens, sequence length {config.data.seq_len}) on {sources}."
        )
        if config.init_from:
            provenance = provenance.replace("from scratch", f"from {config.init_from}")
        card = render_model_card(trained, config.export.title, config.export.summary, provenance)
        save_model_folder(trained, final_dir, tokenizer=tokenizer, card=card, overwrite=True)
    accelerator.wait_for_everyone()
    return final_dir


def iterate_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Metrics file {path} does not exist")
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


# Panels of `plot_metrics`: title and the metrics.jsonl keys drawn in it.
METRIC_PANELS = (
    ("loss", ("loss", "val_loss", "val_loss_ttl_off")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens / s", ("tokens_per_second",)),
    ("TTL gain (val loss off - on)", ("val_ttl_gain",)),
    ("TTL memory update norm", ("ttl_memory_update_norm",)),
    ("TTL memory gradient norm", ("ttl_gradient_norm",)),
)


def plot_metrics(metrics_path: str | Path, output_path: str | Path) -> Path:
    """Draw the curves of a metrics.jsonl into a PNG (written through a temporary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(iterate_metrics(metrics_path))
    if not records:
        raise ValueError(f"Metrics file {metrics_path} has no records")
    panels = [(title, keys) for title, keys in METRIC_PANELS if any(k in r for r in records for k in keys)]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for axis, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o", markersize=2, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(f".{output_path.stem}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(output_path)
    return output_path
