"""The benchmark's analytic FLOP model against torch's own count of the matrix products a forward (and a training
step) runs (the formulas of `torch.utils.flop_counter`), for Atlas-MAG variants and the same-size Llama."""

import pytest
import torch
from conftest import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from transformers import LlamaForCausalLM

from atlas_mag import AtlasMAGForCausalLM
from atlas_mag.benchmark import llama_config_for
from atlas_mag.benchmark.flops import TRAINING_FACTOR, atlas_forward_flops, llama_forward_flops
from atlas_mag.compat import CACHE_FIELD
from atlas_mag.ops_atlas import QUERY_BLOCK

BATCH = 2


class MatmulFlops(TorchDispatchMode):
    """Sums torch's own FLOP formulas (`torch.utils.flop_counter.flop_registry`: mm, bmm, baddbmm, sdpa, ...)
    over the ops a call dispatches: `FlopCounterMode`'s count without its per-module bookkeeping, which makes a
    tiny model's prefill 20x slower."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            # A composite op (linear, matmul) is counted through the ops it decomposes into, as FlopCounterMode does.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted(call):
    """Matmul FLOPs torch counts in `call()`. Attention runs sdpa's math kernel, whose products the counter sees
    (it has no formula for the CPU's fused kernel)."""
    with sdpa_kernel(SDPBackend.MATH), MatmulFlops() as counter:
        call()
    return counter.total


ATLAS_VARIANTS = {
    "published proportions": {},  # Omega window 8 != chunk 4: every update runs its own forward
    "window equals chunk": {"omega_window": 4},  # the read's forward is reused
    "gd": {"memory_optimizer": "gd"},
    "data-dependent rates": {"ttl_data_dependent_rates": True},
    "Gram-space Newton-Schulz": {"ttl_ns_evaluation": "gram"},  # `auto` keeps a tiny model's matrices direct
    "mal": {"block_type": "mal"},
    "deep memory": {"memory_depth": 2, "memory_hidden_size": 12},
    "attention only": {"use_memory": False},
}


@pytest.mark.parametrize(
    "variant, ttl", [*((variant, True) for variant in ATLAS_VARIANTS), ("published proportions", False)]
)
def test_atlas_prefill_and_decoding_flops_are_the_counted_matmul_flops(variant, ttl):
    """Exactly: a prefill crossing several chunks (logits of the last position), then decoding steps over full
    windows, at an update and between updates."""
    model = AtlasMAGForCausalLM(tiny_config(num_hidden_layers=1, **ATLAS_VARIANTS[variant])).eval()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (BATCH, 20))
    with torch.inference_mode():
        prefill = counted(lambda: model(ids[:, :17], ttl=ttl, logits_to_keep=1))
        assert prefill == BATCH * atlas_forward_flops(config, 17, 0, ttl, logits=1).total
        # The windows are full (the ring-buffer paths); the step at position 19 ends a chunk.
        cache = model(ids[:, :17], ttl=ttl).cache
        for past in range(17, 20):
            step = counted(lambda p=past: model(ids[:, p : p + 1], cache=cache, ttl=ttl))
            assert step == BATCH * atlas_forward_flops(config, 1, past, ttl).total, past


def test_atlas_flops_of_a_prompt_longer_than_a_query_block():
    config = tiny_config(sliding_window=64, omega_window=64, ttl_chunk_size=64, num_hidden_layers=1)
    model = AtlasMAGForCausalLM(config).eval()
    length = QUERY_BLOCK + 44
    ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.inference_mode():
        assert counted(lambda: model(ids)) == atlas_forward_flops(config, length).total


@pytest.mark.parametrize("variant, exact", [("published proportions", True), ("mal", False)])
def test_a_training_step_costs_three_forwards_of_the_differentiated_products(variant, exact):
    """Forward + backward: the backward pays every differentiated product twice (both operands' gradients); the
    TTL updates run outside autograd. Exact for `mag` blocks; a `mal` block's first value projection feeds only
    the TTL targets and gets no backward (1.3% less than charged here)."""
    model = AtlasMAGForCausalLM(tiny_config(**ATLAS_VARIANTS[variant])).train()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, 18))
    total = counted(lambda: model(ids, labels=ids).loss.backward())
    forward = atlas_forward_flops(model.config, 18)
    learned = forward.memory_gradients + forward.newton_schulz
    expected = BATCH * (TRAINING_FACTOR * (forward.total - learned) + learned)
    assert total == (expected if exact else pytest.approx(expected, rel=0.02))


def test_llama_flops_are_the_counted_matmul_flops():
    """Decoding steps and a prefill, the prefill up to the upper triangle of the causal scores, which the counter
    charges (it counts sdpa's whole square) and the model does not (a causal kernel skips it). To 0.1%: Transformers
    5.1's Llama computes its RoPE angles with a small matmul (head_dim FLOPs per position), which the counter
    charges and the model's FLOPs leave out."""
    config = llama_config_for(tiny_config(), 64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, 12))
    with torch.inference_mode():
        prefill = counted(lambda: model(ids[:, :10], logits_to_keep=1))
        upper = config.num_hidden_layers * 4 * config.hidden_size * (10 * 10 - 10 * 11 // 2)
        expected = BATCH * (llama_forward_flops(config, 10, 0, logits=1).total + upper)
        assert prefill == pytest.approx(expected, rel=1e-3)
        cache = getattr(model(ids[:, :10], use_cache=True), CACHE_FIELD)
        for past in (10, 11):
            step = counted(lambda p=past: model(ids[:, p : p + 1], use_cache=True, **{CACHE_FIELD: cache}))
            assert step == pytest.approx(BATCH * llama_forward_flops(config, 1, past).total, rel=1e-3)
