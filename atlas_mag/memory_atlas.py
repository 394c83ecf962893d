"""The Atlas-MAG memory layer: its parameters are every sequence's initial memory; `read_and_learn` reads it at
every new position and learns at each test-time-learning update of a call (the math is in `ops_atlas.py`).

Copied next to published weights with its siblings: imports only `torch` and sibling files.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .cache_atlas import AtlasMAGLayerState, OmegaHistory, QKHistory, extend
from .configuration_atlas import AtlasMAGConfig
from .ops_atlas import (
    MemoryForward,
    MemoryWeights,
    StepRates,
    TTLUpdate,
    gradient_norms,
    memory_forward,
    memory_loss_gradients,
    omega_decay_oldest_first,
    omega_update,
    qk_projection,
    qk_projection_one_query,
    unpadded_ttl_schedule,
)


class MemoryInputs(NamedTuple):
    """What the memory reads and learns from at the new positions: the Q-K projected queries [B, T, hidden], the
    values [B, T, hidden] (the Omega loss's targets), the gamma weights [B, T] and the real-token mask [B, T]."""

    queries: torch.Tensor
    values: torch.Tensor
    token_weights: torch.Tensor
    token_mask: torch.Tensor


class MemoryRead(NamedTuple):
    """What reading (and learning) over a call gives: the output [B, T, hidden], the memory and momentum after
    the call's updates, each sequence's summed gradient norm over them ([B], None if none), and the Omega history
    followed by the new positions (None for a ring-buffer step, whose history is written in place)."""

    output: torch.Tensor
    memory: MemoryWeights
    momentum: MemoryWeights | None
    gradient_norms: torch.Tensor | None
    omega: OmegaHistory | None = None


class MemoryStep(NamedTuple):
    """The memory's part of a block step: its output [B, T, hidden], the layer state holding its new histories
    and memory (ring writes pending), and each sequence's summed TTL gradient norm ([B], None if no update)."""

    output: torch.Tensor
    state: AtlasMAGLayerState
    gradient_norms: torch.Tensor | None


class AtlasMAGMemory(nn.Module):
    """Deep polynomial memory. Its parameters are the initial memory of every sequence; test-time learning
    updates per-sequence copies (`memory_forward` / `memory_loss_gradients` in `ops_atlas.py`), never these
    tensors."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.config = config
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

    def weights(self) -> MemoryWeights:
        """These parameters as the memory's weights (the same tensors)."""
        return MemoryWeights(
            proj_down=self.proj_down.weight,
            feature_coefficients=getattr(self, "feature_coefficients", None),
            poly_norm_weight=self.poly_norm.weight,
            poly_norm_bias=self.poly_norm.bias,
            poly_compress=self.poly_compress.weight,
            mlp=tuple(layer.weight for layer in self.mlp),
            proj_up=self.proj_up.weight,
            output_norm_weight=self.output_norm.weight,
            output_norm_bias=self.output_norm.bias,
            output_scale=self.output_scale,
        )

    def initial_state(self, batch_size: int) -> MemoryWeights:
        """The parameters as fp32 [B, *shape] views (no copy until a sequence's first update)."""
        return self.weights().map(lambda param: param.float().unsqueeze(0).expand(batch_size, *param.shape))

    def forward(
        self,
        queries: torch.Tensor,
        values: torch.Tensor,
        state: AtlasMAGLayerState | None = None,
        first_position: int = 0,
        ttl: bool = True,
    ) -> tuple[torch.Tensor, AtlasMAGLayerState]:
        """The memory as a layer of its own (Atlas-MAG's blocks call `block_forward` instead, which adds the Q-K
        projection and the gamma weights). Reads at every position of `queries` [B, T, hidden] and, with `ttl`,
        learns to map queries to `values` [B, T, hidden] after every position `kC - 1` (C = `ttl_chunk_size`,
        counted from `first_position`, the number of positions earlier calls on `state` saw). Returns the output
        [B, T, hidden] and the state to pass to the next call; these parameters never change."""
        state = state if state is not None else AtlasMAGLayerState()
        token_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        schedule = unpadded_ttl_schedule(first_position, queries.shape[1], self.config.ttl_chunk_size) if ttl else []
        inputs = MemoryInputs(queries.float(), values.float(), token_mask.float(), token_mask)
        read = self.read_and_learn(inputs, state, schedule)
        return read.output, state.with_memory(read.omega, read.memory, read.momentum, self.config)

    def block_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        token_weights: torch.Tensor,
        token_mask: torch.Tensor,
        state: AtlasMAGLayerState,
        schedule: list[TTLUpdate],
        in_place: bool,
        keeps_memory: bool = True,
        rates: StepRates | None = None,
    ) -> MemoryStep:
        """The memory's part of an Atlas-MAG block: the Q-K projection of the attention's `query` over the past
        keys (each [B, T, hidden], fp32; `token_weights` are gamma times the real-token mask), then
        `read_and_learn`. `in_place`: one new position over full histories, which act as ring buffers.
        `keeps_memory=False`: nothing reads the memory after this call (see `read_and_learn`). `rates`: the inner
        optimiser's rates at the new positions ([B, T] each; None: the config's constants)."""
        new_keys = QKHistory(key, token_weights)
        if not in_place:
            keys = extend(state.qk, new_keys)
            queries = qk_projection(query, keys.keys, keys.weights, self.config)
            inputs = MemoryInputs(queries, value, token_weights, token_mask)
            read = self.read_and_learn(inputs, state, schedule, keeps_memory=keeps_memory, rates=rates)
            state = state.with_qk_keys(keys, self.config)
            state = state.with_memory(read.omega, read.memory, read.momentum, self.config)
            return MemoryStep(read.output, state, read.gradient_norms)
        window = self.config.omega_window
        decay = omega_decay_oldest_first(window, self.config.omega_decay, query.device)
        key_weights = decay.roll(state.memory_ring_steps % window) * state.qk.weights
        queries = qk_projection_one_query(query, state.qk.keys, key_weights, self.config)
        inputs = MemoryInputs(queries, value, token_weights, token_mask)
        read = self.read_and_learn(inputs, state, schedule, in_place=True, rates=rates)
        state = state.with_memory_ring_write(new_keys, OmegaHistory(*inputs), read.memory, read.momentum)
        return MemoryStep(read.output, state, read.gradient_norms)

    def drift(self, learned: MemoryWeights) -> torch.Tensor:
        """How far test-time learning moved each sequence's memory from these parameters:
        ||M_learned - M_0|| / ||M_0|| over all of them ([batch])."""
        change_sq, initial_sq = 0.0, 0.0
        for param, tensor in zip(self.weights().tensors(), learned.tensors(), strict=True):
            initial = param.detach().float()
            change_sq = change_sq + (tensor - initial).reshape(tensor.shape[0], -1).pow(2).sum(1)
            initial_sq += initial.pow(2).sum()
        return change_sq.sqrt() / initial_sq.sqrt().clamp(min=1e-12)

    def read_and_learn(
        self,
        inputs: MemoryInputs,
        state: AtlasMAGLayerState,
        schedule: list[TTLUpdate],
        in_place: bool = False,
        keeps_memory: bool = True,
        rates: StepRates | None = None,
    ) -> MemoryRead:
        """Read the memory at every new position and learn at every update of `schedule` (see `ttl_schedule`).

        The update after column `c` fits the last `omega_window` positions up to and including `c`; tokens after
        it read the updated memory. Returns the output [B, T, hidden], the memory and momentum after the call, the
        Omega history with the new positions and each sequence's summed gradient norm over the call's updates
        ([B], or None). `in_place`: one new position over a full Omega history (decoding), see
        `_read_and_learn_in_place`. `keeps_memory=False` (no cache, e.g. a training step): an update after the
        last position gives its gradient norms but no new memory (the memory returned is the one before it).
        `rates` ([B, T] each, None: the config's constants): an update takes those of the token it follows.
        """
        if in_place:
            return self._read_and_learn_in_place(inputs, state, schedule, rates)
        queries = inputs.queries
        config = self.config
        memory = state.memory if state.memory is not None else self.initial_state(queries.shape[0])
        momentum = state.momentum
        history = extend(state.omega, OmegaHistory(*inputs))
        past = history.length - queries.shape[1]

        outputs = []
        gradient_norms = []
        start = 0
        for column, rows in schedule:
            window = slice(max(0, past + column + 1 - config.omega_window), past + column + 1)
            # When every row learns from exactly the positions it has just read (omega_window == ttl_chunk_size
            # in a prefill), the read's forward pass is also the update's.
            reuse = rows is None and window.start == past + start
            read = memory_forward(memory, queries[:, start : column + 1], config, keep_activations=reuse)
            outputs.append(read.output)
            start = column + 1
            selection = (slice(None), window) if rows is None else (rows, window)
            fitted = OmegaHistory(*(tensor[selection] for tensor in history.tensors()))
            update = keeps_memory or column < queries.shape[1] - 1
            step_rates = None if rates is None else rates.at(column, rows)
            memory, momentum, norms = self._learn(
                memory, momentum, rows, fitted, step_rates, read if reuse else None, update
            )
            gradient_norms.append(norms)
        if start < queries.shape[1]:
            outputs.append(memory_forward(memory, queries[:, start:], config).output)
        norms = torch.stack(gradient_norms).sum(0) if gradient_norms else None
        return MemoryRead(torch.cat(outputs, dim=1), memory, momentum, norms, history)

    def _read_and_learn_in_place(
        self, inputs: MemoryInputs, state: AtlasMAGLayerState, schedule: list[TTLUpdate], rates: StepRates | None
    ) -> MemoryRead:
        """`read_and_learn` for one new position when the Omega history is a full ring buffer (decoding): only an
        update (every `ttl_chunk_size` tokens) reads the history, joined to the new position. Returns the output,
        the memory and momentum after the step and the update's gradient norms (or None)."""
        memory = state.memory if state.memory is not None else self.initial_state(inputs.queries.shape[0])
        output = memory_forward(memory, inputs.queries, self.config).output
        if not schedule:
            return MemoryRead(output, memory, state.momentum, None)
        ((column, rows),) = schedule
        # The Omega loss sums over the window's positions, so the ring's order does not matter.
        window = state.omega.extended(OmegaHistory(*inputs))
        if rows is not None:
            window = window.map(lambda tensor: tensor[rows])
        step_rates = None if rates is None else rates.at(column, rows)
        memory, momentum, norms = self._learn(memory, state.momentum, rows, window, step_rates)
        return MemoryRead(output, memory, momentum, norms)

    def _learn(
        self,
        memory: MemoryWeights,
        momentum: MemoryWeights | None,
        rows: torch.Tensor | None,
        window: OmegaHistory,
        rates: StepRates | None = None,
        forward: MemoryForward | None = None,
        update: bool = True,
    ) -> tuple[MemoryWeights, MemoryWeights | None, torch.Tensor]:
        """One Omega-rule step for the sequences in `rows` (None: all of them) over their `window`, with the
        `rates` of those rows ([rows] each; None: the config's constants); the others keep their memory. Returns
        the memory, the momentum and each sequence's mean gradient norm [B] (0 for rows that did not learn).
        `update=False`: the gradient norms only, the memory and momentum as they were (for a last update whose
        memory nothing reads: Newton–Schulz and the step are skipped)."""
        config = self.config
        every_row = rows is None
        selected = memory if every_row else memory.map(lambda tensor: tensor[rows])
        selected_momentum = None
        if momentum is not None:
            selected_momentum = momentum if every_row else momentum.map(lambda tensor: tensor[rows])
        # The loss is a mean over the real tokens of each sequence's window.
        token_weights = window.weights / window.valid.sum(1, keepdim=True).clamp(min=1)
        through_updates = config.ttl_backprop_through_updates and torch.is_grad_enabled()
        with torch.set_grad_enabled(through_updates):
            inputs = (window.queries, window.values, token_weights)
            learn_state = selected
            if not through_updates:
                inputs = tuple(t.detach() for t in inputs)
                learn_state = selected.map(torch.Tensor.detach)
            grads, _ = memory_loss_gradients(learn_state, *inputs, config, forward)
        if update:
            # Outside the no-grad block: the outer loss reaches the memory's parameters through the decay term.
            updated, new_momentum, grad_norms = omega_update(selected, grads, selected_momentum, config, rates)
        else:
            grad_norms = gradient_norms(grads)
        row_norms = grad_norms.float().mean(1)
        if not every_row:
            row_norms = row_norms.new_zeros(memory.proj_down.shape[0]).index_copy(0, rows, row_norms)
        if not update:
            return memory, momentum, row_norms
        if every_row:
            return updated, new_momentum, row_norms
        if momentum is None:
            momentum = memory.map(torch.zeros_like)
        return _with_rows(memory, rows, updated), _with_rows(momentum, rows, new_momentum), row_norms


def _with_rows(whole: MemoryWeights, rows: torch.Tensor, part: MemoryWeights) -> MemoryWeights:
    """`whole` with the batch rows `rows` replaced by `part`."""
    pairs = zip(whole.tensors(), part.tensors(), strict=True)
    return whole.with_tensors([tensor.index_copy(0, rows, new) for tensor, new in pairs])
