"""The Atlas-MAG memory layer: its parameters are every sequence's initial memory; `read_and_learn` reads it at
every new position and learns at each test-time-learning update of a call (the math is in `ops_atlas.py`).

Copied next to published weights with its siblings: imports only `torch` and sibling files.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .cache_atlas import AtlasMAGLayerState
from .configuration_atlas import AtlasMAGConfig
from .ops_atlas import (
    MemoryState,
    TTLUpdate,
    append_history,
    keep_last,
    memory_forward,
    memory_loss_gradients,
    omega_update_steps,
    unpadded_ttl_schedule,
)


class OmegaHistory(NamedTuple):
    """The last `omega_window - 1` positions the Omega rule's loss fits, per sequence: the Q-K projected queries
    [B, N, hidden], the values [B, N, hidden], the gamma weights [B, N] and the validity [B, N]."""

    queries: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor


class MemoryInputs(NamedTuple):
    """What the memory reads and learns from at the new positions: the Q-K projected queries [B, T, hidden], the
    values [B, T, hidden] (the Omega loss's targets), the gamma weights [B, T] and the real-token mask [B, T]."""

    queries: torch.Tensor
    values: torch.Tensor
    token_weights: torch.Tensor
    token_mask: torch.Tensor


class MemoryRead(NamedTuple):
    """What reading (and learning) over a call gives: the output [B, T, hidden], the memory and momentum after
    the call's updates, each sequence's summed gradient norm over them ([B], None if none), and the new Omega
    history (None for a ring-buffer step, whose history is written in place)."""

    output: torch.Tensor
    memory: MemoryState
    momentum: MemoryState | None
    gradient_norms: torch.Tensor | None
    omega: OmegaHistory | None = None


class AtlasMAGMemory(nn.Module):
    """Deep polynomial memory. Its parameters are the initial memory of every sequence; test-time learning
    updates per-sequence copies (`memory_forward` / `memory_loss_gradients` above), never these tensors."""

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

    def initial_state(self, batch_size: int) -> MemoryState:
        """The parameters as fp32 [B, *shape] views (no copy until a sequence's first update)."""
        return {
            name: param.float().unsqueeze(0).expand(batch_size, *param.shape) for name, param in self.named_parameters()
        }

    def forward(
        self,
        queries: torch.Tensor,
        values: torch.Tensor,
        state: AtlasMAGLayerState | None = None,
        first_position: int = 0,
        ttl: bool = True,
    ) -> tuple[torch.Tensor, AtlasMAGLayerState]:
        """The memory as a layer of its own (Atlas-MAG's blocks call `read_and_learn` with their Q-K projected
        queries and gamma weights instead). Reads at every position of `queries` [B, T, hidden] and, with `ttl`,
        learns to map queries to `values` [B, T, hidden] after every position `kC - 1` (C = `ttl_chunk_size`,
        counted from `first_position`, the number of positions earlier calls on `state` saw). Returns the output
        [B, T, hidden] and the state to pass to the next call; these parameters never change."""
        state = state if state is not None else AtlasMAGLayerState()
        token_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        schedule = unpadded_ttl_schedule(first_position, queries.shape[1], self.config.ttl_chunk_size) if ttl else []
        inputs = MemoryInputs(queries.float(), values.float(), token_mask.float(), token_mask)
        read = self.read_and_learn(inputs, state, schedule)
        return read.output, self.state_after(state, read)

    @staticmethod
    def state_after(state: AtlasMAGLayerState, read: MemoryRead) -> AtlasMAGLayerState:
        """`state` with the memory, momentum and Omega history of `read` (a call that was not in place)."""
        return replace(
            state,
            omega_queries=read.omega.queries,
            omega_values=read.omega.values,
            omega_weights=read.omega.weights,
            omega_valid=read.omega.valid,
            memory=read.memory,
            momentum=read.momentum,
        )

    def drift(self, learned: MemoryState) -> torch.Tensor:
        """How far test-time learning moved each sequence's memory from these parameters:
        ||M_learned - M_0|| / ||M_0|| over all of them ([batch])."""
        change_sq, initial_sq = 0.0, 0.0
        for name, param in self.named_parameters():
            initial = param.detach().float()
            change_sq = change_sq + (learned[name] - initial).reshape(learned[name].shape[0], -1).pow(2).sum(1)
            initial_sq += initial.pow(2).sum()
        return change_sq.sqrt() / initial_sq.sqrt().clamp(min=1e-12)

    def read_and_learn(
        self, inputs: MemoryInputs, state: AtlasMAGLayerState, schedule: list[TTLUpdate], in_place: bool = False
    ) -> MemoryRead:
        """Read the memory at every new position and learn at every update of `schedule` (see `ttl_schedule`).

        The update after column `c` fits the last `omega_window` positions up to and including `c`; tokens after
        it read the updated memory. Returns the output [B, T, hidden], the memory and momentum after the call, the
        Omega-window history and each sequence's summed gradient norm over the call's updates ([B], or None).
        `in_place`: one new position over a full Omega history (decoding), see `_read_and_learn_in_place`.
        """
        if in_place:
            return self._read_and_learn_in_place(inputs, state, schedule)
        queries, values, token_weights, token_mask = inputs
        config = self.config
        memory = state.memory if state.memory is not None else self.initial_state(queries.shape[0])
        momentum = state.momentum
        window_queries = append_history(state.omega_queries, queries, 1)
        window_values = append_history(state.omega_values, values, 1)
        window_weights = append_history(state.omega_weights, token_weights, 1)
        window_valid = append_history(state.omega_valid, token_mask, 1)
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
        history = OmegaHistory(
            keep_last(window_queries, keep, 1),
            keep_last(window_values, keep, 1),
            keep_last(window_weights, keep, 1),
            keep_last(window_valid, keep, 1),
        )
        norms = torch.stack(gradient_norms).sum(0) if gradient_norms else None
        return MemoryRead(torch.cat(outputs, dim=1), memory, momentum, norms, history)

    def _read_and_learn_in_place(
        self, inputs: MemoryInputs, state: AtlasMAGLayerState, schedule: list[TTLUpdate]
    ) -> MemoryRead:
        """`read_and_learn` for one new position when the Omega history is a full ring buffer (decoding): only an
        update (every `ttl_chunk_size` tokens) reads the history, joined to the new position. Returns the output,
        the memory and momentum after the step and the update's gradient norms (or None)."""
        queries, values, token_weights, token_mask = inputs
        memory = state.memory if state.memory is not None else self.initial_state(queries.shape[0])
        output = memory_forward(memory, queries, self.config)[0]
        if not schedule:
            return MemoryRead(output, memory, state.momentum, None)
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
        return MemoryRead(output, memory, momentum, norms)

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
