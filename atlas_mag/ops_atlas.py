"""Atlas-MAG's tensor functions: attention over a sliding window, the Q-K projection, the polynomial memory with
its analytic gradients, Newton–Schulz and the Omega-rule update, and the test-time-learning schedule.

Pure functions of tensors (and the config's sizes): no modules, no cache. Each multi-token function sits next
to its one-token (decoding) partner. This file is copied next to published weights with its siblings: it imports
only `torch` and `configuration_atlas.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache, wraps
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from .configuration_atlas import NS_EVALUATIONS, AtlasMAGConfig

# Newton–Schulz quintic coefficients (Muon; reference doc "Test-time learning").
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# What one kernel of a Newton–Schulz step costs beyond its FLOPs, in FLOPs: a small batched product took 10-15 us on
# this project's CPU, about 1 MFLOP at its matmul rate. It keeps small matrices, where the Gram form's extra
# kernels outweigh its FLOP savings, on the direct form.
NS_KERNEL_COST_FLOPS = 1_000_000
QK_EPS = 1e-6
# Guards S / ||S|| against an all-zero momentum without changing it for any realistic one.
NORM_FLOOR = 1e-20
# Queries processed per block by the banded attention and Q-K projection: bounds memory to
# block x (block + window) instead of T x T.
QUERY_BLOCK = 256


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [batch, 1, seq, head_dim] for rotate-half RoPE over all head dims."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def columns(tensor: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """The entries [start, end) along `dim` (not the first) in a contiguous tensor of their own: a view's strides
    would carry the length of the whole tensor, and a compiled graph guards on strides (it would compile anew for
    every such length); a view kept in the cache would pin the whole tensor's storage."""
    # The contiguous format also keeps it a copy when compiled: inductor drops a `clone()` that keeps its input's
    # strides (a plain one of a slice does when the dims before `dim` have size 1), leaving a view of the whole buffer.
    return tensor.narrow(dim, start, end - start).clone(memory_format=torch.contiguous_format)


def sliding_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor, window: int
) -> torch.Tensor:
    """Causal sliding-window softmax attention, computed block by block so no T x T scores exist.

    `query` [B, H, T, D] are the last T positions of the L keys/values [B, H, L, D]; `key_valid` [B, L] marks
    keys that are real tokens. Query `t` sees key `j` iff `t - window < j <= t` and `j` is valid; a query always
    sees itself so that padding queries stay finite.
    """
    num_queries, num_keys = query.shape[2], key.shape[2]
    if num_queries == 1 and num_keys <= window:
        # Decoding: one query sees every cached key that is a real token, and itself.
        mask = torch.cat([key_valid[:, :-1], torch.ones_like(key_valid[:, -1:])], dim=1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None, None])
    past = num_keys - num_queries
    outputs = []
    for start in range(0, num_queries, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, num_queries)
        key_lo = max(0, past + start - window + 1)
        key_hi = past + end
        in_window, itself = sliding_window_band(
            end - start, key_hi - key_lo, past + start - key_lo, window, query.device
        )
        mask = (in_window & key_valid[:, None, key_lo:key_hi]) | itself
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, key_lo:key_hi],
                value[:, :, key_lo:key_hi],
                attn_mask=mask[:, None],
            )
        )
    return torch.cat(outputs, dim=2)


CachedValue = TypeVar("CachedValue")


def _cached_constant(build: Callable[..., CachedValue]) -> Callable[..., CachedValue]:
    """Cache a constant tensor per argument tuple, built outside inference mode: a tensor first built under
    `torch.inference_mode()` could not be saved for backward by a later training step. Inside a compiled graph
    the constant is built in the trace instead (the compiler folds it; Dynamo does not trace through caches)."""

    @lru_cache(maxsize=32)
    def cached(*args: Any) -> CachedValue:
        with torch.inference_mode(False):
            return build(*args)

    @wraps(build)
    def constant(*args: Any) -> CachedValue:
        if torch.compiler.is_compiling():
            return build(*args)
        return cached(*args)

    constant.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return constant


@_cached_constant
def omega_decay_table(window: int, decay: float, device: torch.device) -> torch.Tensor:
    """Weight of a key `distance` positions before the query, for distance 0..window+1: decay^(distance-1)
    inside the Omega window [1, window], 0 outside (index with the distance clamped to [0, window + 1])."""
    table = torch.zeros(window + 2, device=device)
    table[1 : window + 1] = decay ** torch.arange(window, dtype=torch.float32, device=device)
    return table


@_cached_constant
def block_distances(num_queries: int, num_keys: int, first_offset: int, device: torch.device) -> torch.Tensor:
    """[num_queries, num_keys] distances `query position - key position` in a block whose first query sits
    `first_offset` positions after its first key. Every block of a prefill with the same shape and offset shares
    it, so the masks and decay weights built from it are built once per shape."""
    query_pos = torch.arange(first_offset, first_offset + num_queries, device=device)
    return query_pos[:, None] - torch.arange(num_keys, device=device)[None, :]


@_cached_constant
def sliding_window_band(
    num_queries: int, num_keys: int, first_offset: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of a `block_distances` block: the keys inside each query's causal window, and the query
    itself."""
    distance = block_distances(num_queries, num_keys, first_offset, device)
    return (distance >= 0) & (distance < window), distance == 0


@_cached_constant
def omega_decay_block(
    num_queries: int, num_keys: int, first_offset: int, window: int, decay: float, device: torch.device
) -> torch.Tensor:
    """The Omega-window decay weights (`omega_decay_table`) of a `block_distances` block."""
    distance = block_distances(num_queries, num_keys, first_offset, device)
    return omega_decay_table(window, decay, device)[distance.clamp(0, window + 1)]


@_cached_constant
def omega_decay_oldest_first(window: int, decay: float, device: torch.device) -> torch.Tensor:
    """decay^(window-1), ..., decay^0: the weights of the `window` keys before a query, oldest first."""
    return omega_decay_table(window, decay, device)[1 : window + 1].flip(0)


def qk_projection(
    query: torch.Tensor, keys: torch.Tensor, key_weights: torch.Tensor, config: AtlasMAGConfig
) -> torch.Tensor:
    """The Q-K projection q' that the memory reads (reference doc, "Forward pass").

    q'_t = (s q_t + S_t) / (n + N_t + 1e-6), with
    S_t = sum_{j=t-W}^{t-1} decay^(t-1-j) gamma_j (k_j . q_t) k_j and N_t = sum_j decay^(t-1-j) gamma_j ||k_j||^2
    over strictly past keys. `query` [B, T, hidden] are the last T of the L keys [B, L, hidden];
    `key_weights` [B, L] is gamma times the validity of each key. Computed in fp32, blocked over queries.
    """
    window = config.omega_window
    num_queries, num_keys = query.shape[1], keys.shape[1]
    past = num_keys - num_queries
    persistent = config.qk_persistent_scale * query
    normalizer = config.qk_normalizer_scale * config.hidden_size
    if num_queries == 1:
        # Decoding: the query's window is the last `count` keys before it, no position arithmetic needed.
        count = min(window, past)
        if count == 0:
            return persistent / (normalizer + QK_EPS)
        decay = omega_decay_oldest_first(window, config.omega_decay, query.device)[window - count :]
        weights = decay * key_weights[:, past - count : past]
        return qk_projection_one_query(query, keys[:, past - count : past], weights, config)
    key_sq_norms = keys.pow(2).sum(-1)
    outputs = []
    for start in range(0, num_queries, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, num_queries)
        key_lo = max(0, past + start - window)
        key_hi = past + end - 1
        block_query = query[:, start:end]
        if key_hi <= key_lo:
            outputs.append(persistent[:, start:end] / (normalizer + QK_EPS))
            continue
        decay = omega_decay_block(
            end - start, key_hi - key_lo, past + start - key_lo, window, config.omega_decay, query.device
        )
        weights = decay[None] * key_weights[:, None, key_lo:key_hi]
        block_keys = keys[:, key_lo:key_hi]
        scores = torch.matmul(block_query, block_keys.transpose(1, 2)) * weights
        summed = torch.matmul(scores, block_keys)
        norm_sum = torch.matmul(weights, key_sq_norms[:, key_lo:key_hi, None])
        outputs.append((persistent[:, start:end] + summed) / (normalizer + norm_sum + QK_EPS))
    return torch.cat(outputs, dim=1)


def qk_projection_one_query(
    query: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, config: AtlasMAGConfig
) -> torch.Tensor:
    """`qk_projection` of one query [B, 1, hidden] over the keys of its window [B, N, hidden] (any order), each
    with its full weight decay^(t-1-j) gamma_j [B, N]."""
    normalizer = config.qk_normalizer_scale * config.hidden_size
    scores = torch.matmul(keys, query.transpose(1, 2)).squeeze(-1) * weights
    summed = torch.matmul(scores[:, None], keys)
    norm_sum = (weights * keys.pow(2).sum(-1)).sum(-1)
    return (config.qk_persistent_scale * query + summed) / (normalizer + norm_sum[:, None, None] + QK_EPS)


@dataclass(frozen=True)
class MemoryWeights:
    """The memory's weights, named after what they are: one copy per sequence ([B, *shape], fp32) for test-time
    learning, or the module's parameters (unbatched). Its gradients, momentum and update steps have the same
    structure."""

    proj_down: torch.Tensor  # [key_dim, hidden]
    feature_coefficients: torch.Tensor | None  # [poly_degree], the Taylor feature map's only
    poly_norm_weight: torch.Tensor  # [feature_size]
    poly_norm_bias: torch.Tensor  # [feature_size]
    poly_compress: torch.Tensor  # [poly_rank, feature_size]
    mlp: tuple[torch.Tensor, ...]  # memory_depth + 1 matrices, poly_rank -> ... -> key_dim
    proj_up: torch.Tensor  # [hidden, key_dim]
    output_norm_weight: torch.Tensor  # [hidden]
    output_norm_bias: torch.Tensor  # [hidden]
    output_scale: torch.Tensor  # []

    def tensors(self) -> list[torch.Tensor]:
        """Every weight, in field order."""
        flat = []
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                flat.extend(value)
            elif value is not None:
                flat.append(value)
        return flat

    def names(self) -> list[str]:
        """The name of each weight of `tensors()`, in that order ("mlp.0", "mlp.1" for the tuple's)."""
        names = []
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                names.extend(f"{field.name}.{index}" for index in range(len(value)))
            elif value is not None:
                names.append(field.name)
        return names

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> MemoryWeights:
        """The same structure holding `tensors` (in `tensors()` order) instead."""
        remaining = iter(tensors)
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                values[field.name] = tuple(next(remaining) for _ in value)
            else:
                values[field.name] = None if value is None else next(remaining)
        if next(remaining, None) is not None:
            raise ValueError("MemoryWeights.with_tensors: more tensors than weights")
        return MemoryWeights(**values)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> MemoryWeights:
        return self.with_tensors([function(tensor) for tensor in self.tensors()])


class MemoryActivations(NamedTuple):
    """What the analytic backward of `memory_forward` needs, per sequence."""

    queries: torch.Tensor  # [B, N, hidden]
    raw_blocks: list[torch.Tensor]  # the monomial blocks before the Taylor coefficients; block 0 is proj_down(q)
    features_normed: torch.Tensor
    features_rstd: torch.Tensor
    layer_inputs: list[torch.Tensor]  # the input of poly_compress, then of every memory-MLP layer
    pre_activations: list[torch.Tensor]
    memory_output: torch.Tensor  # the memory MLP's output, the input of proj_up
    up_normed: torch.Tensor
    up_rstd: torch.Tensor
    affine: torch.Tensor  # output_norm's output, before output_scale


class MemoryForward(NamedTuple):
    output: torch.Tensor  # [B, N, hidden]
    activations: MemoryActivations | None


@_cached_constant
def monomial_indices(key_dim: int, degree: int, device: torch.device) -> torch.Tensor:
    """Where the degree-`degree` monomials sit in the flattened outer product of the degree-(`degree` - 1) block
    with u ([F_{degree-1} * key_dim] -> [F_degree] positions), in combinations-with-replacement order of their
    index tuples (for degree 2 this is `torch.triu_indices(key_dim, key_dim)` order): monomial (i_1 <= ... <= i_d)
    is monomial (i_1, ..., i_{d-1}) times u_{i_d}. Plain Python, so that `torch.compile` folds it into a
    constant (`torch.combinations` has a data-dependent shape, which breaks graphs)."""
    monomials: list[tuple[int, ...]] = [(index,) for index in range(key_dim)]
    positions = list(range(key_dim))
    for _ in range(degree - 1):
        positions = [p * key_dim + i for p, m in enumerate(monomials) for i in range(m[-1], key_dim)]
        monomials = [m + (i,) for m in monomials for i in range(m[-1], key_dim)]
    return torch.tensor(positions, dtype=torch.long, device=device)


def monomial_blocks(projected: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """The monomials of u = `projected` [..., key_dim] of degrees 1..`degree`, one block per degree; each block
    is the previous one times u, selected from their outer product (`monomial_indices`)."""
    key_dim = projected.shape[-1]
    blocks = [projected]
    for block_degree in range(2, degree + 1):
        outer = blocks[-1][..., :, None] * projected[..., None, :]
        index = monomial_indices(key_dim, block_degree, projected.device)
        blocks.append(outer.flatten(-2).index_select(-1, index))
    return blocks


def _bmm_t(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`inputs @ weight^T` with a weight per sequence: [B, N, in] x [B, out, in] -> [B, N, out]."""
    return torch.matmul(inputs, weight.transpose(-1, -2))


def _layer_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine over the last dim: the normalised x and 1 / std (fused: one kernel, not four)."""
    normed, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    return normed, rstd


def _layer_norm_backward(grad_normed: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    mean_grad = grad_normed.mean(-1, keepdim=True)
    mean_proj = (grad_normed * normed).mean(-1, keepdim=True)
    return rstd * (grad_normed - mean_grad - normed * mean_proj)


def _gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _sequence_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sequence's slice of a [B, ...] tensor."""
    return tensor.reshape(tensor.shape[0], -1).norm(dim=1)


def _per_sequence(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sequence [B] tensor to broadcast against `like` [B, ...]."""
    return vector.reshape(-1, *([1] * (like.dim() - 1)))


def memory_forward(
    weights: MemoryWeights, queries: torch.Tensor, config: AtlasMAGConfig, keep_activations: bool = False
) -> MemoryForward:
    """Memory(z) with per-sequence weights (reference doc, "Memory(z)").

    `weights` are [B, *shape] fp32 tensors; `queries` is [B, N, hidden] fp32. Returns the [B, N, hidden] output
    and, if asked, what the analytic backward needs.
    """
    eps = config.layer_norm_eps
    projected = _bmm_t(queries, weights.proj_down)
    raw_blocks = monomial_blocks(projected, config.poly_degree)
    if weights.feature_coefficients is not None:
        coefficients = weights.feature_coefficients
        blocks = [block * coefficients[:, i, None, None] for i, block in enumerate(raw_blocks)]
    else:
        blocks = raw_blocks
    features = torch.cat(blocks, dim=-1)
    features_normed, features_rstd = _layer_norm(features, eps)
    compress_input = features_normed * weights.poly_norm_weight[:, None] + weights.poly_norm_bias[:, None]
    layer_inputs = [compress_input]
    pre_activations = []
    hidden = _bmm_t(compress_input, weights.poly_compress)
    for i, layer_weight in enumerate(weights.mlp):
        layer_inputs.append(hidden)
        pre = _bmm_t(hidden, layer_weight)
        pre_activations.append(pre)
        hidden = F.gelu(pre) if i < config.memory_depth else pre
    up = _bmm_t(hidden, weights.proj_up)
    up_normed, up_rstd = _layer_norm(up, eps)
    affine = up_normed * weights.output_norm_weight[:, None] + weights.output_norm_bias[:, None]
    output = weights.output_scale[:, None, None] * affine
    if not keep_activations:
        return MemoryForward(output, None)
    activations = MemoryActivations(
        queries=queries,
        raw_blocks=raw_blocks,
        features_normed=features_normed,
        features_rstd=features_rstd,
        layer_inputs=layer_inputs,
        pre_activations=pre_activations,
        memory_output=hidden,
        up_normed=up_normed,
        up_rstd=up_rstd,
        affine=affine,
    )
    return MemoryForward(output, activations)


def polynomial_features_backward(raw_blocks: list[torch.Tensor], grad_blocks: list[torch.Tensor]) -> torch.Tensor:
    """Gradient with respect to the projected query u of the monomial blocks (`monomial_blocks`), from the
    gradients of every block: from the highest degree down, block d = select(block_{d-1} outer u) passes its
    gradient to u and to block d-1."""
    projected = raw_blocks[0]
    key_dim = projected.shape[-1]
    grad_blocks = list(grad_blocks)
    grad_projected = torch.zeros_like(projected)
    for degree in range(len(raw_blocks), 1, -1):
        previous = raw_blocks[degree - 2]
        index = monomial_indices(key_dim, degree, projected.device)
        grad_block = grad_blocks[degree - 1]
        grad_outer = grad_block.new_zeros(*grad_block.shape[:-1], previous.shape[-1] * key_dim)
        grad_outer = grad_outer.index_copy(-1, index, grad_block).unflatten(-1, (previous.shape[-1], key_dim))
        grad_projected = grad_projected + (grad_outer * previous[..., :, None]).sum(-2)
        grad_blocks[degree - 2] = grad_blocks[degree - 2] + (grad_outer * projected[..., None, :]).sum(-1)
    return grad_projected + grad_blocks[0]


def memory_loss_gradients(
    weights: MemoryWeights,
    queries: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    config: AtlasMAGConfig,
    forward: MemoryForward | None = None,
) -> tuple[MemoryWeights, torch.Tensor]:
    """Analytic gradients of the Omega-rule loss of each sequence,
    L_b = sum_i w_bi ||Memory_b(q'_bi) - v_bi||^2 (Atlas eq. for the Omega rule with gamma weights),
    with respect to every memory weight. Returns the gradients ([B, *shape]) and the losses [B].
    `forward` is `memory_forward(weights, queries, config, keep_activations=True)` when the caller has it already.
    """
    output, act = forward if forward is not None else memory_forward(weights, queries, config, keep_activations=True)
    residual = output - targets
    losses = (token_weights * residual.pow(2).sum(-1)).sum(-1)
    grad_output = 2.0 * token_weights[..., None] * residual

    grad_output_scale = (grad_output * act.affine).sum((1, 2))
    grad_affine = grad_output * weights.output_scale[:, None, None]
    grad_output_norm_weight = (grad_affine * act.up_normed).sum(1)
    grad_output_norm_bias = grad_affine.sum(1)
    grad_up = _layer_norm_backward(grad_affine * weights.output_norm_weight[:, None], act.up_normed, act.up_rstd)
    grad_proj_up = torch.matmul(grad_up.transpose(1, 2), act.memory_output)
    grad_hidden = torch.matmul(grad_up, weights.proj_up)

    grad_mlp = []
    for i in reversed(range(len(weights.mlp))):
        if i < config.memory_depth:
            grad_hidden = grad_hidden * _gelu_derivative(act.pre_activations[i])
        grad_mlp.append(torch.matmul(grad_hidden.transpose(1, 2), act.layer_inputs[i + 1]))
        grad_hidden = torch.matmul(grad_hidden, weights.mlp[i])

    grad_poly_compress = torch.matmul(grad_hidden.transpose(1, 2), act.layer_inputs[0])
    grad_compress_input = torch.matmul(grad_hidden, weights.poly_compress)
    grad_poly_norm_weight = (grad_compress_input * act.features_normed).sum(1)
    grad_poly_norm_bias = grad_compress_input.sum(1)
    grad_features = _layer_norm_backward(
        grad_compress_input * weights.poly_norm_weight[:, None], act.features_normed, act.features_rstd
    )
    block_sizes = [block.shape[-1] for block in act.raw_blocks]
    grad_blocks = list(grad_features.split(block_sizes, dim=-1))
    grad_coefficients = None
    if weights.feature_coefficients is not None:
        coefficients = weights.feature_coefficients
        grad_coefficients = torch.stack(
            [(g * raw).sum((1, 2)) for g, raw in zip(grad_blocks, act.raw_blocks, strict=True)], dim=1
        )
        grad_blocks = [g * coefficients[:, i, None, None] for i, g in enumerate(grad_blocks)]
    grad_projected = polynomial_features_backward(act.raw_blocks, grad_blocks)
    grads = MemoryWeights(
        proj_down=torch.matmul(grad_projected.transpose(1, 2), act.queries),
        feature_coefficients=grad_coefficients,
        poly_norm_weight=grad_poly_norm_weight,
        poly_norm_bias=grad_poly_norm_bias,
        poly_compress=grad_poly_compress,
        mlp=tuple(reversed(grad_mlp)),
        proj_up=grad_proj_up,
        output_norm_weight=grad_output_norm_weight,
        output_norm_bias=grad_output_norm_bias,
        output_scale=grad_output_scale,
    )
    return grads, losses


def newton_schulz_flops(rows: int, cols: int, steps: int, evaluation: str) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of `steps` Newton–Schulz steps of one [rows, cols] matrix evaluated
    "direct" or in "gram" space, with m = min(rows, cols) and n = max(rows, cols) (the iteration runs on the wide
    orientation). Direct: per step X X^T (2m²n), A² (2m³) and (bA + cA²) X (2m²n). Gram: G = X0 X0^T and the final
    P X0 (2m²n each), A² every step, Q A Q (two m³ products) every step but the last and Q P every step but the
    first: 4 * steps - 3 products of m x m matrices."""
    m, n = min(rows, cols), max(rows, cols)
    if evaluation == "direct":
        return steps * (4 * m * m * n + 2 * m**3)
    if evaluation == "gram":
        return 4 * m * m * n + (4 * steps - 3) * 2 * m**3
    raise ValueError(f"evaluation must be 'direct' or 'gram', got {evaluation!r}")


def newton_schulz_choice(rows: int, cols: int, steps: int, evaluation: str = "auto") -> str:
    """The evaluation `newton_schulz` runs for a [rows, cols] matrix: `evaluation` itself if forced, else the
    cheaper one, counting `newton_schulz_flops` and `NS_KERNEL_COST_FLOPS` per kernel (direct: 3 per step; Gram:
    5 per step less one); a tie goes to "direct". Without the kernel cost that would be "gram" exactly when the
    long side exceeds 1.5 times the short one (for 2 steps or more); with it, small matrices stay direct."""
    if evaluation not in NS_EVALUATIONS:
        raise ValueError(f"evaluation must be one of {NS_EVALUATIONS}, got {evaluation!r}")
    if evaluation != "auto":
        return evaluation
    gram = newton_schulz_flops(rows, cols, steps, "gram") + (5 * steps - 1) * NS_KERNEL_COST_FLOPS
    direct = newton_schulz_flops(rows, cols, steps, "direct") + 3 * steps * NS_KERNEL_COST_FLOPS
    return "gram" if gram < direct else "direct"


def newton_schulz(matrix: torch.Tensor, steps: int, evaluation: str = "auto") -> torch.Tensor:
    """Batched Newton–Schulz orthogonalisation of [B, m, n] matrices, iterated on the smaller Gram side
    (X X^T and X^T X give the same polynomial in X). `evaluation` ("auto", "direct" or "gram", see
    `newton_schulz_choice`) only changes how the same function is computed."""
    transposed = matrix.shape[-2] > matrix.shape[-1]
    left, right = _newton_schulz_factors(matrix.transpose(-1, -2) if transposed else matrix, steps, evaluation)
    x = right if left is None else torch.matmul(left, right)
    return x.transpose(-1, -2) if transposed else x


def _newton_schulz_factors(x: torch.Tensor, steps: int, evaluation: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Newton–Schulz of wide [B, m, n] matrices (m <= n) as `left @ right` (`left` None: `right` itself), so that
    a caller can fold scales into the m x m `left` and its own terms into that last product. The Gram form's
    `right` is `x` as given: its normalisation goes into the m x m Gram matrix and `left` (no pass over x; fp32
    holds x x^T for any x whose entries stay below ~1e18)."""
    norms = _per_sequence(_sequence_norm(x) + NS_EPS, x)
    if newton_schulz_choice(x.shape[-2], x.shape[-1], steps, evaluation) == "gram":
        gram = torch.matmul(x, x.transpose(-1, -2)) / norms.square()
        return _newton_schulz_gram(gram, steps) / norms, x
    return None, _newton_schulz_direct(x / norms, steps)


def _newton_schulz_direct(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration X <- aX + (bA + cA²)X, A = X X^T, on normalised wide [B, m, n] matrices."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.matmul(x, x.transpose(-1, -2))
        # Fused forms of `b * gram + c * gram @ gram` and `a * x + poly @ x`.
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def _newton_schulz_gram(gram: torch.Tensor, steps: int) -> torch.Tensor:
    """`_newton_schulz_direct` evaluated on m x m matrices: every iterate is X_k = P_k X_0 with P_k a polynomial
    in G = X_0 X_0^T (`gram`, of the normalised X_0), so A_k = X_k X_k^T and Q_k = aI + bA_k + cA_k² are
    polynomials in G too (they commute), and A_{k+1} = Q_k A_k Q_k, P_{k+1} = Q_k P_k. Returns P_K (X_K = P_K X_0).
    Fewer FLOPs when n is well above m (see `newton_schulz_flops`); differentiable like the direct form."""
    a, b, c = NS_COEFFICIENTS
    scaled_identity = a * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    product = None
    for step in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) + scaled_identity
        product = poly if product is None else torch.matmul(poly, product)
        if step < steps - 1:
            # Symmetric in exact arithmetic and left to drift: averaging it with its transpose cost more time than
            # the ~15% of error it saved, and only on low-rank inputs.
            gram = torch.matmul(poly, torch.matmul(gram, poly))
    return product


def newton_schulz_steps_grouped(
    weights: list[torch.Tensor],
    matrices: list[torch.Tensor],
    rates: list[torch.Tensor],
    decay: float | torch.Tensor,
    steps: int,
    evaluation: str = "auto",
) -> list[torch.Tensor]:
    """`decay * weight - rate * newton_schulz(matrix)` for each [B, m, n] weight and matrix, with a rate per
    sequence [B] and a decay that is a constant or per sequence [B]: one batched Newton–Schulz per shape of the
    smaller Gram side (each slice is normalised by its own norm, so batching changes nothing but the number of
    calls: in the published model proj_down and proj_up^T are both [64, 512]). The rate and a constant decay ride
    on the last product (one kernel: no separate pass over the weights for the normalisation, the step or the
    decay)."""

    def oriented(matrix: torch.Tensor) -> torch.Tensor:
        return matrix.transpose(-1, -2) if matrix.shape[-2] > matrix.shape[-1] else matrix

    groups: dict[tuple[int, ...], list[int]] = {}
    for index, matrix in enumerate(matrices):
        groups.setdefault(tuple(oriented(matrix).shape[1:]), []).append(index)
    results = list(weights)
    for indices in groups.values():
        moments = _stacked([oriented(matrices[index]) for index in indices])
        weight = _stacked([oriented(weights[index]) for index in indices])
        scale = _per_sequence(_stacked([rates[index] for index in indices]), weight)
        left, right = _newton_schulz_factors(moments, steps, evaluation)
        beta = decay
        if isinstance(decay, torch.Tensor):
            # baddbmm's beta is one number: a decay per sequence scales the weight first.
            weight = weight * _per_sequence(decay.repeat(len(indices)), weight)
            beta = 1.0
        if left is None:
            updated = torch.addcmul(beta * weight, right, scale, value=-1)
        else:
            updated = torch.baddbmm(weight, left * scale, right, beta=beta, alpha=-1)
        for index, part in zip(indices, updated.split(matrices[indices[0]].shape[0]), strict=True):
            results[index] = part if oriented(matrices[index]) is matrices[index] else part.transpose(-1, -2)
    return results


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def gradient_norms(grads: MemoryWeights) -> torch.Tensor:
    """Each sequence's norm of every weight's gradient [B, n_weights]."""
    return torch.stack([_sequence_norm(grad) for grad in grads.tensors()], dim=1)


class StepRates(NamedTuple):
    """The inner optimiser's rates per sequence and position (`ttl_data_dependent_rates`): learning rate eta,
    momentum theta and decay alpha, each [B, T] (or [B] once `at` an update)."""

    lr: torch.Tensor
    momentum: torch.Tensor
    decay: torch.Tensor

    def at(self, column: int, rows: torch.Tensor | None) -> StepRates:
        """The rates of the update after `column`, for the batch rows `rows` (None: all): those of that token."""
        return StepRates(*(rate[:, column] if rows is None else rate[rows, column] for rate in self))


def omega_update(
    weights: MemoryWeights,
    grads: MemoryWeights,
    momentum: MemoryWeights | None,
    config: AtlasMAGConfig,
    rates: StepRates | None = None,
) -> tuple[MemoryWeights, MemoryWeights, torch.Tensor]:
    """One optimiser step of the memory: momentum `S = theta S + g`, then `W = alpha W - eta * update(S)`.
    Muon orthogonalises matrices with Newton–Schulz and normalises vectors and the scalar by their norm; plain
    descent (OmegaNet) uses S as is. eta, theta and alpha are the config's constants, or per sequence `rates`
    ([B] each). Returns the new weights and momentum and the gradient norms [B, n_weights] (for the adaptive
    learning rate and for diagnostics)."""
    # Elementwise work on every weight at once goes through `torch._foreach_*` (one dispatch, one kernel launch
    # per list instead of one per weight); norms are per sequence, so they stay per weight.
    grad_list = grads.tensors()
    grad_norms = gradient_norms(grads)
    lr, theta, decay = (config.ttl_lr, config.ttl_momentum, config.ttl_decay) if rates is None else rates

    def per_weight(rate: float | torch.Tensor) -> float | torch.Tensor:
        # A constant, or a rate per sequence against the [B, n_weights] norms.
        return rate if rates is None else rate[:, None]

    if momentum is None:
        moments = grad_list
    elif rates is None:
        moments = torch._foreach_add(grad_list, momentum.tensors(), alpha=theta)
    else:
        moment_list = momentum.tensors()
        moments = torch._foreach_addcmul(grad_list, moment_list, [_per_sequence(theta, m) for m in moment_list])
    if config.ttl_adaptive_lr:
        # eta / (1 + ||g||), the reference rule. Muon's directions are bounded, so that bounds its steps; plain
        # descent applies S itself, and a gradient that shrinks after large ones leaves S far longer than g, which
        # made the memory diverge on long inputs. Its divisor is therefore at least (1 - theta) ||S||: the same
        # steps whenever S is no longer than a steady stream of such gradients would make it, and never longer
        # than eta / (1 - theta).
        divisors = 1.0 + grad_norms
        if config.memory_optimizer == "gd":
            moment_norms = torch.stack([_sequence_norm(moment) for moment in moments], dim=1)
            divisors = torch.maximum(divisors, per_weight(1.0 - theta) * moment_norms)
        learning_rates = list((per_weight(lr) / divisors).unbind(1))
    elif rates is None:
        learning_rates = [torch.full_like(grad_norms[:, 0], lr)] * len(grad_list)
    else:
        learning_rates = [lr] * len(grad_list)
    weight_list = weights.tensors()
    updated = list(weight_list)
    matrix_indices = []
    if config.memory_optimizer != "gd":
        matrix_indices = [index for index, moment in enumerate(moments) if moment.dim() == 3]
        orthogonalised = newton_schulz_steps_grouped(
            [weight_list[index] for index in matrix_indices],
            [moments[index] for index in matrix_indices],
            [learning_rates[index] for index in matrix_indices],
            decay,
            config.ttl_ns_steps,
            config.ttl_ns_evaluation,
        )
        for index, weight in zip(matrix_indices, orthogonalised, strict=True):
            updated[index] = weight
        for index, moment in enumerate(moments):
            if moment.dim() != 3:
                # A vector or the scalar moves along S / ||S||: the division goes into its learning rate.
                learning_rates[index] = learning_rates[index] / _sequence_norm(moment).clamp(min=NORM_FLOOR)
    rest = [index for index in range(len(weight_list)) if index not in matrix_indices]
    if rest:
        kept = [weight_list[index] for index in rest]
        if rates is None:
            decayed = torch._foreach_mul(kept, decay)
        else:
            decayed = torch._foreach_mul(kept, [_per_sequence(decay, weight) for weight in kept])
        scales = [_per_sequence(learning_rates[index], moments[index]) for index in rest]
        stepped = torch._foreach_addcmul(decayed, [moments[index] for index in rest], scales, value=-1)
        for index, weight in zip(rest, stepped, strict=True):
            updated[index] = weight
    return weights.with_tensors(updated), grads.with_tensors(moments), grad_norms


# One TTL update: the column (position in the call) after which it happens, and the batch rows that learn there
# (None: every row).
TTLUpdate = tuple[int, torch.Tensor | None]


def ttl_schedule(token_mask: torch.Tensor, positions: torch.Tensor, chunk_size: int) -> list[TTLUpdate]:
    """When each sequence learns during a call: after every real token whose own position is `kC - 1`.

    Chunks are counted in each sequence's own positions, so a left-padded sequence learns exactly as it would
    alone, and every token reads the memory after `floor(position / C)` updates. Computed once per call for all
    layers, with one device-to-host copy.
    """
    events = (token_mask & ((positions + 1) % chunk_size == 0)).cpu()
    schedule = []
    for column in events.any(0).nonzero().flatten().tolist():
        rows = events[:, column].nonzero().flatten()
        schedule.append((column, None if rows.numel() == events.shape[0] else rows.to(token_mask.device)))
    return schedule


def update_counts(schedule: list[TTLUpdate], batch_size: int, device: torch.device) -> torch.Tensor:
    """How many updates of `schedule` each sequence makes [B], at least 1 (a divisor for mean gradient norms)."""
    counts = torch.zeros(batch_size, device=device)
    for _, rows in schedule:
        if rows is None:
            counts += 1
        else:
            counts[rows] += 1
    return counts.clamp(min=1)


def unpadded_ttl_schedule(first_position: int, length: int, chunk_size: int) -> list[TTLUpdate]:
    """`ttl_schedule` when no sequence has ever held padding: every row is at `first_position`, so the schedule
    is known on the host (no device sync, nothing data-dependent for `torch.compile`)."""
    return [(column, None) for column in range(length) if (first_position + column + 1) % chunk_size == 0]
