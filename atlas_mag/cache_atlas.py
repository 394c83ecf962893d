"""The Atlas-MAG cache: per layer, the attention window, the Q-K and Omega histories and each sequence's memory
weights and momentum, bounded in size; ring-buffer writes for decoding, applied when a call commits.

Copied next to published weights with its siblings: imports only `torch`, `transformers` and sibling files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import Cache

from .configuration_atlas import AtlasMAGConfig
from .ops_atlas import MemoryState

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


def ring_write(buffer: torch.Tensor, dim: int, ring_steps: int, value: torch.Tensor) -> HistoryWrite:
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

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache holds (windows, histories, memory weights and momentum), layer by layer."""
        for layer in self.layers:
            if layer.state is not None:
                yield from layer.state.tensors()

    def memory_states(self) -> list[MemoryState | None]:
        """Each layer's per-sequence memory weights, None for a layer that has not run or has no memory."""
        return [layer.state.memory if layer.state is not None else None for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (each storage counted once)."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in self.state_tensors()
        }
        return sum(storages.values())
