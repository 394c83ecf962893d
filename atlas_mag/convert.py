"""Convert the published Atlas-MAG training checkpoint (`checkpoint_step008800.pt` of
toddwbucy/Atlas-MAG_OmegaRule, layout in `../shared/reference/atlas_mag_reference.md`) into a Hub model
folder: config.json with `auto_map`, model.safetensors, the model's code, the tokenizer and a model card.

Sizes come from the tensors' shapes. The training-settings dict saved beside the weights
(`checkpoint["config"]`) is read only for what shapes cannot tell (`TRAINING_SETTINGS`), and its size fields
are checked against the shapes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configuration_atlas import AtlasMAGConfig, polynomial_feature_size
from .hub import check_output_dir, push_folder_to_hub, render_model_card, save_model_folder
from .modeling_atlas import AtlasMAGForCausalLM
from .tokenization import load_tokenizer

logger = logging.getLogger(__name__)

EXPECTED_FILE = (
    "expected an Atlas-MAG training checkpoint: a dict written by torch.save with 'model_state_dict' "
    "(the model's tensors: tok_emb.weight, blocks.<i>...., norm_f.weight), 'config' (the training "
    "settings) and 'step', 'epoch', 'tokens_seen', 'optimizer_state_dict'"
)

# Reference key -> key of AtlasMAGForCausalLM.
TOP_LEVEL_KEYS = {
    "w_init": "model.w_init",
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Per block, reference suffix -> our suffix.
ATTENTION_BLOCK_KEYS = {
    "norm1.weight": "input_norm.weight",
    "norm2.weight": "post_attention_norm.weight",
    "qkv.w_q.weight": "self_attn.q_proj.weight",
    "qkv.w_k.weight": "self_attn.k_proj.weight",
    "qkv.w_v.weight": "self_attn.v_proj.weight",
    "qkv.q_norm.weight": "self_attn.q_norm.weight",
    "qkv.k_norm.weight": "self_attn.k_norm.weight",
    "w_o.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.up_proj.weight",
    "ffn.w3.weight": "mlp.down_proj.weight",
}
MEMORY_BLOCK_KEYS = {
    "gamma_gate.gate.0.weight": "gamma_gate.0.weight",
    "gamma_gate.gate.2.weight": "gamma_gate.2.weight",
    "memory.output_scale": "memory.output_scale",
    "memory.proj_down.weight": "memory.proj_down.weight",
    "memory.poly_norm.weight": "memory.poly_norm.weight",
    "memory.poly_norm.bias": "memory.poly_norm.bias",
    "memory.poly_compress.weight": "memory.poly_compress.weight",
    "memory.w2.weight": "memory.mlp.0.weight",
    "memory.w1.weight": "memory.mlp.1.weight",
    "memory.proj_up.weight": "memory.proj_up.weight",
    "memory.output_norm.weight": "memory.output_norm.weight",
    "memory.output_norm.bias": "memory.output_norm.bias",
}
# Fixed buffers of the Q-K projection: checked against the config they define, then dropped.
DECAY_WEIGHTS = (
    "qk_memory.decay_weights"  # omega_decay ** arange(omega_window); the forward pass does not read it
)
PERSISTENT_MATRIX = "qk_memory.m_persistent"  # qk_persistent_scale * I
PERSISTENT_NORM = "qk_memory.norm_persistent"  # qk_normalizer_scale * hidden_size
# TTL momentum of the original's in-place test-time learning: optimiser state, not weights. Dropped.
MOMENTUM_KEY = re.compile(r"^blocks\.\d+\.memory\.momentum_")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Training settings (`checkpoint["config"]`) that shapes cannot tell -> AtlasMAGConfig field.
TRAINING_SETTINGS = {
    "ns_iterations": ("ttl_ns_steps", int),
    "ttl_eta": ("ttl_lr", float),
    "ttl_adaptive_eta": ("ttl_adaptive_lr", bool),
    "ttl_theta": ("ttl_momentum", float),
    "ttl_alpha": ("ttl_decay", float),
    "window_size": ("sliding_window", int),
}
# Training settings that describe sizes: only checked against the tensors.
SIZE_SETTINGS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
}
MEMORY_SIZE_SETTINGS = {"poly_rank": "poly_rank", "poly_degree": "poly_degree"}
MAX_POLY_DEGREE = 8


class CheckpointError(ValueError):
    """The file is not an Atlas-MAG training checkpoint, or its tensors do not form the model they
    describe."""


def _problem_list(header: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(header + "\n  - " + "\n  - ".join(problems))


def _float32_setting(value: float) -> float:
    """A setting read from a float32 buffer, as the decimal it was written from (0.949999988 -> 0.95)."""
    return float(f"{value:.7g}")


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint of the original implementation and check that it has that layout.

    The file is a pickle and is loaded with `torch.load(weights_only=False)`, which can run arbitrary code:
    only convert files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    logger.warning(
        "%s is a pickle, read with torch.load(weights_only=False): loading a pickle can run arbitrary code. "
        "Only convert checkpoints from a source you trust.",
        path,
    )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path} could not be read by torch.load ({type(error).__name__}: {error}); {EXPECTED_FILE}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict; {EXPECTED_FILE}")
    if "model_state_dict" not in checkpoint:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise CheckpointError(
                f"{path} is a bare state dict ({len(checkpoint)} tensors, e.g. {next(iter(checkpoint))!r}), "
                f"not a training checkpoint; {EXPECTED_FILE}"
            )
        raise CheckpointError(
            f"{path} has no 'model_state_dict' (its keys: {sorted(map(str, checkpoint))[:10]}); "
            f"{EXPECTED_FILE}"
        )
    state_dict = checkpoint["model_state_dict"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a dict of named tensors; {EXPECTED_FILE}")
    if checkpoint.get("config") is None:
        logger.warning(
            "%s has no training settings ('config'); the reference defaults are used for them", path
        )
    elif not isinstance(checkpoint["config"], Mapping):
        raise CheckpointError(
            f"{path}: 'config' is a {type(checkpoint['config']).__name__}, not a dict of training settings; "
            f"{EXPECTED_FILE}"
        )
    return checkpoint


def _block_indices(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(match.group(1)) for key in state_dict if (match := BLOCK_KEY.match(key))})


def _find(state_dict: Mapping[str, torch.Tensor], suffix: str) -> list[torch.Tensor]:
    """The tensor named `suffix`, or, for a block suffix, that tensor of every block (block order)."""
    if suffix in state_dict:
        return [state_dict[suffix]]
    return [
        state_dict[f"blocks.{i}.{suffix}"]
        for i in _block_indices(state_dict)
        if f"blocks.{i}.{suffix}" in state_dict
    ]


class _SizeReader:
    """Reads sizes off the tensors, trying several keys so that one missing or odd tensor still leaves the
    others to describe the model (the layout check then reports that tensor)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict
        self.problems: list[str] = []

    def size(self, what: str, *candidates: tuple[str, int]) -> int:
        for suffix, axis in candidates:
            for tensor in _find(self.state_dict, suffix):
                if tensor.dim() > axis:
                    return int(tensor.shape[axis])
        self.problems.append(
            f"cannot tell the {what}: none of {', '.join(s for s, _ in candidates)} is present"
        )
        return 1

    def first(self, suffix: str) -> torch.Tensor | None:
        found = _find(self.state_dict, suffix)
        return found[0] if found else None


def _persistent_scale(matrix: torch.Tensor) -> float | None:
    """s if `matrix` is s * I (square), else None."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        return None
    matrix = matrix.double()
    scale = matrix[0, 0].item()
    identity = scale * torch.eye(matrix.shape[0], dtype=torch.float64)
    return scale if torch.allclose(matrix, identity, rtol=1e-6, atol=1e-9) else None


def _geometric_ratio(weights: torch.Tensor) -> float | None:
    """r if `weights` is r ** arange(len), else None."""
    if weights.dim() != 1 or weights.numel() < 2:
        return None
    weights = weights.double()
    ratio = weights[1].item()
    expected = ratio ** torch.arange(weights.numel(), dtype=torch.float64)
    return ratio if torch.allclose(weights, expected, rtol=1e-5, atol=1e-12) else None


def config_from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], training_config: Mapping[str, Any] | None = None
) -> AtlasMAGConfig:
    """The AtlasMAGConfig that describes a reference-layout state dict.

    Sizes (vocabulary, width, layers, heads = hidden / q_norm size, FFN, memory key/hidden width, polynomial
    rank, gate width) come from the tensors; the polynomial degree from the feature size (2144 = 64 + 2080 is
    degree 2 on 64); the omega window and decay from `decay_weights` (= decay ** arange(window)); the Q-K
    scales from `m_persistent` (must be a scaled identity) and `norm_persistent`; the embedding is tied iff
    `lm_head.weight` equals `tok_emb.weight`. From `training_config` only the keys of `TRAINING_SETTINGS` are
    read, and `disable_memory`; its `dim`, `n_layers`, `n_heads`, `poly_rank`, `poly_degree` must agree with
    the tensors.
    """
    settings = dict(training_config or {})
    reader = _SizeReader(state_dict)
    use_memory = _uses_memory(state_dict, settings)
    fields = _backbone_fields(reader, use_memory)
    if use_memory:
        fields.update(_memory_size_fields(reader))
        fields.update(_memory_constant_fields(reader, fields["hidden_size"]))
    for key, (field, cast) in TRAINING_SETTINGS.items():
        if settings.get(key) is not None:
            fields[field] = cast(settings[key])
    size_settings = {**SIZE_SETTINGS, **(MEMORY_SIZE_SETTINGS if use_memory else {})}
    for key, field in size_settings.items():
        if settings.get(key) is not None and settings[key] != fields[field]:
            reader.problems.append(
                f"the training settings say {key}={settings[key]!r} but the tensors give "
                f"{field}={fields[field]}"
            )
    if reader.problems:
        raise _problem_list("The checkpoint's tensors do not describe an Atlas-MAG model:", reader.problems)
    try:
        return AtlasMAGConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"The checkpoint describes an invalid Atlas-MAG config: {error}") from error


def _uses_memory(state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> bool:
    """`not disable_memory` from the training settings, else whether any block holds memory tensors."""
    if "disable_memory" in settings:
        return not bool(settings["disable_memory"])
    return any(
        (match := BLOCK_KEY.match(key)) and match.group(2).startswith(("memory.", "gamma_gate.", "qk_memory."))
        for key in state_dict
        if not MOMENTUM_KEY.match(key)
    )


def _backbone_fields(reader: _SizeReader, use_memory: bool) -> dict[str, Any]:
    """Config fields of the embeddings, attention and FFN, read from the tensors' shapes."""
    blocks = _block_indices(reader.state_dict)
    if not blocks:
        reader.problems.append("no 'blocks.<i>.' tensors: the checkpoint has no layers")
    hidden = reader.size("hidden size", ("tok_emb.weight", 1), ("norm_f.weight", 0), ("w_init", 0))
    vocab_size = reader.size("vocabulary size", ("tok_emb.weight", 0), ("lm_head.weight", 0))
    intermediate_size = reader.size("FFN width", ("ffn.w1.weight", 0), ("ffn.w2.weight", 0), ("ffn.w3.weight", 1))
    head_dim = reader.size("head dim", ("qkv.q_norm.weight", 0), ("qkv.k_norm.weight", 0))
    if hidden % head_dim:
        reader.problems.append(f"hidden size {hidden} is not a multiple of the q_norm size (head dim) {head_dim}")
    embedding, lm_head = reader.first("tok_emb.weight"), reader.first("lm_head.weight")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": blocks[-1] + 1 if blocks else 1,
        "num_attention_heads": max(1, hidden // head_dim),
        "intermediate_size": intermediate_size,
        "use_memory": use_memory,
        "tie_word_embeddings": (
            embedding is None or lm_head is None or embedding.shape != lm_head.shape or torch.equal(embedding, lm_head)
        ),
    }


def _memory_size_fields(reader: _SizeReader) -> dict[str, Any]:
    """Config fields of the memory's and the gamma gate's sizes, and the polynomial degree they imply."""
    key_dim = reader.size(
        "memory key dim", ("memory.proj_down.weight", 0), ("memory.proj_up.weight", 1), ("memory.w1.weight", 0)
    )
    feature_size = reader.size(
        "memory feature size",
        ("memory.poly_norm.weight", 0),
        ("memory.poly_norm.bias", 0),
        ("memory.poly_compress.weight", 1),
    )
    degrees = [d for d in range(1, MAX_POLY_DEGREE + 1) if polynomial_feature_size(key_dim, d) == feature_size]
    if not degrees:
        reader.problems.append(
            f"memory feature size {feature_size} is not that of a polynomial feature map of degree "
            f"1..{MAX_POLY_DEGREE} on key dim {key_dim} (degree 2 on 64 is 64 + 2080 = 2144)"
        )
    fields: dict[str, Any] = {
        "memory_key_dim": key_dim,
        "poly_degree": degrees[0] if degrees else 1,
        "poly_rank": reader.size("polynomial rank", ("memory.poly_compress.weight", 0), ("memory.w2.weight", 1)),
        "gamma_gate_hidden_size": reader.size(
            "gamma gate width", ("gamma_gate.gate.0.weight", 0), ("gamma_gate.gate.2.weight", 1)
        ),
        "omega_window": reader.size("omega window", (DECAY_WEIGHTS, 0)),
    }
    memory_hidden = reader.size("memory MLP width", ("memory.w2.weight", 0), ("memory.w1.weight", 1))
    if memory_hidden % key_dim == 0:
        fields["memory_expansion"] = memory_hidden // key_dim
    else:
        fields["memory_hidden_size"] = memory_hidden
    return fields


def _memory_constant_fields(reader: _SizeReader, hidden: int) -> dict[str, Any]:
    """The Q-K projection's scales and the Omega decay, from block 0's fixed buffers (`convert_state_dict`
    checks every block against them)."""
    matrix, norm, decay = (reader.first(name) for name in (PERSISTENT_MATRIX, PERSISTENT_NORM, DECAY_WEIGHTS))
    fields: dict[str, Any] = {}
    if matrix is not None:
        scale = _persistent_scale(matrix)
        if scale is None:
            reader.problems.append(
                f"{PERSISTENT_MATRIX} (shape {list(matrix.shape)}) is not a scaled identity s * I "
                "(the reference's is 0.1 * I); this model cannot represent another persistent matrix"
            )
        else:
            fields["qk_persistent_scale"] = _float32_setting(scale)
    if norm is not None and norm.numel() == 1:
        if norm.item() <= 0:
            reader.problems.append(
                f"{PERSISTENT_NORM} is {norm.item()}, but must be > 0 (the reference's is 0.01 * hidden)"
            )
        else:
            fields["qk_normalizer_scale"] = _float32_setting(norm.item() / hidden)
    if decay is not None and decay.numel() > 1:
        ratio = _geometric_ratio(decay)
        if ratio is None or not 0 <= ratio < 1:
            reader.problems.append(f"{DECAY_WEIGHTS} is not decay ** arange({decay.numel()}) with 0 <= decay < 1")
        else:
            fields["omega_decay"] = _float32_setting(ratio)
    return fields


def reference_key_map(config: AtlasMAGConfig) -> dict[str, str]:
    """Reference key -> AtlasMAGForCausalLM key, for every weight of the model `config` describes."""
    mapping = dict(TOP_LEVEL_KEYS)
    block_keys = {**ATTENTION_BLOCK_KEYS, **(MEMORY_BLOCK_KEYS if config.use_memory else {})}
    for i in range(config.num_hidden_layers):
        mapping.update({f"blocks.{i}.{ref}": f"model.layers.{i}.{ours}" for ref, ours in block_keys.items()})
    return mapping


def reference_layout(config: AtlasMAGConfig) -> dict[str, tuple[int, ...]]:
    """Reference key -> shape of every tensor a checkpoint of this config holds (momentum buffers aside).

    Weight shapes are read from the model itself (built on the meta device), so they cannot drift from it.
    """
    with torch.device("meta"):
        model = AtlasMAGForCausalLM(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    mapping = reference_key_map(config)
    if set(mapping.values()) != set(shapes):
        raise RuntimeError(
            f"the key map does not cover the model: {sorted(set(shapes) ^ set(mapping.values()))}"
        )
    layout = {ref: shapes[ours] for ref, ours in mapping.items()}
    if config.use_memory:
        for i in range(config.num_hidden_layers):
            layout[f"blocks.{i}.{DECAY_WEIGHTS}"] = (config.omega_window,)
            layout[f"blocks.{i}.{PERSISTENT_MATRIX}"] = (config.hidden_size, config.hidden_size)
            layout[f"blocks.{i}.{PERSISTENT_NORM}"] = ()
    return layout


def _fixed_buffer_problems(
    state_dict: Mapping[str, torch.Tensor], config: AtlasMAGConfig, block: int
) -> list[str]:
    prefix = f"blocks.{block}."
    problems = []
    matrix = state_dict[prefix + PERSISTENT_MATRIX]
    scale = _persistent_scale(matrix)
    if scale is None or abs(scale - config.qk_persistent_scale) > 1e-6 * max(1.0, abs(scale)):
        problems.append(
            f"{prefix}{PERSISTENT_MATRIX} is not {config.qk_persistent_scale} * I (block 0's value)"
        )
    norm = state_dict[prefix + PERSISTENT_NORM].item()
    expected_norm = config.qk_normalizer_scale * config.hidden_size
    if abs(norm - expected_norm) > 1e-6 * max(1.0, abs(expected_norm)):
        problems.append(f"{prefix}{PERSISTENT_NORM} is {norm}, not {expected_norm} (block 0's value)")
    decay = state_dict[prefix + DECAY_WEIGHTS].double()
    expected_decay = config.omega_decay ** torch.arange(decay.numel(), dtype=torch.float64)
    if not torch.allclose(decay, expected_decay, rtol=1e-5, atol=1e-12):
        problems.append(
            f"{prefix}{DECAY_WEIGHTS} is not {config.omega_decay} ** arange({decay.numel()}) (block 0's)"
        )
    return problems


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: AtlasMAGConfig
) -> dict[str, torch.Tensor]:
    """Rename a reference-layout state dict to AtlasMAGForCausalLM keys (float32).

    Every tensor the layout of `config` needs must be there with its shape, and nothing else (momentum buffers
    aside, which are dropped); the fixed Q-K buffers of every block must hold the values `config` defines.
    All violations are reported together in one CheckpointError.
    """
    layout = reference_layout(config)
    missing = [key for key in layout if key not in state_dict]
    unexpected = [key for key in state_dict if key not in layout and not MOMENTUM_KEY.match(key)]
    wrong_shapes = [
        f"{key}: {list(state_dict[key].shape)}, expected {list(shape)}"
        for key, shape in layout.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    not_float = [
        f"{key}: {state_dict[key].dtype}"
        for key in layout
        if key in state_dict and not state_dict[key].is_floating_point()
    ]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong_shapes),
        ("not floating point", not_float),
    ):
        if items:
            problems.append(f"{title} ({len(items)}): " + "; ".join(items))
    if not problems:
        if config.use_memory:
            for block in range(config.num_hidden_layers):
                problems.extend(_fixed_buffer_problems(state_dict, config, block))
        if config.tie_word_embeddings and not torch.equal(
            state_dict["tok_emb.weight"], state_dict["lm_head.weight"]
        ):
            problems.append("lm_head.weight differs from tok_emb.weight, but the config ties them")
    if problems:
        raise _problem_list(
            f"The checkpoint's model_state_dict does not match the Atlas-MAG layout it describes "
            f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
            f"{'memory' if config.use_memory else 'attention only'}):",
            problems,
        )
    dropped = [key for key in state_dict if MOMENTUM_KEY.match(key)]
    if dropped:
        logger.info(
            "dropping %d TTL momentum buffers (every sequence starts with zero momentum)", len(dropped)
        )
    return {ours: state_dict[ref].to(torch.float32) for ref, ours in reference_key_map(config).items()}


def model_from_weights(config: AtlasMAGConfig, weights: Mapping[str, torch.Tensor]) -> AtlasMAGForCausalLM:
    """An AtlasMAGForCausalLM holding exactly `weights` (no missing or unexpected keys; tied weights
    re-tied)."""
    with torch.device("meta"):
        model = AtlasMAGForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(
    checkpoint_path: Path,
    sha256: str,
    checkpoint: Mapping[str, Any],
    config: AtlasMAGConfig,
    momentum_dropped: int,
) -> str:
    step = checkpoint.get("step", "unknown")
    training = [f"training step {step}"]
    if checkpoint.get("epoch") is not None:
        training.append(f"epoch {checkpoint['epoch']}")
    if isinstance(checkpoint.get("tokens_seen"), int):
        training.append(f"{checkpoint['tokens_seen']:,} tokens seen")
    original = "[toddwbucy/Atlas-MAG_OmegaRule](https://github.com/toddwbucy/Atlas-MAG_OmegaRule)"
    lines = [
        f"Converted from `{checkpoint_path.name}` (sha256 `{sha256}`; {', '.join(training)}), a training "
        f"checkpoint of the original implementation ({original}), by `scripts/convert_checkpoint.py`. Every "
        "weight was renamed, not changed; the embedding and the LM head are tied and stored once. With TTL "
        "off, the logits are those of the original forward pass.",
        "",
    ]
    if config.use_memory:
        lines += [
            f"- **Dropped: the {momentum_dropped} TTL momentum buffers** (`blocks.*.memory.momentum_*`). "
            "They are optimiser state of the original's test-time learning, which wrote into the shared "
            "weights in place; here every sequence starts with zero momentum.",
            "- Also not stored as tensors: the fixed Q-K projection buffers, which are config here "
            f"(`m_persistent` = {config.qk_persistent_scale} I -> `qk_persistent_scale`, `norm_persistent` "
            f"= {config.qk_normalizer_scale} x hidden -> `qk_normalizer_scale`), and `decay_weights`, "
            f"unused by the forward pass (omega window {config.omega_window}, decay {config.omega_decay}).",
            "- **The memory parameters were never trained by the outer optimiser**: the original excluded "
            "them from AdamW, so their values are the result of test-time-learning drift during training "
            "(in place, shared by the whole batch). Here they are the initial memory of every sequence.",
            f"- Training settings kept: Newton–Schulz steps {config.ttl_ns_steps} (the original's demo used "
            f"5), eta {config.ttl_lr}, adaptive eta {config.ttl_adaptive_lr}. TTL itself follows the Atlas "
            "paper here (per sequence, causal, also in eval and generation), unlike the original (only in "
            "training mode, in place, not causal), so TTL-on outputs are not the original's.",
        ]
    else:
        lines.append("- This is the **attention-only ablation** (`disable_memory`): no memory, no TTL.")
    lines += [
        "- The tokenizer puts `<bos>` before every text, as training documents (`<bos> text <eos>`) began.",
        '- **The original "NIAH 85.9%" is not retrieval accuracy.** It is the relative perplexity drop '
        "from removing the memory gate, measured on 4 validation sequences with TTL off; the original "
        '"NIAH benchmark" script scores random tokens and contains no needle. No needle-in-a-haystack '
        "accuracy has been measured for this checkpoint.",
    ]
    return "\n".join(lines)


def convert_checkpoint(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Convert an original Atlas-MAG training checkpoint into a Hub model folder at `output_dir`, written to a
    temporary folder beside it and renamed at the end; optionally upload that folder to the Hub repo
    `push_to_hub`. Returns `output_dir`."""
    output_dir = Path(output_dir)
    # Refuse early, before reading a 500 MB pickle; save_model_folder checks again when it writes.
    check_output_dir(output_dir, overwrite)
    checkpoint_path = Path(checkpoint_path)
    tokenizer = load_tokenizer(tokenizer_path)
    checkpoint = load_reference_checkpoint(checkpoint_path)
    state_dict = checkpoint["model_state_dict"]
    config = config_from_reference_state_dict(state_dict, checkpoint.get("config"))
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's embedding only "
            f"{config.vocab_size} rows: is it the checkpoint's tokenizer?"
        )
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = model_from_weights(config, convert_state_dict(state_dict, config))
    momentum_dropped = sum(1 for key in state_dict if MOMENTUM_KEY.match(key))
    provenance = _provenance(
        checkpoint_path, file_sha256(checkpoint_path), checkpoint, config, momentum_dropped
    )
    num_parameters = sum(p.numel() for p in model.parameters())
    kind = "Atlas-MAG" if config.use_memory else "Atlas-MAG attention-only ablation"
    card = render_model_card(
        model,
        title=f"{kind}, converted from {checkpoint_path.name}",
        summary=(
            f"A {num_parameters:,}-parameter {kind} language model trained by the original implementation, "
            "converted to a Transformers model whose test-time learning works in inference."
        ),
        provenance=provenance,
        **({"repo_id": push_to_hub} if push_to_hub else {}),
    )
    save_model_folder(model, output_dir, tokenizer=tokenizer, card=card, overwrite=overwrite)
    logger.info("wrote %s (%s parameters)", output_dir, f"{num_parameters:,}")
    if push_to_hub:
        url = push_folder_to_hub(output_dir, push_to_hub, private=private)
        logger.info("uploaded %s to %s", output_dir, url)
    return output_dir
