"""Analytic FLOPs of what each benchmark row computes, split by what they are for.

Only matrix products are counted (2 FLOPs per multiply-add, as `torch.utils.flop_counter` counts them):
normalisations, activations, the monomial features and softmax are elementwise and left out. Sizes: h hidden,
I FFN width, V vocabulary, L layers, g gamma-gate width, k memory key dim, F feature size, r poly rank, the memory
MLP's widths r -> ... -> k (products summed as `mlp` = sum of in x out), w sliding window, W Omega window, C TTL
chunk, K Newton–Schulz steps. Per layer, for the tokens of one sequence:

- base: the q, k, v, o projections 8h² per token (14h² for `mal` blocks, which project q, k, v twice), the FFN
  (SwiGLU) 6hI, the gamma gate 2g(h + 1), the data-dependent rates 6h (`ttl_data_dependent_rates`); once per
  model, the LM head 2hV per position whose logits are computed;
- attention: queries are taken 256 at a time (`ops_atlas.QUERY_BLOCK`) against the keys from the block's first
  query's window to its last query, and both products cost 2 h per (query, key) pair: 4h x queries x keys per
  block, the masked pairs included (they are computed). A decoding step over a full window multiplies w - 1
  cached keys (its own score is elementwise). The Llama's causal attention is charged its t + 1 keys per query
  (what a causal kernel computes; torch's FLOP counter charges the whole square);
- memory reads: the Q-K projection (per block of queries against the keys from W before its first query to just
  before its last: the scores and the weighted sum 2h each per (query, key) pair and the normaliser 2 per pair; a
  single query 4h per key of its W) and the memory itself, 2(hk + Fr + mlp + kh) per token read;
- memory gradients: per TTL update (one per C positions), over its window of min(W, positions so far) positions,
  the forward again unless the read's forward is reused (the window is exactly the chunk just read), then the
  analytic backward (`ops_atlas.memory_loss_gradients`): 4hk (proj_up: weight and input), 4 mlp, 4Fr, 2kh
  (proj_down: weight only) per position;
- Newton–Schulz: per update, `ops_atlas.newton_schulz_flops` of every memory matrix in the evaluation that
  `newton_schulz_choice` makes for it (Muon only).

A training step is the forward, whose differentiated products cost twice again in the backward (gradients of
both operands), so 3x base, attention and reads (torch's count exactly for `mag` blocks; a `mal` block's first
value projection gets no backward, 1.3% less in `tests/test_flops.py`); the TTL updates run outside autograd (1x) unless
`ttl_backprop_through_updates`, where they are charged 3x too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from transformers import LlamaConfig

from ..configuration_atlas import AtlasMAGConfig
from ..ops_atlas import QUERY_BLOCK, newton_schulz_choice, newton_schulz_flops
from .grid import BenchmarkGrid
from .variants import Variant

# Computed in the forward and differentiated: the backward pays the forward's products twice more.
TRAINING_FACTOR = 3


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by what they are for (see the module docstring)."""

    base: float = 0.0
    attention: float = 0.0
    memory_reads: float = 0.0
    memory_gradients: float = 0.0
    newton_schulz: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, field.name) for field in fields(self))

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> FlopCount:
        return FlopCount(*(getattr(self, f.name) * factor for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        return {**{field.name: getattr(self, field.name) for field in fields(self)}, "total": self.total}


def _blocked_pairs(num_queries: int, key_range: Callable[[int, int], tuple[int, int]]) -> int:
    """(query, key) pairs a blocked product computes: per block of `QUERY_BLOCK` queries, `key_range(start, end)`
    gives its keys [lo, hi)."""
    pairs = 0
    for start in range(0, num_queries, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, num_queries)
        lo, hi = key_range(start, end)
        pairs += (end - start) * max(0, hi - lo)
    return pairs


def _memory_read_flops(config: AtlasMAGConfig) -> int:
    """One token through the memory (`ops_atlas.memory_forward`)."""
    return 2 * (
        2 * config.hidden_size * config.memory_key_dim + config.feature_size * config.poly_rank + _mlp_products(config)
    )


def _mlp_products(config: AtlasMAGConfig) -> int:
    widths = [config.poly_rank] + [config.memory_mlp_hidden_size] * config.memory_depth + [config.memory_key_dim]
    return sum(widths[i] * widths[i + 1] for i in range(len(widths) - 1))


def _memory_backward_flops(config: AtlasMAGConfig) -> int:
    """One window position through `ops_atlas.memory_loss_gradients` (the forward not included)."""
    h, k = config.hidden_size, config.memory_key_dim
    return 4 * h * k + 4 * _mlp_products(config) + 4 * config.feature_size * config.poly_rank + 2 * k * h


def _newton_schulz_update_flops(config: AtlasMAGConfig) -> int:
    """One TTL update's Newton–Schulz of every memory matrix (Muon), in the evaluation each one gets."""
    if config.memory_optimizer != "muon":
        return 0
    h, k, r, f = config.hidden_size, config.memory_key_dim, config.poly_rank, config.feature_size
    widths = [r] + [config.memory_mlp_hidden_size] * config.memory_depth + [k]
    shapes = [(k, h), (r, f), *((widths[i + 1], widths[i]) for i in range(len(widths) - 1)), (h, k)]
    steps, forced = config.ttl_ns_steps, config.ttl_ns_evaluation
    return sum(
        newton_schulz_flops(rows, cols, steps, newton_schulz_choice(rows, cols, steps, forced)) for rows, cols in shapes
    )


def atlas_forward_flops(
    config: AtlasMAGConfig, new_tokens: int, past: int = 0, ttl: bool = True, logits: int | None = None
) -> FlopCount:
    """One sequence's forward over `new_tokens` positions after `past` earlier ones (held in the cache), with
    logits for `logits` positions (None: all new ones). Counts what `modeling_atlas` computes, including the
    histories a cache keeps (w - 1 attention keys, W Q-K keys, W - 1 Omega positions)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    logits = new_tokens if logits is None else logits
    # `mal` blocks project q, k and v a second time, from the input plus the memory's output.
    projections = 8 * h * h + (6 * h * h if config.use_memory and config.block_type == "mal" else 0)
    per_token = projections + 6 * h * config.intermediate_size
    if config.use_memory:
        per_token += 2 * config.gamma_gate_hidden_size * (h + 1)
        if config.ttl_data_dependent_rates:
            per_token += 2 * 3 * h
    base = layers * new_tokens * per_token + 2 * h * config.vocab_size * logits

    window = config.sliding_window
    kept = min(window - 1, past)
    if new_tokens == 1 and kept == window - 1:
        attention_pairs = window - 1  # a decoding step over a full window: the ring-buffer path
    else:
        attention_pairs = _blocked_pairs(
            new_tokens, lambda start, end: (max(0, kept + start - window + 1), kept + end)
        )
    attention = layers * 4 * h * attention_pairs
    if not config.use_memory:
        return FlopCount(base, attention)

    omega = config.omega_window
    qk_kept = min(omega, past)
    if new_tokens == 1:
        qk = 4 * h * min(omega, qk_kept)
    else:
        pairs = _blocked_pairs(new_tokens, lambda start, end: (max(0, qk_kept + start - omega), qk_kept + end - 1))
        qk = (4 * h + 2) * pairs
    reads = layers * (qk + new_tokens * _memory_read_flops(config))
    if not ttl:
        return FlopCount(base, attention, reads)

    history = min(omega - 1, past)
    gradients = updates = start = 0
    for column in range(new_tokens):
        if (past + column + 1) % config.ttl_chunk_size:
            continue
        window_start = max(0, history + column + 1 - omega)
        positions = history + column + 1 - window_start
        reused = window_start == history + start  # `read_and_learn` reuses the read's forward
        gradients += positions * (_memory_backward_flops(config) + (0 if reused else _memory_read_flops(config)))
        updates += 1
        start = column + 1
    ns = updates * _newton_schulz_update_flops(config)
    return FlopCount(base, attention, reads, layers * gradients, layers * ns)


def llama_forward_flops(config: LlamaConfig, new_tokens: int, past: int = 0, logits: int | None = None) -> FlopCount:
    """The same-size Llama's forward over `new_tokens` after `past` cached positions (causal, full attention)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    logits = new_tokens if logits is None else logits
    kv = 2 * h * config.num_key_value_heads * (h // config.num_attention_heads)
    base = layers * new_tokens * (2 * h * h * 2 + 2 * kv + 6 * h * config.intermediate_size)
    base += 2 * h * config.vocab_size * logits
    pairs = sum(past + i + 1 for i in range(new_tokens))
    return FlopCount(base, layers * 4 * h * pairs)


def _forward_flops(variant: Variant, new_tokens: int, past: int, ttl: bool, logits: int | None) -> FlopCount:
    config = variant.model.config
    if isinstance(config, AtlasMAGConfig):
        return atlas_forward_flops(config, new_tokens, past, ttl, logits)
    return llama_forward_flops(config, new_tokens, past, logits)


def _ttl(variant: Variant) -> bool:
    config = variant.model.config
    return isinstance(config, AtlasMAGConfig) and variant.extra_kwargs.get("ttl", config.ttl_enabled)


def row_flops_per_token(section: str, variant: Variant, length: int, grid: BenchmarkGrid) -> FlopCount:
    """FLOPs per token of a benchmark row, as `measure` runs it: a training step (forward + backward, logits
    everywhere), a prefill (logits of the last position), or the mean decoding step of a run (each one token
    after its context and the warm-up steps; the no-cache variant recomputes the whole prefix every step)."""
    ttl = _ttl(variant)
    if section == "train":
        forward = _forward_flops(variant, length, 0, ttl, None)
        config = variant.model.config
        learn_factor = TRAINING_FACTOR if getattr(config, "ttl_backprop_through_updates", False) else 1
        differentiated = FlopCount(forward.base, forward.attention, forward.memory_reads)
        learned = FlopCount(memory_gradients=forward.memory_gradients, newton_schulz=forward.newton_schulz)
        return (differentiated.scaled(TRAINING_FACTOR) + learned.scaled(learn_factor)).scaled(1 / length)
    if section == "prefill":
        return _forward_flops(variant, length, 0, ttl, 1).scaled(1 / length)
    if section != "decode":
        raise ValueError(f"unknown section {section!r}")
    first = length + variant.decode_warmup + grid.warmup
    if variant.recompute_prefix:
        steps = [_forward_flops(variant, first + i + 1, 0, ttl, 1) for i in range(grid.no_cache_decode_tokens)]
    else:
        steps = [_forward_flops(variant, 1, first + i, ttl, 1) for i in range(grid.decode_tokens)]
    total = steps[0]
    for step in steps[1:]:
        total = total + step
    return total.scaled(1 / len(steps))
