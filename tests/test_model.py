"""The core model: reference equivalence, causal per-sequence TTL, cache and decoding, training, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, word_tokenizer
from reference_forward import reference_logits
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from atlas_mag import AtlasMAGCache, AtlasMAGConfig, AtlasMAGForCausalLM, ops_atlas
from atlas_mag.cache_atlas import CallPlan
from atlas_mag.compat import disable_activation_checkpointing, enable_activation_checkpointing
from atlas_mag.modeling_atlas import CACHE_FIELD
from atlas_mag.ops_atlas import ttl_schedule, unpadded_ttl_schedule

# Variants of the Atlas family (issue 7) that every equivalence and isolation test runs over.
VARIANTS = {
    "mag-muon": {},
    "omeganet-gd": {"memory_optimizer": "gd"},
    "taylor": {"feature_map": "taylor"},
    "degree3-deep": {"poly_degree": 3, "memory_depth": 2, "memory_key_dim": 4, "poly_rank": 16},
    "mal": {"block_type": "mal"},
    "bptu": {"ttl_backprop_through_updates": True},
    # Data-dependent rates with plain descent: with Muon some random rates leave the model so ill-conditioned that a
    # 1e-7 relative change of the embeddings moves its logits by up to 6e-4, beyond these tests' tolerances (which
    # token's rates an update takes does not depend on the optimiser; test_memory checks both with rates).
    "rates-gd": {"ttl_data_dependent_rates": True, "memory_optimizer": "gd"},
    "rates-gd-bptu": {"ttl_data_dependent_rates": True, "memory_optimizer": "gd", "ttl_backprop_through_updates": True},
}


def make_model(**overrides) -> AtlasMAGForCausalLM:
    model = AtlasMAGForCausalLM(tiny_config(**overrides)).eval()
    # Random non-trivial norms, scales, offsets and data-dependent rates so every parameter matters in the
    # comparisons.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
            elif "ttl_rates" in name:
                param.normal_(0.0, 0.5)
    return model


def to_reference_layout(model: AtlasMAGForCausalLM) -> dict:
    """Our state dict under the published checkpoint's key names (reference doc, "File layout")."""
    config = model.config
    sd = model.state_dict()
    ref = {
        "tok_emb.weight": sd["model.embed_tokens.weight"],
        "lm_head.weight": sd["lm_head.weight"],
        "w_init": sd["model.w_init"],
        "norm_f.weight": sd["model.norm.weight"],
    }
    names = {
        "norm1.weight": "input_norm.weight",
        "norm2.weight": "post_attention_norm.weight",
        "qkv.w_q.weight": "self_attn.q_proj.weight",
        "qkv.w_k.weight": "self_attn.k_proj.weight",
        "qkv.w_v.weight": "self_attn.v_proj.weight",
        "qkv.q_norm.weight": "self_attn.q_norm.weight",
        "qkv.k_norm.weight": "self_attn.k_norm.weight",
        "w_o.weight": "self_attn.o_proj.weight",
        "ffn.w1.weight": "mlp.gate_proj.weight",
        "ffn.w2.weight": "mlp.up_proj.weight",
        "ffn.w3.weight": "mlp.down_proj.weight",
        "gamma_gate.gate.0.weight": "gamma_gate.0.weight",
        "gamma_gate.gate.2.weight": "gamma_gate.2.weight",
        "memory.proj_down.weight": "memory.proj_down.weight",
        "memory.poly_norm.weight": "memory.poly_norm.weight",
        "memory.poly_norm.bias": "memory.poly_norm.bias",
        "memory.poly_compress.weight": "memory.poly_compress.weight",
        "memory.w2.weight": "memory.mlp.0.weight",
        "memory.w1.weight": "memory.mlp.1.weight",
        "memory.proj_up.weight": "memory.proj_up.weight",
        "memory.output_norm.weight": "memory.output_norm.weight",
        "memory.output_norm.bias": "memory.output_norm.bias",
        "memory.output_scale": "memory.output_scale",
    }
    for i in range(config.num_hidden_layers):
        for ref_name, our_name in names.items():
            if f"model.layers.{i}.{our_name}" in sd:
                ref[f"blocks.{i}.{ref_name}"] = sd[f"model.layers.{i}.{our_name}"]
        if not config.use_memory:
            continue
        ref[f"blocks.{i}.qk_memory.m_persistent"] = config.qk_persistent_scale * torch.eye(config.hidden_size)
        ref[f"blocks.{i}.qk_memory.norm_persistent"] = torch.tensor(config.qk_normalizer_scale * config.hidden_size)
    return ref


def full_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def decode_logits(model, ids, prefill, **kwargs):
    """Prefill `prefill` tokens, then feed the rest one token at a time through the cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True, **kwargs)
        logits = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True, **kwargs)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


# ----------------------------------------------------------------------------------------------- reference


def test_ttl_off_matches_reference_formulas():
    model = make_model()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, 40))  # longer than sliding_window (16) and omega_window (8)
    expected = reference_logits(
        to_reference_layout(model),
        ids[0],
        config.num_hidden_layers,
        config.num_attention_heads,
        window=config.sliding_window,
        omega_window=config.omega_window,
        omega_decay=config.omega_decay,
    )
    actual = full_logits(model, ids, ttl=False)[0]
    assert (actual - expected).abs().max() <= 1e-5


def test_attention_only_ablation_matches_reference():
    model = make_model(use_memory=False)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, 40))
    expected = reference_logits(to_reference_layout(model), ids[0], 2, 4, window=config.sliding_window)
    assert (full_logits(model, ids)[0] - expected).abs().max() <= 1e-5


def test_default_config_is_the_published_model():
    config = AtlasMAGConfig()
    with torch.device("meta"):
        model = AtlasMAGForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 43_356_422
    assert config.feature_size == 2144
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------- causal TTL and cache


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefill", [1, 7, 17])
def test_forward_equals_prefill_plus_decoding(variant, prefill):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (2, 44))  # 11 chunks, longer than the sliding window
    expected = full_logits(model, ids)
    assert (expected - full_logits(model, ids, ttl=False)).abs().max() > 1e-3, "TTL must change the output"
    assert (decode_logits(model, ids, prefill) - expected).abs().max() <= 1e-4


def test_chunked_prefill_through_the_cache_equals_one_forward():
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 45))
    expected = full_logits(model, ids)
    with torch.no_grad():
        cache, pieces = None, []
        for start, end in [(0, 5), (5, 18), (18, 19), (19, 45)]:
            out = model(ids[:, start:end], cache=cache, use_cache=True)
            cache, pieces = out.cache, pieces + [out.logits]
    assert (torch.cat(pieces, 1) - expected).abs().max() <= 1e-4


def test_host_schedule_equals_the_masked_schedule():
    """Without padding the TTL schedule is computed on the host; it is the masked schedule of an all-ones mask,
    and a cache that once saw a mask keeps using the masked one (padding may have shifted its rows)."""
    for first_position in range(9):
        for length in (1, 3, 8, 13):
            positions = (first_position + torch.arange(length)).expand(2, length)
            masked = ttl_schedule(torch.ones(2, length, dtype=torch.bool), positions, 4)
            assert unpadded_ttl_schedule(first_position, length, 4) == masked
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        unmasked = model(ids[:, :9], use_cache=True)
        masked = model(ids[:, :9], attention_mask=torch.ones(2, 9, dtype=torch.long), use_cache=True)
        assert unmasked.cache.unpadded and not masked.cache.unpadded
        rest = [model(ids[:, 9:], cache=out.cache).logits for out in (unmasked, masked)]
    torch.testing.assert_close(rest[0], rest[1], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([unmasked.logits, rest[0]], 1), full_logits(model, ids), rtol=0, atol=1e-5)


def test_updates_are_causal():
    model = make_model()
    chunk = model.config.ttl_chunk_size
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    base = full_logits(model, ids)
    for cut in (3, 4, 13, 30):
        changed = ids.clone()
        changed[:, cut:] = torch.randint(0, model.config.vocab_size, (1, 40 - cut))
        assert torch.equal(full_logits(model, changed)[:, :cut], base[:, :cut]), f"future tokens leaked at {cut}"
    # Tokens of the first chunk read the initial memory; the first update is visible from the next chunk on.
    off = full_logits(model, ids, ttl=False)
    assert torch.equal(base[:, :chunk], off[:, :chunk])
    assert not torch.allclose(base[:, chunk:], off[:, chunk:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_each_sequence_alone(variant):
    model = make_model(**VARIANTS[variant])
    long_ids = torch.randint(4, model.config.vocab_size, (1, 41))
    short_ids = torch.randint(4, model.config.vocab_size, (1, 27))
    pad = 41 - 27
    batch = torch.cat([long_ids, torch.cat([torch.randint(0, 97, (1, pad)), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    batched = full_logits(model, batch, attention_mask=mask)
    assert (batched[0] - full_logits(model, long_ids)[0]).abs().max() <= 1e-4
    assert (batched[1, pad:] - full_logits(model, short_ids)[0]).abs().max() <= 1e-4
    # Another sequence in the batch (or other padding values) never changes a sequence's output.
    other = batch.clone()
    other[0] = torch.randint(4, 97, (41,))
    other[1, :pad] = torch.randint(0, 97, (pad,))
    assert (full_logits(model, other, attention_mask=mask)[1, pad:] - batched[1, pad:]).abs().max() <= 1e-5


def test_left_padded_decoding_equals_full_forward():
    model = make_model()
    batch = torch.randint(4, 97, (2, 30))
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    expected = full_logits(model, batch, attention_mask=mask)
    with torch.no_grad():
        out = model(batch[:, :12], attention_mask=mask[:, :12], use_cache=True)
        pieces = [out.logits]
        for t in range(12, 30):
            out = model(batch[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
            pieces.append(out.logits)
    got = torch.cat(pieces, 1)
    assert (got[0] - expected[0]).abs().max() <= 1e-4
    assert (got[1, 9:] - expected[1, 9:]).abs().max() <= 1e-4


def test_ttl_runs_in_every_mode_and_never_touches_parameters():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 30))
    reference = full_logits(model, ids)
    with torch.inference_mode():
        inference = model(ids).logits
        model.generate(ids, max_new_tokens=12, do_sample=False)
    model.train()
    training = model(ids).logits.detach()
    model.eval()
    assert torch.allclose(inference, reference, atol=1e-6)
    assert torch.allclose(training, reference, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_training_after_serving_under_inference_mode():
    """The model's cached constants (monomial indices, block masks, Omega decay weights) are first built here under
    inference_mode, prefill and decoding; a training step afterwards must still be able to save them."""
    for value in vars(ops_atlas).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.inference_mode():
        cache = model(ids[:, :20]).cache
        for t in range(20, 30):
            model(ids[:, t : t + 1], cache=cache)
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_two_calls_never_share_memory():
    model = make_model()
    a = torch.randint(0, 97, (1, 30))
    b = torch.randint(0, 97, (1, 30))
    first = full_logits(model, a)
    full_logits(model, b)
    assert torch.equal(full_logits(model, a), first)


def test_cache_size_does_not_grow():
    model = make_model(num_hidden_layers=1, ttl_chunk_size=64)
    cache = model(torch.randint(0, 97, (1, 20))).cache
    sizes = {}
    with torch.inference_mode():
        for step in range(1, 8001):
            cache = model(torch.randint(0, 97, (1, 1)), cache=cache).cache
            if step in (2000, 8000):
                sizes[step] = cache.nbytes()
    assert sizes[2000] == sizes[8000] > 0
    assert cache.get_seq_length() == 8020


class _RecordOps(TorchDispatchMode):
    """Records every dispatched operation with the shapes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.calls.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_decoding_runs_the_same_operations_at_any_context():
    """Constant-cost decoding, checked without a clock: a chunk of decoding steps (one memory update included)
    dispatches the same operations on tensors of the same shapes after 40 and after 400 tokens of context."""
    model = make_model()
    chunk = model.config.ttl_chunk_size
    recorded = []
    for context in (40, 400):
        ids = torch.randint(0, model.config.vocab_size, (2, context + chunk))
        first, *tokens = ids[:, context:].split(1, dim=1)
        with torch.no_grad():
            cache = model(ids[:, :context]).cache
            model(first, cache=cache)  # fills the model's small caches (decay table) on first use
            with _RecordOps() as ops:
                for token in [*tokens, first]:
                    model(token, cache=cache)
        recorded.append(ops.calls)
    assert recorded[0] == recorded[1]
    assert sum("baddbmm" in name for name, _ in recorded[0]) > 0  # the chunk includes a Muon update


def test_memory_math_is_fp32_under_bf16():
    model = make_model().to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    state = out.cache.layers[0].state
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(t.dtype == torch.float32 for t in state.memory.tensors())
    assert state.omega.queries.dtype == torch.float32


def test_data_dependent_rates_are_fp32_under_autocast():
    """Under bf16 autocast the rates are still computed in fp32 (a decay of 0.999 is 1.0 in bf16)."""
    model = AtlasMAGForCausalLM(tiny_config(ttl_data_dependent_rates=True)).eval()  # rates = the constants
    captured = []
    model.model.layers[0].ttl_rates.register_forward_hook(lambda module, args, rates: captured.append(rates))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (1, 12)))
    (rates,) = captured
    assert all(rate.dtype == torch.float32 for rate in rates)
    torch.testing.assert_close(rates.decay, torch.full_like(rates.decay, model.config.ttl_decay), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ generate


def manual_greedy(model, ids, steps, **kwargs):
    for _ in range(steps):
        next_id = full_logits(model, ids, **kwargs)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_generate_greedy_equals_manual_loop_and_ttl_matters():
    model = make_model(initializer_range=0.2)  # larger weights: a random model that does not repeat one token
    prompt = torch.randint(4, 97, (1, 23))
    with torch.inference_mode():
        on = model.generate(prompt, max_new_tokens=15, do_sample=False)
        off = model.generate(prompt, max_new_tokens=15, do_sample=False, ttl=False)
    assert torch.equal(on, manual_greedy(model, prompt, 15))
    assert torch.equal(off, manual_greedy(model, prompt, 15, ttl=False))
    assert not torch.equal(on, off)


def test_generate_with_cache_equals_generate_without_cache():
    """Beam search (cache reordering), sampling with several return sequences and left-padded batches decode
    the same with the cache as by recomputing every prefix."""
    model = make_model()
    prompt = torch.randint(4, 97, (2, 19))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    settings = [
        dict(num_beams=3, do_sample=False, num_return_sequences=2),
        dict(do_sample=True, top_k=20, num_return_sequences=3),
        dict(do_sample=False),
    ]
    for kwargs in settings:
        results = []
        for use_cache in (True, False):
            torch.manual_seed(1)
            with torch.no_grad():
                results.append(
                    model.generate(prompt, attention_mask=mask, max_new_tokens=9, use_cache=use_cache, **kwargs)
                )
        assert torch.equal(results[0], results[1]), kwargs


def test_generation_continues_from_returned_cache():
    model = make_model()
    prompt = torch.randint(4, 97, (1, 21))
    with torch.no_grad():
        whole = model.generate(prompt, max_new_tokens=12, do_sample=False)
        first = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        cache = getattr(first, CACHE_FIELD)  # generate's own output: the installed release's name
        assert isinstance(cache, AtlasMAGCache)
        resumed = model.generate(first.sequences, max_new_tokens=7, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(resumed, whole)


def test_pipeline_generates_with_ttl(tmp_path):
    from transformers import pipeline

    tokenizer = word_tokenizer()
    model = make_model(initializer_range=0.2)
    prompt = " ".join(f"w{i}" for i in torch.randint(4, 97, (30,)).tolist())
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    on = generator(prompt, max_new_tokens=10, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    off = generator(prompt, max_new_tokens=10, do_sample=False, return_tensors=True, ttl=False)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    assert list(on) == manual_greedy(model, ids, 10)[0].tolist()
    assert list(on) != list(off[0]["generated_token_ids"])


# ------------------------------------------------------------------------------------------------ training


def test_loss_follows_the_transformers_convention():
    model = make_model()
    ids = torch.randint(0, 97, (2, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.ttl_gradient_norms.shape == (2, model.config.num_hidden_layers) and (out.ttl_gradient_norms > 0).all()
    assert torch.allclose(model(ids, logits_to_keep=3).logits, out.logits[:, -3:], atol=1e-6)


@pytest.mark.parametrize("through_updates", [False, True])
def test_outer_loss_trains_memory_and_checkpointing_gives_same_gradients(through_updates):
    model = make_model(ttl_backprop_through_updates=through_updates).train()
    ids = torch.randint(0, 97, (2, 30))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    enable_activation_checkpointing(model)
    checkpointed = gradients()
    disable_activation_checkpointing(model)
    assert plain.keys() == checkpointed.keys()
    assert {n for n, _ in model.named_parameters()} == set(plain), "every parameter gets a gradient"
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
    memory_grad = plain["model.layers.0.memory.poly_compress.weight"]
    assert torch.isfinite(memory_grad).all() and memory_grad.abs().sum() > 0


@pytest.mark.parametrize("through_updates", [False, True])
def test_a_call_without_cache_skips_only_the_last_update(monkeypatch, through_updates):
    """Without a cache nothing reads the memory after the call, so its last update (the one after the last
    position) computes gradient norms only. Against a call that keeps a cache (every update made): the same loss,
    logits, TTL gradient norms and outer gradients, and exactly one memory step fewer per layer."""
    import atlas_mag.memory_atlas as memory_module

    steps = []

    def counting_update(*args, **kwargs):
        steps.append(1)
        return ops_atlas.omega_update(*args, **kwargs)

    monkeypatch.setattr(memory_module, "omega_update", counting_update)
    model = make_model(ttl_backprop_through_updates=through_updates).train()
    ids = torch.randint(0, 97, (2, 28))  # 7 chunks of 4: the 7th update ends on the last position

    def run(use_cache):
        steps.clear()
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=use_cache)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, len(steps)

    kept, kept_grads, kept_steps = run(use_cache=True)
    skipped, skipped_grads, skipped_steps = run(use_cache=False)
    layers = model.config.num_hidden_layers
    assert (kept_steps, skipped_steps) == (7 * layers, 6 * layers)
    assert kept.cache is not None and skipped.cache is None
    torch.testing.assert_close(skipped.loss, kept.loss, rtol=0, atol=0)
    torch.testing.assert_close(skipped.logits, kept.logits, rtol=0, atol=0)
    torch.testing.assert_close(skipped.ttl_gradient_norms, kept.ttl_gradient_norms, rtol=0, atol=0)
    assert skipped_grads.keys() == kept_grads.keys()
    for name, grad in kept_grads.items():
        # The skipped step's decay term carries no gradient to the loss (nothing reads its memory).
        torch.testing.assert_close(skipped_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer", ["muon", "gd"])
def test_data_dependent_rates_start_as_the_constants_and_are_learnt(optimizer):
    """A new model with data-dependent rates computes what the constant-rate model computes (zero weights,
    biases at the constants); the outer loss reaches the rates' weights, and rates that vary with the input change
    the output."""
    torch.manual_seed(0)
    constant = AtlasMAGForCausalLM(tiny_config(memory_optimizer=optimizer))
    torch.manual_seed(0)
    varying = AtlasMAGForCausalLM(tiny_config(memory_optimizer=optimizer, ttl_data_dependent_rates=True))
    rate_names = {name for name, _ in varying.named_parameters() if "ttl_rates" in name}
    assert rate_names and set(varying.state_dict()) - rate_names == set(constant.state_dict())
    varying.load_state_dict(constant.state_dict(), strict=False)
    ids = torch.randint(0, constant.config.vocab_size, (2, 30))
    expected = constant(ids, labels=ids)
    got = varying(ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    assert (expected.logits - full_logits(constant, ids, ttl=False)).abs().max() > 1e-3
    got.loss.backward()
    for layer in varying.model.layers:
        assert layer.ttl_rates.weight.grad.abs().max() > 0 and layer.ttl_rates.bias.grad.abs().max() > 0
    with torch.no_grad():
        for layer in varying.model.layers:
            layer.ttl_rates.weight.normal_(0.0, 0.5)
    assert (full_logits(varying, ids) - expected.logits).abs().max() > 1e-3


def test_backprop_through_updates_changes_the_gradient():
    ids = torch.randint(0, 97, (2, 30))
    grads = []
    for through in (False, True):
        torch.manual_seed(0)
        model = make_model(ttl_backprop_through_updates=through).train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].memory.proj_down.weight.grad)
    assert not torch.allclose(grads[0], grads[1])


# ------------------------------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, AtlasMAGForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AtlasMAGConfig)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_attention_heads", 5),
        ("poly_degree", 0),
        ("poly_rank", 10_000),
        ("sliding_window", 0),
        ("omega_window", -1),
        ("ttl_chunk_size", 0),
        ("ttl_lr", -0.1),
        ("ttl_decay", 0.0),
        ("ttl_decay", 1.5),
        ("ttl_momentum", 1.0),
        ("memory_optimizer", "adam"),
        ("ttl_ns_evaluation", "eigh"),
        ("feature_map", "fourier"),
        ("block_type", "mac"),
        ("memory_depth", -1),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field, value", [("ttl_momentum", 0.0), ("ttl_decay", 1.0)])
def test_data_dependent_rates_refuse_constants_without_a_logit(field, value):
    with pytest.raises(ValueError, match=f"`{field}`.*ttl_data_dependent_rates"):
        tiny_config(ttl_data_dependent_rates=True, **{field: value})


def test_bad_inputs_are_caught_with_a_message():
    model = make_model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 3))


def _histories(cache):
    parts = [part for layer in cache.layers for part in (layer.state.attention, layer.state.qk, layer.state.omega)]
    return [tensor for part in parts for tensor in part.tensors()]


def test_decoding_writes_the_windows_in_place():
    """Once the windows are full, a decoding step writes the new position over the oldest one: the cached
    history tensors keep their storage from token to token (no copy of the window per token), TTL updates
    included, and the logits still equal the full forward (test_forward_equals_prefill_plus_decoding)."""
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        cache = model(ids[:, :20]).cache
        model(ids[:, 20:21], cache=cache)  # the first in-place step takes its own copy of the windows
        pointers = [tensor.data_ptr() for tensor in _histories(cache)]
        for t in range(21, 40):
            model(ids[:, t : t + 1], cache=cache)
        assert [tensor.data_ptr() for tensor in _histories(cache)] == pointers
        state = cache.layers[0].state
        assert state.attention_ring_steps == state.memory_ring_steps == 20
        # A step of several tokens puts the windows back in time order and copies.
        continued = model(ids[:, :2], cache=cache).logits
        expected = model(torch.cat([ids, ids[:, :2]], 1), use_cache=False).logits[:, -2:]
    torch.testing.assert_close(continued, expected, rtol=0, atol=1e-4)


def test_nan_during_an_in_place_decoding_step_leaves_the_cache_as_it_was():
    model = make_model()
    chunk = model.config.ttl_chunk_size
    ids = torch.randint(0, model.config.vocab_size, (1, 4 * chunk + 8))
    with torch.no_grad():
        cache = model(ids[:, : 3 * chunk]).cache
        for t in range(3 * chunk, 4 * chunk - 1):  # up to the token before the next update
            model(ids[:, t : t + 1], cache=cache)
        assert cache.layers[1].state.memory_ring_steps > 0
        cache.memory_states()[1].poly_compress[0, 0, 0] = float("nan")
        before = [t.clone() for t in cache.state_tensors()]
        with pytest.raises(FloatingPointError, match="layer 1"):
            model(ids[:, 4 * chunk - 1 : 4 * chunk], cache=cache)
    after = list(cache.state_tensors())
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_nan_in_memory_is_caught():
    model = make_model()
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (1, 6))).cache  # one update: the cache owns its memory
    cache.memory_states()[1].poly_compress[0, 0, 0] = float("nan")  # a poisoned memory
    before = [t.clone() for t in cache.state_tensors()]
    with pytest.raises(FloatingPointError, match="layer 1"):
        model(torch.randint(0, 97, (1, 12)), cache=cache)
    after = list(cache.state_tensors())
    assert cache.get_seq_length() == 6 and len(before) == len(after)
    for a, b in zip(before, after, strict=True):  # a failed call leaves the cache as it was
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("atlas-mag-43m", 43_356_422),
        ("atlas-small", 170_057_232),
        ("atlas-medium", 405_351_448),
        ("atlas-large", 764_249_751),
    ],
)
def test_presets_have_their_documented_size(name, parameters):
    with torch.device("meta"):
        model = AtlasMAGForCausalLM(AtlasMAGConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="atlas-small"):
        AtlasMAGConfig.from_preset("atlas-huge")
    assert AtlasMAGConfig.from_preset("atlas-small", memory_optimizer="gd").memory_optimizer == "gd"


def test_removing_the_memory_gate_gives_plain_residual_attention():
    model = make_model()
    ids = torch.randint(0, 97, (1, 30))
    gated = full_logits(model, ids)
    removed = full_logits(model, ids, memory_gate=False)
    reference = to_reference_layout(model)
    ablated = {k: v for k, v in reference.items() if ".memory." not in k and "gamma_gate" not in k}
    config = model.config
    expected = reference_logits(ablated, ids[0], 2, 4, window=config.sliding_window)
    assert (removed[0] - expected).abs().max() <= 1e-5
    assert not torch.allclose(gated, removed)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, memory_gate=False)
    assert torch.equal(generated, manual_greedy(model, ids, 5, memory_gate=False))


def test_compiled_ttl_forward_breaks_only_at_the_nan_check():
    """torch.compile traces a TTL-on training forward (host-side schedule, constant monomial indices) in one
    graph up to the single finiteness check of the TTL gradients, which must stay a host decision."""
    torch._dynamo.reset()
    model = make_model()
    ids = torch.randint(4, model.config.vocab_size, (1, 6))  # one TTL update per layer
    explanation = torch._dynamo.explain(model)(ids, labels=ids, ttl=True)
    assert explanation.break_reasons, "the finiteness check should be the one graph break"
    assert {reason.user_stack[-1].name for reason in explanation.break_reasons} == {"_check_finite"}


def test_inductor_compiled_prefill_keeps_only_the_windows():
    """Each block compiled by inductor (regional compilation, as the benchmark's `--compile-scope blocks`): the
    logits match eager and the cache holds the same bounded windows, not views of the whole prompt (inductor
    returns the `clone()` of a slice as a view of its buffer). Three TTL chunks, so the compile stays short."""
    torch._dynamo.reset()
    config = tiny_config(ttl_chunk_size=16, omega_window=16)
    model = AtlasMAGForCausalLM(config).eval()
    compiled = AtlasMAGForCausalLM(config).eval()
    compiled.load_state_dict(model.state_dict())
    for block in compiled.model.layers:
        block.compile(backend="inductor")
    ids = torch.randint(4, config.vocab_size, (1, 3 * config.ttl_chunk_size))
    with torch.inference_mode():
        expected = model(ids, ttl=True)
        got = compiled(ids, ttl=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    eager_bytes, compiled_bytes = expected.cache.nbytes(), got.cache.nbytes()
    assert compiled_bytes <= 1.05 * eager_bytes, (compiled_bytes, eager_bytes)


def test_compiled_by_chunk_compiles_nothing_for_a_new_prompt_length():
    """After one warm-up prompt and its decoding, prompts of 2, 3 and 5 TTL chunks (two of them ragged) and their
    decoding compile no graph, and give eager's logits and greedy tokens; compiling the blocks alone compiles
    anew for each new number of chunks (the loop over them is unrolled)."""
    config = tiny_config(ttl_chunk_size=8, omega_window=8)  # 2 chunks already fill the sliding window of 16
    chunk = config.ttl_chunk_size
    torch._dynamo.reset()
    eager = AtlasMAGForCausalLM(config).eval()
    compiled = AtlasMAGForCausalLM(config).eval()
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounter()  # counts the graphs and runs them as captured
    compiled.compile_by_chunk(backend=counter)

    def prefill_and_decode(model, ids):
        with torch.inference_mode():
            logits = model(ids, ttl=True).logits
            tokens = model.generate(ids, max_new_tokens=2 * chunk, do_sample=False)
        return logits, tokens

    prefill_and_decode(compiled, torch.randint(4, config.vocab_size, (1, 3 * chunk)))  # warm-up
    graphs = counter.frame_count
    assert graphs > 0
    for length in (2 * chunk + 3, 3 * chunk, 5 * chunk + 5):
        ids = torch.randint(4, config.vocab_size, (1, length))
        logits, tokens = prefill_and_decode(compiled, ids)
        assert counter.frame_count == graphs, f"{length} tokens compiled {counter.frame_count - graphs} graphs"
        expected_logits, expected_tokens = prefill_and_decode(eager, ids)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
        assert torch.equal(tokens, expected_tokens)

    torch._dynamo.reset()
    blocks_counter = CompileCounter()
    for block in compiled.model.layers:
        block.compile(backend=blocks_counter)
    compiled.model.runs_by_chunk = False
    with torch.inference_mode():
        compiled(torch.randint(4, config.vocab_size, (1, chunk)), ttl=True)
        before = blocks_counter.frame_count
        compiled(torch.randint(4, config.vocab_size, (1, 2 * chunk)), ttl=True)
    assert blocks_counter.frame_count > before


def test_running_by_chunk_gives_the_outputs_of_whole_calls():
    """What `compile_by_chunk` changes besides compiling: each block runs a call one TTL chunk at a time. A
    left-padded batch (cut every chunk of columns, its sequences learning mid-piece) and a call that continues its
    cache from mid-chunk (ragged pieces at both ends) give the logits, TTL gradient norms and learned memory of
    whole calls. A small `ttl_lr`, so that fp32 rounding (the pieces sum attention and Q-K projections in another
    order) is not amplified by what the memory learns."""
    config = tiny_config(ttl_lr=0.02)
    eager = AtlasMAGForCausalLM(config).eval()
    by_chunk = AtlasMAGForCausalLM(config).eval()
    by_chunk.load_state_dict(eager.state_dict())
    by_chunk.model.runs_by_chunk = True
    ids = torch.randint(4, config.vocab_size, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    more = torch.randint(4, config.vocab_size, (2, 11))
    outputs = []
    for model in (by_chunk, eager):
        with torch.inference_mode():
            first = model(ids, attention_mask=mask, ttl=True)
            full_mask = torch.cat([mask, torch.ones_like(more)], dim=1)
            second = model(more, attention_mask=full_mask, cache=first.cache, ttl=True)
        outputs.append((first, second))
    (got_first, got_second), (expected_first, expected_second) = outputs
    for got, expected in ((got_first, expected_first), (got_second, expected_second)):
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.ttl_gradient_norms, expected.ttl_gradient_norms, rtol=1e-5, atol=1e-6)
    for got, expected in zip(got_second.cache.memory_states(), expected_second.cache.memory_states(), strict=True):
        for got_tensor, expected_tensor in zip(got.tensors(), expected.tensors(), strict=True):
            torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-5, atol=1e-6)

    unpadded = torch.randint(4, config.vocab_size, (1, 6))
    continued = torch.randint(4, config.vocab_size, (1, 13))  # positions 6..18: pieces of 2, 4, 4 and 3 tokens
    results = []
    for model in (by_chunk, eager):
        with torch.inference_mode():
            cache = model(unpadded, ttl=True).cache
            results.append(model(continued, cache=cache, ttl=True).logits)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)

    embeds = torch.zeros(1, 13, config.hidden_size)
    with torch.inference_mode():
        cache = eager(unpadded, ttl=True).cache
    continued_plan = CallPlan.for_call(config, embeds, None, cache, True, True, True)
    assert continued_plan.chunk_pieces(4) == [(0, 2), (2, 6), (6, 10), (10, 13)]
    padded_plan = CallPlan.for_call(config, embeds, torch.ones(1, 13), None, True, True, True)
    assert padded_plan.chunk_pieces(4) == [(0, 4), (4, 8), (8, 12), (12, 13)]


def test_torch_export_of_a_cache_free_forward_gives_eager_logits():
    """`torch.export` traces a forward without a cache at the exported shape (TTL on; the exported program skips
    the host-side finiteness check). Decoding with a cache is not exportable: the cache is a Python object."""
    model = make_model()
    ids = torch.randint(4, 97, (1, 12))
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    other = torch.randint(4, 97, (1, 12))
    expected = model(other, use_cache=False).logits
    torch.testing.assert_close(exported.module()(other, use_cache=False).logits, expected, atol=1e-5, rtol=0)


def test_cache_layers_are_transformers_cache_layers():
    """Each layer slot is a real `CacheLayerMixin` (what Transformers' cache utilities expect) and refuses the
    keys/values API it has no use for; offloading a state that is on the CPU already copies nothing, however often
    it is called, and prefetching then leaves it where it is."""
    from transformers.cache_utils import CacheLayerMixin

    model = make_model()
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (2, 20))).cache
    layer = cache.layers[0]
    assert isinstance(layer, CacheLayerMixin) and layer.is_initialized
    with pytest.raises(NotImplementedError, match="AtlasMAGLayerState"):
        layer.update(torch.zeros(1), torch.zeros(1))
    before = list(cache.state_tensors())
    for cached in cache.layers:
        cached.offload()
        cached.offload()
        cached.prefetch()
        assert cached.device is None
    assert all(a is b for a, b in zip(before, cache.state_tensors(), strict=True))
    cache.reset()
    assert not layer.is_initialized and layer.state is None
