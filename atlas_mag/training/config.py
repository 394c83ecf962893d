"""The YAML run configuration of `train`: its schema as dataclasses, loading a file with `--set key=value`
overrides applied, and the checks that name the offending key."""

from __future__ import annotations

import argparse
import inspect
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..cli import coerce_model_fields, coerce_scalar, parse_assignment
from ..configuration_atlas import AtlasMAGConfig
from .data import DataSource
from .sharding import SHARDING_CHOICES

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
TRACKER_CHOICES = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema below."""


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
    # "fsdp2": shard the parameters, gradients and optimizer state over the processes (see `sharding`).
    sharding: str = "none"

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp2"


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
    """A checked `TrainConfig` from a raw mapping, as YAML parses a run configuration."""
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
    if loop.sharding not in SHARDING_CHOICES:
        raise ConfigError(f"`training.sharding` must be one of {SHARDING_CHOICES}, got {loop.sharding!r}")
    if loop.sharding == "fsdp2" and loop.mixed_precision == "fp16":
        raise ConfigError(
            "`training.mixed_precision: fp16` cannot be used with `training.sharding: fsdp2` (fp16 needs a gradient "
            "scaler for sharded gradients); use bf16 or auto"
        )
    if loop.stop_at_step is not None and not 0 < loop.stop_at_step <= loop.max_steps:
        raise ConfigError(f"`training.stop_at_step` must be in [1, max_steps], got {loop.stop_at_step}")
    unknown_trackers = sorted(set(logging.trackers) - set(TRACKER_CHOICES))
    if unknown_trackers:
        raise ConfigError(f"Unknown tracker(s) {unknown_trackers} in `logging.trackers`; choose from {TRACKER_CHOICES}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The plain mapping of a configuration (what config.yaml holds); `config_from_dict` reads it back."""
    return asdict(config)
