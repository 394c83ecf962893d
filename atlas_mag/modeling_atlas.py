"""Atlas-MAG for Hugging Face Transformers.

Behrouz et al., "Atlas: Learning to Optimally Memorize the Context at Test Time" (arXiv 2505.23735). Every block
gates sliding-window attention with a deep polynomial memory whose weights are learned during the forward pass by
the Omega rule (gradient descent on a window of past tokens) with Muon (Newton–Schulz) updates.

Unlike the published implementation, test-time learning (TTL) here
- runs whenever the config or the call says so: `eval()`, `torch.no_grad()`, `torch.inference_mode()`,
  `generate` and pipelines included;
- never writes into the model's parameters: they are the *initial* memory of every sequence, and each sequence
  owns its learned memory and momentum, carried from call to call in the `AtlasMAGCache`;
- is causal: a token reads the memory as it stood after the previous chunk of `ttl_chunk_size` positions;
- uses analytic gradients of the memory MLP, so it needs no autograd and works under `inference_mode`.

This file is copied next to published weights: it imports only `transformers`, `torch` and its sibling
`configuration_atlas.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from functools import lru_cache, wraps
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

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


# ---------------------------------------------------------------------------------------------------------------
# Small layers
# ---------------------------------------------------------------------------------------------------------------


# The name under which the installed Transformers passes the cache to `forward` and returns it in outputs:
# `cache` from 5.24 on, `past_key_values` before. Our forwards take both and return it under this one.
CACHE_FIELD = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else "past_key_values"

# Keyword arguments that `generate`, `Trainer` or pipelines pass and that mean nothing to Atlas-MAG; any other
# unknown keyword is an error (a renamed argument must never vanish into **kwargs).
IGNORED_FORWARD_ARGUMENTS = {
    # `generate` before 5.24 passes the new tokens' cache positions; the cache knows each sequence's positions.
    "cache_position": "positions come from the cache and the attention mask",
    # Generation and pipelines pass False; True is refused below (there are no attention weights to return).
    "output_attentions": "Atlas-MAG returns no attention weights",
}


@dataclass
class AtlasMAGModelOutput(BaseModelOutputWithPast):
    r"""
    ttl_gradient_norms (`torch.FloatTensor` of shape `(batch_size, num_layers)`):
        Per sequence and layer, the mean norm of the memory gradients of the test-time-learning updates made
        during the call (a training and serving diagnostic); 0 where a sequence made no update in the call.
    """

    ttl_gradient_norms: torch.FloatTensor | None = None


@dataclass
class AtlasMAGCausalLMOutput(CausalLMOutputWithPast):
    r"""
    ttl_gradient_norms (`torch.FloatTensor` of shape `(batch_size, num_layers)`):
        Per sequence and layer, the mean norm of the memory gradients of the call's test-time-learning updates; 0
        where a sequence made no update in the call.
    """

    ttl_gradient_norms: torch.FloatTensor | None = None


if CACHE_FIELD != "cache":
    # Releases before 5.24: `output.cache` reads the same field as `output.past_key_values`, so code written for
    # the new name runs on every allowed release.
    for _output_class in (AtlasMAGModelOutput, AtlasMAGCausalLMOutput):
        _output_class.cache = property(lambda self: self.past_key_values)


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either name (`cache` since Transformers 5.24, `past_key_values` before)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
    return past_key_values


def reject_unused_arguments(method: str, kwargs: dict[str, Any]) -> None:
    """Raise on keyword arguments `forward` would otherwise drop silently (see `IGNORED_FORWARD_ARGUMENTS`)."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True: Atlas-MAG has no attention weights to return (its attention is computed "
            "block by block over a sliding window and gated by the memory)."
        )
    unknown = sorted(set(kwargs) - set(IGNORED_FORWARD_ARGUMENTS))
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")


class AtlasMAGRMSNorm(nn.Module):
    """RMSNorm computed in fp32, as in the reference."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, fused (one kernel instead of five).
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, self.weight.float(), self.eps)
        return normed.to(hidden_states.dtype)


class AtlasMAGMLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (reference `w3(silu(w1 u) * w2 u)`)."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


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


def _append_history(past: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    return new if past is None else torch.cat([past, new], dim=dim)


def _keep_last(tensor: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------------------
# The memory: a function of per-sequence weights, with analytic gradients
# ---------------------------------------------------------------------------------------------------------------

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


class AtlasMAGMemory(nn.Module):
    """Deep polynomial memory. Its parameters are the initial memory of every sequence; test-time learning
    updates per-sequence copies (`memory_forward` / `memory_loss_gradients` above), never these tensors."""

    def __init__(self, config: AtlasMAGConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.proj_down = nn.Linear(config.hidden_size, config.memory_key_dim, bias=False)
        if config.feature_map == "taylor":
            self.feature_coefficients = nn.Parameter(self.taylor_coefficients(config.poly_degree))
        self.poly_norm = nn.LayerNorm(config.feature_size, eps=config.layer_norm_eps)
        self.poly_compress = nn.Linear(config.feature_size, config.poly_rank, bias=False)
        widths = [config.poly_rank] + [config.memory_mlp_hidden_size] * config.memory_depth + [config.memory_key_dim]
        self.mlp = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], bias=False) for i in range(len(widths) - 1))
        self.proj_up = nn.Linear(config.memory_key_dim, config.hidden_size, bias=False)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_scale = nn.Parameter(torch.ones(()))

    @staticmethod
    def taylor_coefficients(degree: int) -> torch.Tensor:
        return torch.tensor([1.0 / math.factorial(d) for d in range(1, degree + 1)])

    def initial_state(self, batch_size: int) -> MemoryState:
        """The parameters as fp32 [B, *shape] views (no copy until a sequence's first update)."""
        return {
            name: param.float().unsqueeze(0).expand(batch_size, *param.shape)
            for name, param in self.named_parameters()
        }

    def read_and_learn(
        self,
        queries: torch.Tensor,
        values: torch.Tensor,
        token_weights: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
        schedule: list[TTLUpdate],
    ) -> tuple[torch.Tensor, MemoryState, MemoryState | None, dict[str, torch.Tensor], torch.Tensor | None]:
        """Read the memory at every new position and learn at every update of `schedule` (see `ttl_schedule`).

        The update after column `c` fits the last `omega_window` positions up to and including `c`; tokens after
        it read the updated memory. Returns the output [B, T, hidden], the memory and momentum after the call, the
        Omega-window history and each sequence's summed gradient norm over the call's updates ([B], or None).
        """
        config = self.config
        memory = state.memory if state.memory is not None else self.initial_state(queries.shape[0])
        momentum = state.momentum
        window_queries = _append_history(state.omega_queries, queries, 1)
        window_values = _append_history(state.omega_values, values, 1)
        window_weights = _append_history(state.omega_weights, token_weights, 1)
        window_valid = _append_history(state.omega_valid, token_mask, 1)
        past = window_queries.shape[1] - queries.shape[1]

        outputs = []
        gradient_norms = []
        start = 0
        for column, rows in schedule:
            window = slice(max(0, past + column + 1 - config.omega_window), past + column + 1)
            # When every row learns from exactly the positions it has just read (omega_window == ttl_chunk_size
            # in a prefill), the read's forward pass is also the update's.
            reuse = rows is None and window.start == past + start
            read = memory_forward(memory, queries[:, start : column + 1], config, keep_activations=reuse)
            outputs.append(read[0])
            start = column + 1
            selection = (slice(None), window) if rows is None else (rows, window)
            memory, momentum, norms = self._learn(
                memory,
                momentum,
                rows,
                window_queries[selection],
                window_values[selection],
                window_weights[selection],
                window_valid[selection],
                read if reuse else None,
            )
            gradient_norms.append(norms)
        if start < queries.shape[1]:
            outputs.append(memory_forward(memory, queries[:, start:], config)[0])
        keep = config.omega_window - 1
        history = {
            "omega_queries": _keep_last(window_queries, keep, 1),
            "omega_values": _keep_last(window_values, keep, 1),
            "omega_weights": _keep_last(window_weights, keep, 1),
            "omega_valid": _keep_last(window_valid, keep, 1),
        }
        norms = torch.stack(gradient_norms).sum(0) if gradient_norms else None
        return torch.cat(outputs, dim=1), memory, momentum, history, norms

    def read_and_learn_one_token(
        self,
        queries: torch.Tensor,
        values: torch.Tensor,
        token_weights: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
        schedule: list[TTLUpdate],
    ) -> tuple[torch.Tensor, MemoryState, MemoryState | None, torch.Tensor | None]:
        """`read_and_learn` for one new position when the Omega history is a full ring buffer (decoding): only an
        update (every `ttl_chunk_size` tokens) reads the history, joined to the new position. Returns the output,
        the memory and momentum after the step and the update's gradient norms (or None)."""
        memory = state.memory if state.memory is not None else self.initial_state(queries.shape[0])
        output = memory_forward(memory, queries, self.config)[0]
        if not schedule:
            return output, memory, state.momentum, None
        ((_, rows),) = schedule
        # The Omega loss sums over the window's positions, so the ring's order does not matter.
        window = [
            torch.cat([history, new], dim=1)
            for history, new in (
                (state.omega_queries, queries),
                (state.omega_values, values),
                (state.omega_weights, token_weights),
                (state.omega_valid, token_mask),
            )
        ]
        if rows is not None:
            window = [tensor[rows] for tensor in window]
        memory, momentum, norms = self._learn(memory, state.momentum, rows, *window)
        return output, memory, momentum, norms

    def _learn(
        self,
        memory: MemoryState,
        momentum: MemoryState | None,
        rows: torch.Tensor | None,
        queries: torch.Tensor,
        values: torch.Tensor,
        weights: torch.Tensor,
        valid: torch.Tensor,
        forward: tuple[torch.Tensor, dict[str, Any]] | None = None,
    ) -> tuple[MemoryState, MemoryState, torch.Tensor]:
        """One Omega-rule step for the sequences in `rows` (None: all of them); the others keep their memory.
        Returns the memory, the momentum and each sequence's mean gradient norm [B] (0 for rows that did not
        learn)."""
        config = self.config
        every_row = rows is None
        selected = memory if every_row else {name: value[rows] for name, value in memory.items()}
        selected_momentum = None
        if momentum is not None:
            selected_momentum = momentum if every_row else {name: value[rows] for name, value in momentum.items()}
        # The loss is a mean over the real tokens of each sequence's window.
        token_weights = weights / valid.sum(1, keepdim=True).clamp(min=1)
        through_updates = config.ttl_backprop_through_updates and torch.is_grad_enabled()
        with torch.set_grad_enabled(through_updates):
            inputs = (queries, values, token_weights)
            learn_state = selected
            if not through_updates:
                inputs = tuple(t.detach() for t in inputs)
                learn_state = {name: value.detach() for name, value in selected.items()}
            grads, _ = memory_loss_gradients(learn_state, *inputs, config, forward)
            steps, new_momentum, grad_norms = omega_update_steps(grads, selected_momentum, config)
        names = list(selected)
        decayed = torch._foreach_mul([selected[name] for name in names], config.ttl_decay)
        updated = dict(zip(names, torch._foreach_sub(decayed, [steps[name] for name in names]), strict=True))
        row_norms = grad_norms.float().mean(1)
        if every_row:
            return updated, new_momentum, row_norms
        if momentum is None:
            momentum = {name: torch.zeros_like(value) for name, value in memory.items()}
        merged_memory = {name: memory[name].index_copy(0, rows, updated[name]) for name in memory}
        merged_momentum = {name: momentum[name].index_copy(0, rows, new_momentum[name]) for name in momentum}
        batch_norms = row_norms.new_zeros(next(iter(memory.values())).shape[0]).index_copy(0, rows, row_norms)
        return merged_memory, merged_momentum, batch_norms


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


# The histories a layer keeps, with their time dimension.
ATTENTION_HISTORY = {"attn_keys": 2, "attn_values": 2, "attn_valid": 1}
MEMORY_HISTORY = {
    "qk_keys": 1,
    "qk_weights": 1,
    "omega_queries": 1,
    "omega_values": 1,
    "omega_weights": 1,
    "omega_valid": 1,
}
# (buffer, time dimension, slot, value): an in-place write into a cached history.
HistoryWrite = tuple[torch.Tensor, int, int, torch.Tensor]


def _ring_write(buffer: torch.Tensor, dim: int, ring_steps: int, value: torch.Tensor) -> HistoryWrite:
    """Write `value` over the oldest entry of a full ring buffer that has taken `ring_steps` writes."""
    return buffer, dim, ring_steps % buffer.shape[dim], value


@dataclass
class AtlasMAGLayerState:
    """Everything one layer carries from one call to the next, per sequence (batch first). Bounded in size:
    at most `sliding_window - 1` keys/values, `omega_window` Q-K keys, `omega_window - 1` Omega positions, and
    one copy of the memory weights and momentum.

    Once a history is full, decoding uses it as a ring buffer: each new position is written over the oldest one
    in place (no copy of the window per token), and `*_ring_steps` count those writes since the history was
    last in time order. The writes are kept in `pending_writes` until the model commits the call."""

    attn_keys: torch.Tensor | None = None
    attn_values: torch.Tensor | None = None
    attn_valid: torch.Tensor | None = None
    qk_keys: torch.Tensor | None = None
    qk_weights: torch.Tensor | None = None
    omega_queries: torch.Tensor | None = None
    omega_values: torch.Tensor | None = None
    omega_weights: torch.Tensor | None = None
    omega_valid: torch.Tensor | None = None
    memory: MemoryState | None = None
    momentum: MemoryState | None = None
    attention_ring_steps: int = 0
    memory_ring_steps: int = 0
    pending_writes: tuple[HistoryWrite, ...] = ()

    def tensors(self) -> Iterator[torch.Tensor]:
        for name in (*ATTENTION_HISTORY, *MEMORY_HISTORY):
            if getattr(self, name) is not None:
                yield getattr(self, name)
        for weights in (self.memory, self.momentum):
            if weights is not None:
                yield from weights.values()

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> AtlasMAGLayerState:
        changes: dict[str, Any] = {
            name: function(getattr(self, name))
            for name in (*ATTENTION_HISTORY, *MEMORY_HISTORY)
            if getattr(self, name) is not None
        }
        for name in ("memory", "momentum"):
            if getattr(self, name) is not None:
                changes[name] = {key: function(tensor) for key, tensor in getattr(self, name).items()}
        return replace(self, **changes)

    def ring_ready(self, config: AtlasMAGConfig) -> tuple[bool, bool]:
        """Whether the attention and the memory histories are full, so that a one-token step can use them as
        ring buffers."""
        attention = self.attn_keys is not None and self.attn_keys.shape[2] == config.sliding_window - 1 > 0
        memory = (
            self.qk_keys is not None
            and self.qk_keys.shape[1] == config.omega_window
            and self.omega_queries is not None
            and self.omega_queries.shape[1] == config.omega_window - 1 > 0
        )
        return attention, memory

    def prepare(self, attention_ring: bool, memory_ring: bool) -> AtlasMAGLayerState:
        """The histories laid out for this step: for a part that decodes in place, ring buffers of its own
        (copied once, when decoding in place starts, so that no caller's tensor is ever written); for a part
        that takes the general path, time order."""
        changes: dict[str, Any] = {}
        for history, steps_field, ring in (
            (ATTENTION_HISTORY, "attention_ring_steps", attention_ring),
            (MEMORY_HISTORY, "memory_ring_steps", memory_ring),
        ):
            steps = getattr(self, steps_field)
            if ring and steps == 0:
                changes.update({name: getattr(self, name).clone() for name in history})
            elif not ring and steps:
                for name, dim in history.items():
                    tensor = getattr(self, name)
                    changes[name] = tensor.roll(-(steps % tensor.shape[dim]), dim)
                changes[steps_field] = 0
        return replace(self, **changes) if changes else self

    def commit(self) -> AtlasMAGLayerState:
        """Apply the pending in-place writes (the model calls this once the whole call has succeeded)."""
        if not self.pending_writes:
            return self
        for buffer, dim, slot, value in self.pending_writes:
            buffer.select(dim, slot).copy_(value)
        return replace(self, pending_writes=())


class AtlasMAGLayerCache:
    """One layer's slot in `AtlasMAGCache`. It has no keys/values API: a layer reads its whole
    `AtlasMAGLayerState` and stores the new one."""

    is_compileable = False
    is_croppable = False
    is_sliding = True
    supports_early_init = False

    def __init__(self) -> None:
        self.state: AtlasMAGLayerState | None = None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def _apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.state is not None:
            self.state = self.state.map(function)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("AtlasMAGCache cannot be cropped: the memory has already learned from those tokens.")

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    def get_max_length(self) -> int:
        return -1


# Config fields that fix the shapes and the meaning of a cached state: a model refuses a cache built for others.
CACHE_LAYOUT_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "sliding_window",
    "use_memory",
    "block_type",
    "memory_key_dim",
    "memory_mlp_hidden_size",
    "memory_depth",
    "feature_map",
    "poly_degree",
    "poly_rank",
    "omega_window",
    "ttl_chunk_size",
    "memory_optimizer",
)


class AtlasMAGCache(Cache):
    """Cache of an Atlas-MAG model: per layer, the attention window, the Q-K and Omega histories and each
    sequence's learned memory weights and momentum; plus, per sequence, how many real tokens it has seen (which
    fixes its RoPE positions and its TTL chunk boundaries). Its size does not grow with the tokens seen.

    Pass it back as `cache` (or `past_key_values`) to continue a sequence; a fresh cache (or none) starts every
    sequence from the model's memory parameters.
    """

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__(layers=[AtlasMAGLayerCache() for _ in range(config.num_hidden_layers)])
        self.layout = {name: getattr(config, name) for name in CACHE_LAYOUT_FIELDS}
        self.tokens_seen: torch.Tensor | None = None
        self.positions_seen = 0
        # True while no call has passed an attention mask: then every sequence has seen `positions_seen` tokens.
        self.unpadded = True

    def check_layout(self, config: AtlasMAGConfig) -> None:
        """Refuse a cache built for a model whose state has other shapes or another meaning."""
        differences = [
            f"{name}={self.layout[name]!r} (this model: {getattr(config, name)!r})"
            for name in CACHE_LAYOUT_FIELDS
            if self.layout[name] != getattr(config, name)
        ]
        if differences:
            raise ValueError(
                "This AtlasMAGCache was built for a model of another configuration: " + ", ".join(differences)
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of input positions (padding included) processed so far; `generate` slices its inputs by it."""
        return self.positions_seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    @property
    def is_initialized(self) -> bool:
        return self.tokens_seen is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.tokens_seen is None else self.tokens_seen.shape[0]

    def advance(self, token_mask: torch.Tensor, unpadded: bool) -> None:
        counts = token_mask.sum(1)
        self.tokens_seen = counts if self.tokens_seen is None else self.tokens_seen + counts
        self.positions_seen += token_mask.shape[1]
        self.unpadded = self.unpadded and unpadded

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.tokens_seen is not None:
            self.tokens_seen = self.tokens_seen.index_select(0, beam_idx.to(self.tokens_seen.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.tokens_seen is not None:
            self.tokens_seen = self.tokens_seen.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.tokens_seen is not None:
            self.tokens_seen = self.tokens_seen[indices]

    def reset(self) -> None:
        super().reset()
        self.tokens_seen = None
        self.positions_seen = 0
        self.unpadded = True

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (each storage counted once)."""
        storages = {}
        for layer in self.layers:
            if layer.state is not None:
                for tensor in layer.state.tensors():
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------------
# Blocks and models
# ---------------------------------------------------------------------------------------------------------------


class AtlasMAGAttention(nn.Module):
    """Q/K/V projections with per-head RMSNorm of q and k, RoPE, and causal sliding-window attention."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.q_norm = AtlasMAGRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = AtlasMAGRMSNorm(config.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def project(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k (normalised, rotated) and v, each [B, H, T, D]."""
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = apply_rotary(self.q_norm(heads(self.q_proj(hidden_states))), cos, sin)
        key = apply_rotary(self.k_norm(heads(self.k_proj(hidden_states))), cos, sin)
        return query, key, heads(self.v_proj(hidden_states))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keys = _append_history(state.attn_keys, key, 2)
        values = _append_history(state.attn_values, value, 2)
        valid = _append_history(state.attn_valid, token_mask, 1)
        attended = sliding_window_attention(query, keys, values, valid, self.sliding_window)
        batch, _, length, _ = attended.shape
        output = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        keep = self.sliding_window - 1
        history = {
            "attn_keys": _keep_last(keys, keep, 2),
            "attn_values": _keep_last(values, keep, 2),
            "attn_valid": _keep_last(valid, keep, 1),
        }
        return output, history

    def attend_one_token(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
    ) -> tuple[torch.Tensor, HistoryWrite, HistoryWrite, HistoryWrite]:
        """`attend` for one new position when the cached window is a full ring buffer (decoding): the query sees
        every cached real token and itself (softmax is blind to the keys' order), and the new key, value and
        validity are returned as writes over the oldest slot instead of a concatenated copy of the window."""
        scale = self.head_dim**-0.5
        scores = torch.matmul(query, state.attn_keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~state.attn_valid[:, None, None, :], float("-inf"))
        own_score = (query * key).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([scores, own_score], dim=-1), dim=-1, dtype=torch.float32).to(value.dtype)
        attended = torch.matmul(weights[..., :-1], state.attn_values) + weights[..., -1:] * value
        output = self.o_proj(attended.transpose(1, 2).reshape(query.shape[0], 1, -1))
        steps = state.attention_ring_steps
        return (
            output,
            _ring_write(state.attn_keys, 2, steps, key[:, :, 0]),
            _ring_write(state.attn_values, 2, steps, value[:, :, 0]),
            _ring_write(state.attn_valid, 1, steps, token_mask[:, 0]),
        )


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D] in fp32 (the memory side of the block works in fp32)."""
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1).float()


class AtlasMAGBlock(GradientCheckpointingLayer):
    """One Atlas-MAG block. The block is a pure function of (hidden states, layer state): it returns the new
    state instead of writing a cache, so gradient checkpointing can replay it."""

    def __init__(self, config: AtlasMAGConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.input_norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = AtlasMAGAttention(config)
        if config.use_memory:
            self.gamma_gate = nn.Sequential(
                nn.Linear(config.hidden_size, config.gamma_gate_hidden_size, bias=False),
                nn.SiLU(),
                nn.Linear(config.gamma_gate_hidden_size, 1, bias=False),
            )
            self.memory = AtlasMAGMemory(config, layer_idx)
        self.post_attention_norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = AtlasMAGMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_state: AtlasMAGLayerState | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_mask: torch.Tensor,
        schedule: list[TTLUpdate],
        memory_gate: bool = True,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, AtlasMAGLayerState, torch.Tensor | None]:
        """Returns the new hidden states, the new layer state and the gradient norms of this call's TTL updates
        (None if there were none). `in_place` (a one-token step under no_grad, with a cache) lets full histories
        act as ring buffers: the new state then carries in-place writes for the model to commit."""
        state = layer_state if layer_state is not None else AtlasMAGLayerState()
        uses_memory = self.config.use_memory and memory_gate
        attention_full, memory_full = state.ring_ready(self.config)
        attention_ring = in_place and attention_full
        memory_ring = in_place and uses_memory and memory_full
        state = state.prepare(attention_ring, memory_ring)
        gradient_norms = None
        normed = self.input_norm(hidden_states)
        query, key, value = self.self_attn.project(normed, cos, sin)
        if not uses_memory:
            attn_output, changes, writes = self._attend(query, key, value, token_mask, state, attention_ring)
            hidden_states = hidden_states + attn_output
        else:
            memory_output, changes, writes, gradient_norms = self._read_memory(
                normed, query, key, value, token_mask, state, schedule, memory_ring
            )
            if self.config.block_type == "mag":
                attn_output, attention_changes, attention_writes = self._attend(
                    query, key, value, token_mask, state, attention_ring
                )
                hidden_states = hidden_states + attn_output * torch.sigmoid(memory_output).to(hidden_states.dtype)
            else:
                # Memory as layer: the memory's output joins the attention input.
                query, key, value = self.self_attn.project(normed + memory_output.to(normed.dtype), cos, sin)
                attn_output, attention_changes, attention_writes = self._attend(
                    query, key, value, token_mask, state, attention_ring
                )
                hidden_states = hidden_states + attn_output
            changes |= attention_changes
            writes += attention_writes
        new_state = replace(state, **changes, pending_writes=state.pending_writes + writes)
        hidden_states = hidden_states + self.mlp(self.post_attention_norm(hidden_states))
        return hidden_states, new_state, gradient_norms

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
        ring: bool,
    ) -> tuple[torch.Tensor, dict[str, Any], tuple[HistoryWrite, ...]]:
        """Attention output, the state changes and the in-place writes of the attention window."""
        if ring:
            output, *writes = self.self_attn.attend_one_token(query, key, value, token_mask, state)
            return output, {"attention_ring_steps": state.attention_ring_steps + 1}, tuple(writes)
        output, history = self.self_attn.attend(query, key, value, token_mask, state)
        return output, history, ()

    def _read_memory(
        self,
        normed: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
        schedule: list[TTLUpdate],
        ring: bool,
    ) -> tuple[torch.Tensor, dict[str, Any], tuple[HistoryWrite, ...], torch.Tensor | None]:
        """The memory's output (it learns on the way, per `schedule`), the state changes, the in-place writes of
        the Q-K and Omega histories, and the TTL gradient norms."""
        gamma = torch.sigmoid(self.gamma_gate(normed).squeeze(-1).float())
        # Memory math stays fp32 under mixed precision too: degree-2 features overflow in half precision.
        with torch.autocast(device_type=normed.device.type, enabled=False):
            token_weights = gamma * token_mask
            memory_query, memory_key, memory_value = _merge_heads(query), _merge_heads(key), _merge_heads(value)
            if not ring:
                flat_keys = _append_history(state.qk_keys, memory_key, 1)
                key_weights = _append_history(state.qk_weights, token_weights, 1)
                memory_queries = qk_projection(memory_query, flat_keys, key_weights, self.config)
                output, memory, momentum, omega_history, gradient_norms = self.memory.read_and_learn(
                    memory_queries, memory_value, token_weights, token_mask, state, schedule
                )
                changes = {
                    "qk_keys": _keep_last(flat_keys, self.config.omega_window, 1),
                    "qk_weights": _keep_last(key_weights, self.config.omega_window, 1),
                    **omega_history,
                    "memory": memory,
                    "momentum": momentum,
                }
                return output, changes, (), gradient_norms
            steps = state.memory_ring_steps
            window = self.config.omega_window
            decay = omega_decay_oldest_first(window, self.config.omega_decay, query.device)
            key_weights = decay.roll(steps % window) * state.qk_weights
            memory_queries = qk_projection_one_query(memory_query, state.qk_keys, key_weights, self.config)
            output, memory, momentum, gradient_norms = self.memory.read_and_learn_one_token(
                memory_queries, memory_value, token_weights, token_mask, state, schedule
            )
        writes = (
            _ring_write(state.qk_keys, 1, steps, memory_key[:, 0]),
            _ring_write(state.qk_weights, 1, steps, token_weights[:, 0]),
            _ring_write(state.omega_queries, 1, steps, memory_queries[:, 0]),
            _ring_write(state.omega_values, 1, steps, memory_value[:, 0]),
            _ring_write(state.omega_weights, 1, steps, token_weights[:, 0]),
            _ring_write(state.omega_valid, 1, steps, token_mask[:, 0]),
        )
        changes = {"memory_ring_steps": steps + 1, "memory": memory, "momentum": momentum}
        return output, changes, writes, gradient_norms


class AtlasMAGPreTrainedModel(PreTrainedModel):
    config_class = AtlasMAGConfig
    config: AtlasMAGConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AtlasMAGBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # The memory cannot be rolled back to a subset of tokens (no assisted generation).
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, AtlasMAGRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AtlasMAGMemory):
            init.ones_(module.output_scale)
            if hasattr(module, "feature_coefficients"):
                init.copy_(module.feature_coefficients, module.taylor_coefficients(self.config.poly_degree))
        elif isinstance(module, AtlasMAGModel):
            init.zeros_(module.w_init)


class AtlasMAGModel(AtlasMAGPreTrainedModel):
    """The Atlas-MAG backbone: embeddings (plus the learned offset `w_init`), the blocks and the final norm."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.w_init = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(AtlasMAGBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        # The check needs the ids on the host; a compiled graph skips it (the embedding still fails on a bad id).
        if torch.compiler.is_compiling():
            return
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(
                f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size}) of this "
                "model; is the tokenizer the model's own?"
            )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AtlasMAGCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        ttl: bool | None = None,
        memory_gate: bool = True,
        past_key_values: AtlasMAGCache | None = None,
        **kwargs: Any,
    ) -> AtlasMAGModelOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, past + new)` or `(batch, new)`, *optional*):
            1 for real tokens, 0 for padding. Padding is never attended to, never written into the memory, and
            does not advance a sequence's positions or TTL chunks.
        cache (`AtlasMAGCache`, *optional*):
            The state returned by an earlier call on the same sequences, to continue them. Without it, every
            sequence starts from the model's memory parameters. `past_key_values` is the same argument under the
            name Transformers used before 5.24 (pass one of them).
        ttl (`bool`, *optional*):
            Learn the memory during this call. Defaults to `config.ttl_enabled`; independent of `model.training`
            and of `torch.no_grad()` / `torch.inference_mode()`.
        memory_gate (`bool`, *optional*, defaults to `True`):
            `False` removes the memory from every block for this call (`x + attn(x)`: the ablation behind the
            original "NIAH 85.9%" figure). The memory is neither read nor trained, and its cached state is left
            as it was.
        kwargs:
            Only the arguments of `IGNORED_FORWARD_ARGUMENTS`, which `generate` and pipelines pass and which mean
            nothing here; anything else raises a `TypeError`.
        """
        reject_unused_arguments(f"{type(self).__name__}.forward", kwargs)
        cache = resolve_cache_argument(cache, past_key_values)
        inputs_embeds = self._input_embeddings(input_ids, inputs_embeds)
        batch_size, length = inputs_embeds.shape[:2]
        ttl = self.config.ttl_enabled if ttl is None else ttl
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None:
            if not isinstance(cache, AtlasMAGCache):
                raise TypeError(f"Atlas-MAG needs an AtlasMAGCache as its cache, got {type(cache).__name__}")
            cache.check_layout(self.config)
            if cache.batch_size not in (-1, batch_size):
                raise ValueError(f"The cache holds {cache.batch_size} sequences but the input has {batch_size}.")
        if use_cache and cache is None:
            cache = AtlasMAGCache(self.config)
        cache = cache if use_cache else None

        token_mask = self._token_mask(attention_mask, batch_size, length, inputs_embeds.device, cache)
        tokens_seen = cache.tokens_seen if cache is not None else None
        if tokens_seen is None:
            tokens_seen = torch.zeros(batch_size, dtype=torch.long, device=inputs_embeds.device)
        positions = (tokens_seen[:, None] + token_mask.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        learns = ttl and memory_gate and self.config.use_memory
        unpadded = attention_mask is None and (cache is None or cache.unpadded)
        schedule = []
        if learns and unpadded:
            # No int local for the position: a compiled graph would specialise on it and recompile every token.
            schedule = unpadded_ttl_schedule(
                cache.positions_seen if cache is not None else 0, length, self.config.ttl_chunk_size
            )
        elif learns:
            schedule = ttl_schedule(token_mask, positions, self.config.ttl_chunk_size)

        hidden_states = inputs_embeds + self.w_init
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        new_states, layer_outputs, norm_sums = [], [], []
        # A decoding step writes into the cached windows in place (at commit, below); under autograd they might
        # be saved for backward, so a step that records gradients takes the copying path.
        in_place = cache is not None and length == 1 and not torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            layer_state = cache.layers[index].state if cache is not None else None
            hidden_states, new_state, norms = layer(
                hidden_states, layer_state, cos, sin, token_mask, schedule, memory_gate, in_place
            )
            new_states.append(new_state)
            layer_outputs.append(hidden_states)
            norm_sums.append(norms if norms is not None else hidden_states.new_zeros(batch_size, dtype=torch.float32))
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        norm_sums = torch.stack(norm_sums, dim=1)
        self._check_finite(inputs_embeds, layer_outputs, norm_sums)
        # The cache changes only once the whole call has succeeded.
        if cache is not None:
            for layer_cache, new_state in zip(cache.layers, new_states, strict=True):
                layer_cache.state = new_state.commit()
            cache.advance(token_mask, unpadded)
        hidden_states = self.norm(hidden_states)
        return AtlasMAGModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            ttl_gradient_norms=(norm_sums / update_counts(schedule, batch_size, norm_sums.device)[:, None]).detach(),
            **{CACHE_FIELD: cache},
        )

    def _input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The [B, T, hidden] embeddings of a non-empty input given as ids or as embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(
                    f"input_ids must be [batch, length] with at least one token, got shape {tuple(input_ids.shape)}"
                )
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, length, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"The input is empty (shape {tuple(inputs_embeds.shape[:2])}): nothing to process.")
        return inputs_embeds

    @staticmethod
    def _check_finite(inputs_embeds: torch.Tensor, layer_outputs: list[torch.Tensor], norm_sums: torch.Tensor) -> None:
        """One host check (one sync) that the input, every layer's output and every TTL gradient are finite,
        before anything reaches the cache: a non-finite memory or window would poison every later token.
        An exported program (`torch.export`) has no host to raise on, so it skips the check."""
        if torch.compiler.is_exporting():
            return
        flags = torch.stack(
            [
                torch.isfinite(inputs_embeds).all(),
                *(torch.isfinite(output).all() for output in layer_outputs),
                *torch.isfinite(norm_sums).all(0),
            ]
        ).tolist()
        num_layers = len(layer_outputs)
        input_ok, outputs_ok, gradients_ok = flags[0], flags[1 : num_layers + 1], flags[num_layers + 1 :]
        kept = "the cache was left as it was before this call"
        if not input_ok:
            raise ValueError(
                f"The input embeddings (`inputs_embeds`, or the embedding of `input_ids`) hold NaN or inf; {kept}."
            )
        for layer, ok in enumerate(gradients_ok):
            if not ok:
                raise FloatingPointError(
                    f"Atlas-MAG layer {layer}: the test-time-learning gradient of the memory is not finite (NaN or "
                    "inf). The memory state or the parameters hold NaNs, or the memory diverged over this input (a "
                    f"smaller `ttl_lr` keeps it bounded); {kept}."
                )
        for layer, ok in enumerate(outputs_ok):
            if not ok:
                raise FloatingPointError(
                    f"Atlas-MAG layer {layer}: its output hidden states are not finite (NaN or inf) although its "
                    f"input was; the parameters or the cached state hold NaNs or overflow; {kept}."
                )

    @staticmethod
    def _token_mask(
        attention_mask: torch.Tensor | None,
        batch_size: int,
        length: int,
        device: torch.device,
        cache: AtlasMAGCache | None,
    ) -> torch.Tensor:
        """Boolean [B, T] mask of the new positions. Accepts a mask over the new tokens or, as `generate` passes
        it, over past and new tokens."""
        if attention_mask is None:
            return torch.ones(batch_size, length, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask must be 2-D [batch, length] with batch {batch_size}, got {tuple(attention_mask.shape)}"
            )
        past = cache.positions_seen if cache is not None else 0
        if attention_mask.shape[1] not in (length, past + length):
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {length} (new tokens) or "
                f"{past + length} (past and new tokens)"
            )
        return attention_mask[:, -length:].to(device=device, dtype=torch.bool)


class AtlasMAGForCausalLM(AtlasMAGPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__(config)
        self.model = AtlasMAGModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `forward` creates its own AtlasMAGCache; generate must not hand it a DynamicCache.
        return False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AtlasMAGCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        ttl: bool | None = None,
        memory_gate: bool = True,
        past_key_values: AtlasMAGCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AtlasMAGCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Targets for the next-token loss, the shape of the input; shifted inside, -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.
        ttl (`bool`, *optional*):
            Learn the memory during this call (defaults to `config.ttl_enabled`).
        memory_gate (`bool`, *optional*, defaults to `True`):
            `False` removes the memory from every block for this call (see `AtlasMAGModel.forward`).
        num_items_in_batch (`int`, *optional*):
            Number of target tokens in the whole (accumulated) batch, which `Trainer` passes so that the loss is
            a mean over them.
        """
        reject_unused_arguments(f"{type(self).__name__}.forward", kwargs)
        inputs = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and inputs is not None and tuple(labels.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"labels must have the input's shape {tuple(inputs.shape[:2])} (batch, length), got "
                f"{tuple(labels.shape)}"
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            ttl=ttl,
            memory_gate=memory_gate,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        return AtlasMAGCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            ttl_gradient_norms=outputs.ttl_gradient_norms,
            **{CACHE_FIELD: outputs.cache},
        )


__all__ = [
    "AtlasMAGCache",
    "AtlasMAGCausalLMOutput",
    "AtlasMAGModelOutput",
    "AtlasMAGForCausalLM",
    "AtlasMAGLayerState",
    "AtlasMAGModel",
    "AtlasMAGPreTrainedModel",
]
