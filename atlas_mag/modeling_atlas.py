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

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .cache_atlas import AtlasMAGCache, AtlasMAGLayerState, AttentionWindow, CallPlan, extend
from .configuration_atlas import AtlasMAGConfig
from .memory_atlas import AtlasMAGMemory, MemoryStep
from .ops_atlas import StepRates, apply_rotary, columns, sliding_window_attention

# ---------------------------------------------------------------------------------------------------------------
# Outputs and arguments
# ---------------------------------------------------------------------------------------------------------------

# The name under which the installed Transformers passes the cache to `forward` and returns it in outputs:
# `cache` from 5.24 on, `past_key_values` before. Our forwards take both and return it under this one.
CACHE_FIELD = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else "past_key_values"

# Why `init_continuous_batching` refuses (see AtlasMAGForCausalLM).
CONTINUOUS_BATCHING_UNSUPPORTED = (
    "Atlas-MAG does not support continuous batching: the paged cache it runs on (PagedAttentionCache) holds attention "
    "keys and values only, not the memory each sequence learns during the forward pass (AtlasMAGCache); generate one "
    "request at a time (for `transformers serve`, leave out --continuous-batching)"
)

# Keyword arguments that `generate`, `Trainer` or pipelines pass and that mean nothing to Atlas-MAG; any other
# unknown keyword is an error (a renamed argument must never vanish into **kwargs).
IGNORED_FORWARD_ARGUMENTS = {
    # `generate` before 5.24 passes the new tokens' cache positions; the cache knows each sequence's positions.
    "cache_position": "positions come from the cache and the attention mask",
    # Generation and pipelines pass False; True is refused below (there are no attention weights to return).
    "output_attentions": "Atlas-MAG returns no attention weights",
    # `generate(..., tokenizer=...)` (for `stop_strings`; `transformers serve` always passes one) hands it on to
    # every forward with the model inputs.
    "tokenizer": "used by generate's stopping criteria, not by the model",
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


# ---------------------------------------------------------------------------------------------------------------
# Small layers
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Blocks and models
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LayerStep:
    """What a block returns: its output, its new state (in-place writes pending until the call commits) and each
    sequence's summed TTL gradient norm over the call's updates ([B], None if it made none)."""

    hidden_states: torch.Tensor
    state: AtlasMAGLayerState
    gradient_norms: torch.Tensor | None

    def gradient_norm_sums(self, batch_size: int) -> torch.Tensor:
        if self.gradient_norms is not None:
            return self.gradient_norms
        return torch.zeros(batch_size, device=self.hidden_states.device)


class QKV(NamedTuple):
    """Attention's projections of the new positions, each [B, heads, T, head_dim]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


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

    def project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> QKV:
        """q and k (normalised, rotated) and v, each [B, H, T, D]."""
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = apply_rotary(self.q_norm(heads(self.q_proj(hidden_states))), cos, sin)
        key = apply_rotary(self.k_norm(heads(self.k_proj(hidden_states))), cos, sin)
        return QKV(query, key, heads(self.v_proj(hidden_states)))

    def attend(
        self, qkv: QKV, token_mask: torch.Tensor, state: AtlasMAGLayerState, in_place: bool, config: AtlasMAGConfig
    ) -> tuple[torch.Tensor, AtlasMAGLayerState]:
        """The attention output over the cached window and the new positions, and the state holding the window
        for the next call (`in_place`: a decoding step over a full window, see `_attend_in_place`)."""
        new = AttentionWindow(qkv.key, qkv.value, token_mask)
        if in_place:
            return self._attend_in_place(qkv.query, new, state)
        window = extend(state.attention, new)
        attended = sliding_window_attention(qkv.query, window.keys, window.values, window.valid, self.sliding_window)
        return self.o_proj(_merge_heads(attended)), state.with_attention(window, config)

    def _attend_in_place(
        self, query: torch.Tensor, new: AttentionWindow, state: AtlasMAGLayerState
    ) -> tuple[torch.Tensor, AtlasMAGLayerState]:
        """`attend` for one new position when the cached window is a full ring buffer (decoding): the query sees
        every cached real token and itself (softmax is blind to the keys' order), and the new key, value and
        validity become writes over the oldest slot (pending in the new state) instead of a concatenated copy of
        the window."""
        cached = state.attention
        scale = self.head_dim**-0.5
        scores = torch.matmul(query, cached.keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~cached.valid[:, None, None, :], float("-inf"))
        own_score = (query * new.keys).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([scores, own_score], dim=-1), dim=-1, dtype=torch.float32)
        weights = weights.to(new.values.dtype)
        attended = torch.matmul(weights[..., :-1], cached.values) + weights[..., -1:] * new.values
        return self.o_proj(_merge_heads(attended)), state.with_attention_ring_write(new)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)


class AtlasMAGTTLRates(nn.Module):
    """The inner optimiser's data-dependent rates (`ttl_data_dependent_rates`): per token, from the block's normed
    input, the learning rate `2 ttl_lr sigmoid(.)`, the momentum `sigmoid(.)` and the decay `sigmoid(.)`. Its
    weights start at zero and its biases at the config's constants (`initial_bias`)."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(3, config.hidden_size))
        self.bias = nn.Parameter(self.initial_bias(config))

    @staticmethod
    def initial_bias(config: AtlasMAGConfig) -> torch.Tensor:
        """The logits at which the rates equal `ttl_lr`, `ttl_momentum` and `ttl_decay`."""
        return torch.logit(torch.tensor([0.5, config.ttl_momentum, config.ttl_decay], dtype=torch.float64)).float()

    def forward(self, normed: torch.Tensor) -> StepRates:
        """The rates [B, T] each of the tokens `normed` [B, T, hidden], in fp32."""
        gates = torch.sigmoid(F.linear(normed.float(), self.weight.float(), self.bias.float()))
        return StepRates(2.0 * self.config.ttl_lr * gates[..., 0], gates[..., 1], gates[..., 2])


class AtlasMAGBlock(GradientCheckpointingLayer):
    """One Atlas-MAG block. The block is a pure function of (hidden states, layer state): it returns the new
    state instead of writing a cache, so gradient checkpointing can replay it."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = AtlasMAGAttention(config)
        if config.use_memory:
            self.gamma_gate = nn.Sequential(
                nn.Linear(config.hidden_size, config.gamma_gate_hidden_size, bias=False),
                nn.SiLU(),
                nn.Linear(config.gamma_gate_hidden_size, 1, bias=False),
            )
            self.memory = AtlasMAGMemory(config)
            if config.ttl_data_dependent_rates:
                self.ttl_rates = AtlasMAGTTLRates(config)
        self.post_attention_norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = AtlasMAGMLP(config)

    def forward(self, hidden_states: torch.Tensor, layer_state: AtlasMAGLayerState | None, call: CallPlan) -> LayerStep:
        """The block's output and new state. Which path runs is decided once, here: a one-token step under no_grad
        with a cache (`call.in_place`) uses full histories as ring buffers (in-place writes pending in the new
        state, for the model to commit); any other call appends to the histories and keeps their last entries."""
        state = layer_state if layer_state is not None else AtlasMAGLayerState()
        uses_memory = self.config.use_memory and call.memory_gate
        attention_full, memory_full = state.ring_ready(self.config)
        attention_ring = call.in_place and attention_full
        memory_ring = call.in_place and uses_memory and memory_full
        state = state.prepare(attention_ring, memory_ring)
        gradient_norms = None
        normed = self.input_norm(hidden_states)
        qkv = self.self_attn.project(normed, call.cos, call.sin)
        if uses_memory:
            memory_output, state, gradient_norms = self._read_memory(normed, qkv, call, state, memory_ring)
            if self.config.block_type == "mal":
                # Memory as layer: the memory's output joins the attention input.
                qkv = self.self_attn.project(normed + memory_output.to(normed.dtype), call.cos, call.sin)
        attn_output, state = self.self_attn.attend(qkv, call.token_mask, state, attention_ring, self.config)
        if uses_memory and self.config.block_type == "mag":
            attn_output = attn_output * torch.sigmoid(memory_output).to(hidden_states.dtype)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_norm(hidden_states))
        return LayerStep(hidden_states, state, gradient_norms)

    def _read_memory(
        self, normed: torch.Tensor, qkv: QKV, call: CallPlan, state: AtlasMAGLayerState, in_place: bool
    ) -> MemoryStep:
        """The memory's output (it learns on the way, per `call.schedule`) from the gamma weights of the new
        positions and the attention's projections, in fp32."""
        gamma = torch.sigmoid(self.gamma_gate(normed).squeeze(-1).float())
        # Memory math stays fp32 under mixed precision too: degree-2 features overflow in half precision, and a
        # decay of 0.999 rounds to 1 in bf16.
        with torch.autocast(device_type=normed.device.type, enabled=False):
            rates = self.ttl_rates(normed) if self.config.ttl_data_dependent_rates else None
            query, key, value = (_merge_heads(x).float() for x in qkv)
            return self.memory.block_forward(
                query,
                key,
                value,
                gamma * call.token_mask,
                call.token_mask,
                state,
                call.schedule,
                in_place,
                call.keeps_memory,
                rates,
            )


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

    def compile_by_chunk(self, **compile_options: Any) -> None:
        """Compile each block (`torch.compile` with `compile_options`) so that serving any prompt length reuses
        the same graphs: multi-token calls then run every block one TTL chunk at a time, so every whole chunk of
        every prompt has the shapes of a few graphs compiled in warm-up (the first chunks, while the windows
        fill, and the steady state); the ragged chunks at a call's ends run eagerly, and one-token (decoding)
        steps run compiled as they are. Compiling the blocks alone instead unrolls a call's TTL chunk loop, so each
        new prompt length compiles anew."""
        backbone = self.base_model
        backbone.runs_by_chunk = True
        for block in backbone.layers:
            block.compile(**compile_options)

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
        elif isinstance(module, AtlasMAGTTLRates):
            init.zeros_(module.weight)
            init.copy_(module.bias, module.initial_bias(self.config))
        elif isinstance(module, AtlasMAGModel):
            init.zeros_(module.w_init)


class AtlasMAGModel(AtlasMAGPreTrainedModel):
    """The Atlas-MAG backbone: embeddings (plus the learned offset `w_init`), the blocks and the final norm."""

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.w_init = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(AtlasMAGBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = AtlasMAGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Set by `compile_by_chunk`: multi-token calls run each block one TTL chunk at a time.
        self.runs_by_chunk = False
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
        inputs_embeds = self._input_embeddings(input_ids, inputs_embeds)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = resolve_cache_argument(cache, past_key_values)
        call = CallPlan.for_call(self.config, inputs_embeds, attention_mask, cache, use_cache, ttl, memory_gate)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        hidden_states = inputs_embeds + self.w_init
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        steps = []
        for layer, layer_state in zip(self.layers, call.layer_states(), strict=True):
            step = self._layer_step(layer, hidden_states, layer_state, call)
            hidden_states = step.hidden_states
            steps.append(step)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        norm_sums = torch.stack([step.gradient_norm_sums(inputs_embeds.shape[0]) for step in steps], dim=1)
        self._check_finite(inputs_embeds, [step.hidden_states for step in steps], norm_sums)
        call.commit([step.state for step in steps])  # the cache changes only once the whole call has succeeded
        return AtlasMAGModelOutput(
            last_hidden_state=self.norm(hidden_states),
            hidden_states=all_hidden_states,
            ttl_gradient_norms=(norm_sums / call.update_counts()[:, None]).detach(),
            **{CACHE_FIELD: call.cache},
        )

    def _layer_step(
        self, layer: AtlasMAGBlock, hidden_states: torch.Tensor, layer_state: AtlasMAGLayerState | None, call: CallPlan
    ) -> LayerStep:
        """`layer` over the call: at once, or (`runs_by_chunk`, a multi-token call) one TTL chunk after another,
        each piece continuing the state the previous one returned, which gives the same outputs and state."""
        if not self.runs_by_chunk or hidden_states.shape[1] == 1:
            return layer(hidden_states, layer_state, call)
        chunk_size = self.config.ttl_chunk_size
        steps = []
        for start, end in call.chunk_pieces(chunk_size):
            # A ragged piece (at a call's ends) runs eagerly: compiled, each of its lengths would compile anew.
            ragged = end - start != chunk_size
            with torch.compiler.set_stance("force_eager") if ragged else nullcontext():
                step = layer(columns(hidden_states, 1, start, end), layer_state, call.piece(start, end))
            layer_state = step.state
            steps.append(step)
        norms = [step.gradient_norms for step in steps if step.gradient_norms is not None]
        return LayerStep(
            torch.cat([step.hidden_states for step in steps], dim=1),
            layer_state,
            torch.stack(norms).sum(0) if norms else None,
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

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused with a clear error: continuous batching (`generate_batch`, `transformers serve
        --continuous-batching`) packs all requests into one batch over a `PagedAttentionCache`, which pages
        attention keys and values only; the memory each sequence learns (its `AtlasMAGCache`) has no place in it,
        so the first step would fail deep in the forward."""
        raise NotImplementedError(CONTINUOUS_BATCHING_UNSUPPORTED)

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
