"""What the command-line entry points share: `--set KEY=VALUE` parsing, coercing such values to a field's
type, telling a local path from a Hub repository id before anything tries the network, `--dtype` names and the
device synchronisation that timings need."""

from __future__ import annotations

import argparse
import os
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from .configuration_atlas import AtlasMAGConfig

# `--dtype` choices of the entry points.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# owner/name, as the Hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock around it measures the work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_run_config_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`: raw assignments for `load_config`, which reads the
    values as YAML and checks them against the run configuration's schema."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a value of the run configuration, e.g. {example} (repeatable)",
    )


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as YAML (`20`, `true`, `[1, 2]`, `null`); an argparse `type`."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def coerce_scalar(annotation: Any, value: Any, key: str) -> Any:
    """`value` as the scalar type `annotation` names, or unchanged if that type is not a plain scalar.

    YAML 1.1 reads `1e-4` (no dot) as a string and `--set` values come through YAML, so a float field accepts
    a numeric string; anything that is not a number where one is needed raises naming `key`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        scalars = [arg for arg in args if arg in (bool, int, float)]
        return coerce_scalar(scalars[0], value, key) if len(scalars) == 1 and len(args) <= 2 else value
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"`{key}` must be a number, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"`{key}` must be an integer, got {value!r}")
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"`{key}` must be true or false, got {value!r}")
    return value


def coerce_model_fields(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """AtlasMAGConfig field values from `--set`/YAML as the fields' types; keys it does not know are left for
    AtlasMAGConfig to refuse (with a suggestion)."""
    hints = get_type_hints(AtlasMAGConfig.__init__)
    return {key: coerce_scalar(hints.get(key, Any), value, prefix + key) for key, value in values.items()}


def local_or_hub(name_or_path: str | Path, what: str) -> str:
    """`name_or_path` if it is an existing local path or could be a Hub repository id; otherwise a clear error
    (instead of a minute of Hub retries and an error about connecting, or about the id's form)."""
    text = str(name_or_path)
    if Path(text).expanduser().exists():
        return text
    # A Hub id has at most one slash and no file suffix; anything else was meant as a local path.
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith((".json", ".yaml"))
    if looks_local or not HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"{what} {text!r} does not exist (no such file or folder)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(
            f"{what} {text!r} is not a local file or folder, and HF_HUB_OFFLINE is set, so it cannot come from "
            "the Hub"
        )
    return text
