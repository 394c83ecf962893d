"""The Atlas-MAG cache: per layer, the attention window, the Q-K and Omega histories and each sequence's memory
weights and momentum, bounded in size; ring-buffer writes for decoding, applied when a call commits; and the plan
of a call (its token mask, positions and TTL schedule), which it derives from the cache.

Copied next to published weights with its siblings: imports only `torch`, `transformers` and sibling files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_atlas import AtlasMAGConfig
from .ops_atlas import (
    MemoryWeights,
    TTLUpdate,
    columns,
    rotary_cos_sin,
    ttl_schedule,
    unpadded_ttl_schedule,
    update_counts,
)

# (buffer, time dimension, slot, value): an in-place write into a cached history.
HistoryWrite = tuple[torch.Tensor, int, int, torch.Tensor]
AnyHistory = TypeVar("AnyHistory", bound="History")
Part = TypeVar("Part", "History", MemoryWeights)


@dataclass(frozen=True)
class History:
    """Tensors that a layer keeps for its last positions and that grow, are trimmed and are written as one ring
    buffer together; `TIME_DIMS` holds each field's time dimension."""

    TIME_DIMS: ClassVar[tuple[int, ...]]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, field.name) for field in fields(self))

    def map(self: AnyHistory, function: Callable[[torch.Tensor], torch.Tensor]) -> AnyHistory:
        return type(self)(*(function(tensor) for tensor in self.tensors()))

    @property
    def length(self) -> int:
        return self.tensors()[0].shape[self.TIME_DIMS[0]]

    def extended(self: AnyHistory, new: AnyHistory) -> AnyHistory:
        """This history followed by `new` (in time order)."""
        pairs = zip(self.tensors(), new.tensors(), self.TIME_DIMS, strict=True)
        return type(self)(*(torch.cat([old, added], dim) for old, added, dim in pairs))

    def last(self: AnyHistory, keep: int) -> AnyHistory:
        """The last `keep` positions, copied (`columns`) so that the cache does not pin the longer history."""
        length = self.length
        if length <= keep:
            return self
        pairs = zip(self.tensors(), self.TIME_DIMS, strict=True)
        return type(self)(*(columns(tensor, dim, length - keep, length) for tensor, dim in pairs))

    def in_time_order(self: AnyHistory, ring_steps: int) -> AnyHistory:
        """A ring buffer that has taken `ring_steps` writes, rolled back into time order."""
        dims = self.TIME_DIMS
        return type(self)(*(t.roll(-(ring_steps % t.shape[d]), d) for t, d in zip(self.tensors(), dims, strict=True)))

    def ring_writes(self, ring_steps: int, new: History) -> tuple[HistoryWrite, ...]:
        """Writes of the one-position history `new` over the oldest entry of this full ring buffer."""
        slot = ring_steps % self.length
        return tuple(
            (buffer, dim, slot, value.select(dim, 0))
            for buffer, value, dim in zip(self.tensors(), new.tensors(), self.TIME_DIMS, strict=True)
        )


def extend(past: AnyHistory | None, new: AnyHistory) -> AnyHistory:
    return new if past is None else past.extended(new)


@dataclass(frozen=True)
class AttentionWindow(History):
    """The attention's last keys and values [B, heads, N, head_dim] and which of them are real tokens [B, N]."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    TIME_DIMS: ClassVar[tuple[int, ...]] = (2, 2, 1)


@dataclass(frozen=True)
class QKHistory(History):
    """The keys [B, N, hidden] that the Q-K projection sums over, with their gamma weights times validity [B, N]."""

    keys: torch.Tensor
    weights: torch.Tensor
    TIME_DIMS: ClassVar[tuple[int, ...]] = (1, 1)


@dataclass(frozen=True)
class OmegaHistory(History):
    """The positions the Omega rule's loss fits: the Q-K projected queries [B, N, hidden], the values
    [B, N, hidden], the gamma weights [B, N] and the validity [B, N]."""

    queries: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    TIME_DIMS: ClassVar[tuple[int, ...]] = (1, 1, 1, 1)


@dataclass
class AtlasMAGLayerState:
    """Everything one layer carries from one call to the next, per sequence (batch first). Bounded in size:
    at most `sliding_window - 1` attention positions, `omega_window` Q-K keys, `omega_window - 1` Omega positions
    (the sizes are set here, in the `with_*` methods) and one copy of the memory weights and momentum.

    Once a history is full, decoding uses it as a ring buffer: each new position is written over the oldest one
    in place (no copy of the window per token), and `*_ring_steps` count those writes since the history was
    last in time order. The writes are kept in `pending_writes` until the model commits the call."""

    attention: AttentionWindow | None = None
    qk: QKHistory | None = None
    omega: OmegaHistory | None = None
    memory: MemoryWeights | None = None
    momentum: MemoryWeights | None = None
    attention_ring_steps: int = 0
    memory_ring_steps: int = 0
    pending_writes: tuple[HistoryWrite, ...] = ()

    def tensors(self) -> Iterator[torch.Tensor]:
        for part in (self.attention, self.qk, self.omega, self.memory, self.momentum):
            if part is not None:
                yield from part.tensors()

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> AtlasMAGLayerState:
        def apply(part: Part | None) -> Part | None:
            return None if part is None else part.map(function)

        return replace(
            self,
            attention=apply(self.attention),
            qk=apply(self.qk),
            omega=apply(self.omega),
            memory=apply(self.memory),
            momentum=apply(self.momentum),
        )

    def with_attention(self, window: AttentionWindow, config: AtlasMAGConfig) -> AtlasMAGLayerState:
        """This state keeping the last `sliding_window - 1` positions of `window` (a query sees itself and those)."""
        return replace(self, attention=window.last(config.sliding_window - 1))

    def with_qk_keys(self, qk: QKHistory, config: AtlasMAGConfig) -> AtlasMAGLayerState:
        """This state keeping the last `omega_window` Q-K keys of `qk` (the next query's window)."""
        return replace(self, qk=qk.last(config.omega_window))

    def with_memory(
        self, omega: OmegaHistory, memory: MemoryWeights, momentum: MemoryWeights | None, config: AtlasMAGConfig
    ) -> AtlasMAGLayerState:
        """This state with the learned memory, keeping the last `omega_window - 1` Omega positions of `omega` (the
        next update's window, less the position it ends on)."""
        return replace(self, omega=omega.last(config.omega_window - 1), memory=memory, momentum=momentum)

    def ring_ready(self, config: AtlasMAGConfig) -> tuple[bool, bool]:
        """Whether the attention and the memory histories are full, so that a one-token step can use them as
        ring buffers."""
        attention = self.attention is not None and self.attention.length == config.sliding_window - 1 > 0
        memory = (
            self.qk is not None
            and self.qk.length == config.omega_window
            and self.omega is not None
            and self.omega.length == config.omega_window - 1 > 0
        )
        return attention, memory

    def prepare(self, attention_ring: bool, memory_ring: bool) -> AtlasMAGLayerState:
        """The histories laid out for this step: for a part that decodes in place, ring buffers of its own
        (copied once, when decoding in place starts, so that no caller's tensor is ever written); for a part
        that takes the general path, time order."""
        state = self
        if attention_ring and self.attention_ring_steps == 0:
            state = replace(state, attention=self.attention.map(torch.clone))
        elif not attention_ring and self.attention_ring_steps:
            attention = self.attention.in_time_order(self.attention_ring_steps)
            state = replace(state, attention=attention, attention_ring_steps=0)
        if memory_ring and self.memory_ring_steps == 0:
            state = replace(state, qk=self.qk.map(torch.clone), omega=self.omega.map(torch.clone))
        elif not memory_ring and self.memory_ring_steps:
            steps = self.memory_ring_steps
            qk, omega = self.qk.in_time_order(steps), self.omega.in_time_order(steps)
            state = replace(state, qk=qk, omega=omega, memory_ring_steps=0)
        return state

    def with_attention_ring_write(self, new: AttentionWindow) -> AtlasMAGLayerState:
        """This state with `new` (one position) pending as a write over the oldest slot of the attention ring."""
        writes = self.attention.ring_writes(self.attention_ring_steps, new)
        return replace(
            self, attention_ring_steps=self.attention_ring_steps + 1, pending_writes=self.pending_writes + writes
        )

    def with_memory_ring_write(
        self, qk: QKHistory, omega: OmegaHistory, memory: MemoryWeights, momentum: MemoryWeights | None
    ) -> AtlasMAGLayerState:
        """This state with the learned memory and the new position's Q-K and Omega entries pending as writes over
        the oldest slots of their rings."""
        steps = self.memory_ring_steps
        writes = self.qk.ring_writes(steps, qk) + self.omega.ring_writes(steps, omega)
        return replace(
            self,
            memory=memory,
            momentum=momentum,
            memory_ring_steps=steps + 1,
            pending_writes=self.pending_writes + writes,
        )

    def commit(self) -> AtlasMAGLayerState:
        """Apply the pending in-place writes (the model calls this once the whole call has succeeded)."""
        if not self.pending_writes:
            return self
        for buffer, dim, slot, value in self.pending_writes:
            buffer.select(dim, slot).copy_(value)
        return replace(self, pending_writes=())


class AtlasMAGLayerCache(CacheLayerMixin):
    """One layer's slot in `AtlasMAGCache`: the layer's whole `AtlasMAGLayerState`, which the layer reads and
    replaces. It has no keys/values API (`update` raises): the attention window is one part of the state."""

    is_compileable = False
    is_croppable = False
    is_sliding = True
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: AtlasMAGLayerState | None = None
        self.device: torch.device | None = None  # where an offloaded state came from

    @property
    def state(self) -> AtlasMAGLayerState | None:
        return self._state

    @state.setter
    def state(self, state: AtlasMAGLayerState | None) -> None:
        self._state = state
        self.is_initialized = state is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("An Atlas-MAG layer cache holds an AtlasMAGLayerState, not keys and values.")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("An Atlas-MAG layer cache holds an AtlasMAGLayerState, not keys and values.")

    def get_seq_length(self) -> int:
        """Positions in the attention window (the cache counts every position seen: `AtlasMAGCache`)."""
        return 0 if self.state is None or self.state.attention is None else self.state.attention.length

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # Transformers 5.1 passes the new positions' cache_position, later releases their number.
        return (query if isinstance(query, int) else query.shape[0]), 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name in the first Transformers 5 releases

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
        """Move the state to the CPU between calls (called directly: Transformers' own cache offloading skips
        sliding layers such as this one)."""
        tensor = next(self.state.tensors(), None) if self.state is not None else None
        if tensor is not None and tensor.device.type != "cpu":
            self.device = tensor.device
            self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Move an offloaded state back to the device it was offloaded from."""
        if self.state is not None and self.device is not None:
            device, self.device = self.device, None
            self._apply(lambda t: t.to(device, non_blocking=True))


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

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int) -> tuple[int, int]:
        # Any layer gives the same sizes (the new positions, no offset), so an index past the last one does too.
        return self.layers[min(layer_idx, len(self.layers) - 1)].get_mask_sizes(query_length)

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

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache holds (windows, histories, memory weights and momentum), layer by layer."""
        for layer in self.layers:
            if layer.state is not None:
                yield from layer.state.tensors()

    def memory_states(self) -> list[MemoryWeights | None]:
        """Each layer's per-sequence memory weights, None for a layer that has not run or has no memory."""
        return [layer.state.memory if layer.state is not None else None for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (each storage counted once)."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in self.state_tensors()
        }
        return sum(storages.values())


@dataclass
class CallPlan:
    """What one forward call derives from its inputs and its cache before the first layer; every layer reads it.

    Built by `CallPlan.for_call`: the cache the call continues (checked) or starts, which positions are real
    tokens, their RoPE angles (each sequence's own positions), when each sequence learns, and whether decoding may
    write the cached windows in place."""

    cache: AtlasMAGCache | None
    num_layers: int
    token_mask: torch.Tensor  # [B, T] bool: real tokens (padding is never attended to or learned from)
    cos: torch.Tensor  # RoPE angles of each sequence's own positions
    sin: torch.Tensor
    schedule: list[TTLUpdate]  # when each sequence learns in this call (see `ttl_schedule`)
    memory_gate: bool  # False: every block is `x + attn(x)`, the memory neither read nor trained
    unpadded: bool  # no sequence has ever held padding
    in_place: bool  # a one-token step under no_grad: full windows act as ring buffers
    # The memory after the call is read again (a cache or the caller keeps the state); without it, an update
    # after the call's last position only gives its gradient norms (nothing reads the memory it would make).
    keeps_memory: bool

    @classmethod
    def for_call(
        cls,
        config: AtlasMAGConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: AtlasMAGCache | None,
        use_cache: bool,
        ttl: bool | None,
        memory_gate: bool,
    ) -> CallPlan:
        batch_size, length = inputs_embeds.shape[:2]
        ttl = config.ttl_enabled if ttl is None else ttl
        if cache is not None:
            if not isinstance(cache, AtlasMAGCache):
                raise TypeError(f"Atlas-MAG needs an AtlasMAGCache as its cache, got {type(cache).__name__}")
            cache.check_layout(config)
            if cache.batch_size not in (-1, batch_size):
                raise ValueError(f"The cache holds {cache.batch_size} sequences but the input has {batch_size}.")
        if use_cache and cache is None:
            cache = AtlasMAGCache(config)
        cache = cache if use_cache else None

        token_mask = new_token_mask(attention_mask, batch_size, length, inputs_embeds.device, cache)
        tokens_seen = cache.tokens_seen if cache is not None else None
        if tokens_seen is None:
            tokens_seen = torch.zeros(batch_size, dtype=torch.long, device=inputs_embeds.device)
        positions = (tokens_seen[:, None] + token_mask.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
        learns = ttl and memory_gate and config.use_memory
        unpadded = attention_mask is None and (cache is None or cache.unpadded)
        schedule = []
        if learns and unpadded:
            # No int local for the position: a compiled graph would specialise on it and recompile every token.
            schedule = unpadded_ttl_schedule(
                cache.positions_seen if cache is not None else 0, length, config.ttl_chunk_size
            )
        elif learns:
            schedule = ttl_schedule(token_mask, positions, config.ttl_chunk_size)
        return cls(
            cache=cache,
            num_layers=config.num_hidden_layers,
            token_mask=token_mask,
            cos=cos,
            sin=sin,
            schedule=schedule,
            memory_gate=memory_gate,
            unpadded=unpadded,
            # A decoding step writes into the cached windows in place (at commit); under autograd they might be
            # saved for backward, so a step that records gradients takes the copying path.
            in_place=cache is not None and length == 1 and not torch.is_grad_enabled(),
            keeps_memory=cache is not None,
        )

    @classmethod
    def for_positions(cls, config: AtlasMAGConfig, positions: torch.Tensor) -> CallPlan:
        """The plan of a call without an `AtlasMAGCache` over unpadded sequences at absolute `positions` [B, T],
        each continuing a state its caller keeps (vLLM's per-request state): the same RoPE angles and TTL
        schedule as `for_call` gives those sequences, learning as `config.ttl_enabled` says."""
        token_mask = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
        learns = config.ttl_enabled and config.use_memory
        return cls(
            cache=None,
            num_layers=config.num_hidden_layers,
            token_mask=token_mask,
            cos=cos,
            sin=sin,
            schedule=ttl_schedule(token_mask, positions, config.ttl_chunk_size) if learns else [],
            memory_gate=True,
            # Both only matter with an `AtlasMAGCache` (which it records and which writes in place); there is none.
            unpadded=False,
            in_place=False,
            keeps_memory=True,
        )

    def chunk_pieces(self, chunk_size: int) -> list[tuple[int, int]]:
        """The [start, end) columns of this call cut at every TTL chunk boundary: each piece but the first and
        the last is one whole chunk. An unpadded call's boundaries are its positions' (`positions_seen + column`
        a multiple of `chunk_size`); a padded batch, whose sequences sit at different positions, is cut every
        `chunk_size` columns from its first."""
        length = self.token_mask.shape[1]
        past = self.cache.positions_seen if self.unpadded and self.cache is not None else 0
        first_end = min(length, chunk_size - past % chunk_size)
        ends = [*range(first_end, length, chunk_size), length]
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def piece(self, start: int, end: int) -> CallPlan:
        """This (multi-token) plan for the columns [start, end) only, as a call that continues the earlier
        columns' states: the same masks, angles and updates there (a piece before the last keeps its memory for
        the next one)."""
        schedule = [(column - start, rows) for column, rows in self.schedule if start <= column < end]
        return replace(
            self,
            keeps_memory=self.keeps_memory or end < self.token_mask.shape[1],
            token_mask=columns(self.token_mask, 1, start, end),
            cos=columns(self.cos, 2, start, end),
            sin=columns(self.sin, 2, start, end),
            schedule=schedule,
        )

    def layer_states(self) -> list[AtlasMAGLayerState | None]:
        if self.cache is None:
            return [None] * self.num_layers
        return [layer.state for layer in self.cache.layers]

    def commit(self, states: list[AtlasMAGLayerState]) -> None:
        """Store the layers' new states (applying their in-place writes) and count the call's tokens."""
        if self.cache is None:
            return
        for layer_cache, state in zip(self.cache.layers, states, strict=True):
            layer_cache.state = state.commit()
        self.cache.advance(self.token_mask, self.unpadded)

    def update_counts(self) -> torch.Tensor:
        return update_counts(self.schedule, self.token_mask.shape[0], self.token_mask.device)


def new_token_mask(
    attention_mask: torch.Tensor | None, batch_size: int, length: int, device: torch.device, cache: AtlasMAGCache | None
) -> torch.Tensor:
    """Boolean [B, T] mask of the new positions. Accepts a mask over the new tokens or, as `generate` passes it,
    over past and new tokens."""
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
