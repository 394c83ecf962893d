"""Atlas-MAG's tensor functions: attention over a sliding window, the Q-K projection, the polynomial memory with
its analytic gradients, Newton–Schulz and the Omega-rule update, and the test-time-learning schedule.

Pure functions of tensors (and the config's sizes): no modules, no cache. Each multi-token function sits next
to its one-token (decoding) partner. This file is copied next to published weights with its siblings: it imports
only `torch` and `configuration_atlas.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache, wraps
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from .configuration_atlas import AtlasMAGConfig

# Newton–Schulz quintic coefficients (Muon; reference doc "Test-time learning").
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
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


def append_history(past: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    return new if past is None else torch.cat([past, new], dim=dim)


def keep_last(tensor: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    """The last `keep` entries along `dim`, copied so the cache does not pin the longer tensor's storage (and
    holds exactly the same bytes however it was built)."""
    if tensor.shape[dim] <= keep:
        return tensor
    kept = tensor.narrow(dim, tensor.shape[dim] - keep, keep)
    # Copied into a new tensor rather than `clone()`d: inductor returns the clone of a slice as a view of the whole
    # buffer, so a compiled prefill's cache held every position of the prompt.
    return torch.empty_like(kept).copy_(kept)


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


MemoryState = dict[str, torch.Tensor]


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
    state: MemoryState, queries: torch.Tensor, config: AtlasMAGConfig, keep_activations: bool = False
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Memory(z) with per-sequence weights (reference doc, "Memory(z)").

    `state` maps parameter names to [B, *shape] fp32 tensors; `queries` is [B, N, hidden] fp32.
    Returns the [B, N, hidden] output and, if asked, what the analytic backward needs.
    """
    eps = config.layer_norm_eps
    projected = _bmm_t(queries, state["proj_down.weight"])
    raw_blocks = monomial_blocks(projected, config.poly_degree)
    if config.feature_map == "taylor":
        coefficients = state["feature_coefficients"]
        blocks = [block * coefficients[:, i, None, None] for i, block in enumerate(raw_blocks)]
    else:
        blocks = raw_blocks
    features = torch.cat(blocks, dim=-1)
    features_normed, features_rstd = _layer_norm(features, eps)
    compress_input = features_normed * state["poly_norm.weight"][:, None] + state["poly_norm.bias"][:, None]
    layer_inputs = [compress_input]
    pre_activations = []
    hidden = _bmm_t(compress_input, state["poly_compress.weight"])
    for i in range(config.memory_depth + 1):
        layer_inputs.append(hidden)
        pre = _bmm_t(hidden, state[f"mlp.{i}.weight"])
        pre_activations.append(pre)
        hidden = F.gelu(pre) if i < config.memory_depth else pre
    up = _bmm_t(hidden, state["proj_up.weight"])
    up_normed, up_rstd = _layer_norm(up, eps)
    affine = up_normed * state["output_norm.weight"][:, None] + state["output_norm.bias"][:, None]
    output = state["output_scale"][:, None, None] * affine
    if not keep_activations:
        return output, None
    activations = {
        "queries": queries,
        "projected": projected,
        "raw_blocks": raw_blocks,
        "features_normed": features_normed,
        "features_rstd": features_rstd,
        "layer_inputs": layer_inputs,
        "pre_activations": pre_activations,
        "memory_output": hidden,
        "up_normed": up_normed,
        "up_rstd": up_rstd,
        "affine": affine,
    }
    return output, activations


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
    state: MemoryState,
    queries: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    config: AtlasMAGConfig,
    forward: tuple[torch.Tensor, dict[str, Any]] | None = None,
) -> tuple[MemoryState, torch.Tensor]:
    """Analytic gradients of the Omega-rule loss of each sequence,
    L_b = sum_i w_bi ||Memory_b(q'_bi) - v_bi||^2 (Atlas eq. for the Omega rule with gamma weights),
    with respect to every memory parameter. Returns the gradients ([B, *shape]) and the losses [B].
    `forward` is `memory_forward(state, queries, config, keep_activations=True)` when the caller has it already.
    """
    output, act = forward if forward is not None else memory_forward(state, queries, config, keep_activations=True)
    residual = output - targets
    losses = (token_weights * residual.pow(2).sum(-1)).sum(-1)
    grad_output = 2.0 * token_weights[..., None] * residual
    grads: MemoryState = {}

    grads["output_scale"] = (grad_output * act["affine"]).sum((1, 2))
    grad_affine = grad_output * state["output_scale"][:, None, None]
    grads["output_norm.weight"] = (grad_affine * act["up_normed"]).sum(1)
    grads["output_norm.bias"] = grad_affine.sum(1)
    grad_up = _layer_norm_backward(
        grad_affine * state["output_norm.weight"][:, None], act["up_normed"], act["up_rstd"]
    )
    grads["proj_up.weight"] = torch.matmul(grad_up.transpose(1, 2), act["memory_output"])
    grad_hidden = torch.matmul(grad_up, state["proj_up.weight"])

    for i in reversed(range(config.memory_depth + 1)):
        if i < config.memory_depth:
            grad_hidden = grad_hidden * _gelu_derivative(act["pre_activations"][i])
        grads[f"mlp.{i}.weight"] = torch.matmul(grad_hidden.transpose(1, 2), act["layer_inputs"][i + 1])
        grad_hidden = torch.matmul(grad_hidden, state[f"mlp.{i}.weight"])

    grads["poly_compress.weight"] = torch.matmul(grad_hidden.transpose(1, 2), act["layer_inputs"][0])
    grad_compress_input = torch.matmul(grad_hidden, state["poly_compress.weight"])
    grads["poly_norm.weight"] = (grad_compress_input * act["features_normed"]).sum(1)
    grads["poly_norm.bias"] = grad_compress_input.sum(1)
    grad_features = _layer_norm_backward(
        grad_compress_input * state["poly_norm.weight"][:, None], act["features_normed"], act["features_rstd"]
    )
    block_sizes = [block.shape[-1] for block in act["raw_blocks"]]
    grad_blocks = list(grad_features.split(block_sizes, dim=-1))
    if config.feature_map == "taylor":
        coefficients = state["feature_coefficients"]
        grads["feature_coefficients"] = torch.stack(
            [(g * raw).sum((1, 2)) for g, raw in zip(grad_blocks, act["raw_blocks"], strict=True)], dim=1
        )
        grad_blocks = [g * coefficients[:, i, None, None] for i, g in enumerate(grad_blocks)]
    grad_projected = polynomial_features_backward(act["raw_blocks"], grad_blocks)
    grads["proj_down.weight"] = torch.matmul(grad_projected.transpose(1, 2), act["queries"])
    return grads, losses


def newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Batched Newton–Schulz orthogonalisation of [B, m, n] matrices, iterated on the smaller Gram side
    (X X^T and X^T X give the same polynomial in X)."""
    transposed = matrix.shape[-2] > matrix.shape[-1]
    x = matrix.transpose(-1, -2) if transposed else matrix
    x = x / (_sequence_norm(x) + NS_EPS)[:, None, None]
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.matmul(x, x.transpose(-1, -2))
        # Fused forms of `b * gram + c * gram @ gram` and `a * x + poly @ x`.
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.transpose(-1, -2) if transposed else x


def newton_schulz_grouped(matrices: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """`newton_schulz` of several [B, m, n] matrices, one batched call per shape of their smaller Gram side
    (each slice is normalised by its own norm, so batching changes nothing but the number of calls: in the
    published model proj_down, proj_up^T and the memory MLP's weight are all [64, 512])."""
    oriented = {
        name: matrix.transpose(-1, -2) if matrix.shape[-2] > matrix.shape[-1] else matrix
        for name, matrix in matrices.items()
    }
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, matrix in oriented.items():
        groups.setdefault(tuple(matrix.shape[1:]), []).append(name)
    results = {}
    for names in groups.values():
        stacked = oriented[names[0]] if len(names) == 1 else torch.cat([oriented[name] for name in names])
        parts = newton_schulz(stacked, steps).split(oriented[names[0]].shape[0])
        for name, part in zip(names, parts, strict=True):
            results[name] = part if oriented[name] is matrices[name] else part.transpose(-1, -2)
    return results


def omega_update_steps(
    grads: MemoryState, momentum: MemoryState | None, config: AtlasMAGConfig
) -> tuple[MemoryState, MemoryState, torch.Tensor]:
    """One optimiser step of the memory: momentum `S = theta S + g`, then the step `eta * update(S)` that
    `W = alpha W - step` applies. Muon orthogonalises matrices with Newton–Schulz and normalises vectors and the
    scalar by their norm; plain descent (OmegaNet) uses S as is. Returns steps, new momentum and the gradient
    norms [B, n_params] (for the adaptive learning rate and for diagnostics)."""
    # Elementwise work on every parameter at once goes through `torch._foreach_*` (one dispatch, one kernel
    # launch per list instead of one per parameter); norms are per sequence, so they stay per parameter.
    names = list(grads)
    grad_list = [grads[name] for name in names]
    grad_norms = torch.stack([_sequence_norm(grad) for grad in grad_list], dim=1)
    if momentum is None:
        moments = grad_list
    else:
        decayed_momentum = torch._foreach_mul([momentum[name] for name in names], config.ttl_momentum)
        moments = torch._foreach_add(decayed_momentum, grad_list)
    new_momentum = dict(zip(names, moments, strict=True))
    if config.ttl_adaptive_lr:
        # eta / (1 + ||g||), the reference rule. Muon's directions are bounded, so that bounds its steps; plain
        # descent applies S itself, and a gradient that shrinks after large ones leaves S far longer than g, which
        # made the memory diverge on long inputs. Its divisor is therefore at least (1 - theta) ||S||: the same
        # steps whenever S is no longer than a steady stream of such gradients would make it, and never longer
        # than eta / (1 - theta).
        divisors = 1.0 + grad_norms
        if config.memory_optimizer == "gd":
            moment_norms = torch.stack([_sequence_norm(moment) for moment in moments], dim=1)
            divisors = torch.maximum(divisors, (1.0 - config.ttl_momentum) * moment_norms)
        learning_rates = list((config.ttl_lr / divisors).unbind(1))
    else:
        learning_rates = [torch.full_like(grad_norms[:, 0], config.ttl_lr)] * len(names)
    if config.memory_optimizer == "gd":
        directions = new_momentum
    else:
        matrices = {name: moment for name, moment in new_momentum.items() if moment.dim() == 3}
        directions = newton_schulz_grouped(matrices, config.ttl_ns_steps)
        for index, name in enumerate(names):
            if name not in directions:
                # A vector or the scalar moves along S / ||S||: the division goes into its learning rate.
                directions[name] = new_momentum[name]
                learning_rates[index] = learning_rates[index] / _sequence_norm(new_momentum[name]).clamp(min=NORM_FLOOR)
    direction_list = [directions[name] for name in names]
    scales = [_per_sequence(rate, direction) for rate, direction in zip(learning_rates, direction_list, strict=True)]
    steps = dict(zip(names, torch._foreach_mul(direction_list, scales), strict=True))
    return steps, new_momentum, grad_norms


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
