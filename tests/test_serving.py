"""`transformers serve` over a saved folder (scripts/serve.py), through the official OpenAI client: greedy answers
equal greedy decoding by full forwards with TTL on (and differ from TTL off), chat works streamed or not,
concurrent requests answer what they answer alone, the served parameters never change, memory stays flat, and
bad requests get an HTTP error without disturbing the next answer."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # the serving extra (`make setup-serving`); Makefile's test-oldest leaves this file out
import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_mag.serving import (
    free_port,
    health,
    install_remote_code_lookup,
    running_server,
    wait_until_healthy,
)

REPOSITORY = Path(__file__).resolve().parent.parent
REQUEST_SECONDS = 60
# 13 words: several TTL chunks (ttl_chunk_size=4) before the first generated token.
LONG_PROMPT = " ".join(f"w{i}" for i in range(5, 18))
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def offline(folder):
    """The saved model and tokenizer, loaded as any user would."""
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def server(folder):
    """scripts/serve.py in a subprocess; yields (process, base URL)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPOSITORY / "scripts" / "serve.py"), str(folder), "--port", str(port)]
    with running_server([*command, "--device", "cpu"], port, folder.parent / "server.log", env) as server:
        yield server


def make_client(url: str) -> openai.OpenAI:
    # No retries: a failed request must show as failed, not be sent again.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_SECONDS, max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    with make_client(server[1]) as client:
        yield client


def greedy_text(offline, prompt_ids: list[int], new_tokens: int, ttl: bool) -> str:
    """Greedy decoding by one forward over the whole sequence per token (no cache), stopping at EOS as generate
    does, decoded as the server decodes."""
    model, tokenizer = offline
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids]), use_cache=False, ttl=ttl).logits[0, -1].argmax())
            generated.append(token)
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(generated, skip_special_tokens=True)


def complete(client, folder, prompt: str, max_tokens: int, stream: bool = False) -> str:
    answer = client.completions.create(
        model=str(folder), prompt=prompt, max_tokens=max_tokens, temperature=0, stream=stream
    )
    if stream:
        return "".join(chunk.choices[0].text for chunk in answer)
    return answer.choices[0].text


def test_greedy_completions_equal_full_forwards_with_ttl_on(client, folder, offline):
    prompt_ids = offline[1](LONG_PROMPT)["input_ids"]
    ttl_on = greedy_text(offline, prompt_ids, NEW_TOKENS, ttl=True)
    # The memory's learning during the prompt changes the answer: serving with TTL off would be caught.
    assert ttl_on != greedy_text(offline, prompt_ids, NEW_TOKENS, ttl=False)
    assert complete(client, folder, LONG_PROMPT, NEW_TOKENS) == ttl_on
    assert complete(client, folder, LONG_PROMPT, NEW_TOKENS, stream=True) == ttl_on


def test_chat_completions_streamed_or_not_follow_the_saved_chat_template(client, folder, offline):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    prompt_ids = offline[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = greedy_text(offline, list(prompt_ids["input_ids"]), NEW_TOKENS, ttl=True)
    answer = client.chat.completions.create(
        model=str(folder), messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model=str(folder), messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected


def test_concurrent_requests_answer_what_they_answer_alone(client, folder):
    # Mixed prompt lengths (inside one window, across windows), answer lengths, streamed or not.
    requests = [
        (" ".join(f"w{4 + (3 * i + j) % 90}" for j in range(2 + 5 * i)), 2 + i, i % 2 == 1) for i in range(8)
    ]
    alone = [complete(client, folder, *request) for request in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda request: complete(client, folder, *request), requests))
    assert together == alone


def test_bad_requests_get_an_http_error_and_leave_the_next_answer_unchanged(client, folder, server):
    before = complete(client, folder, LONG_PROMPT, NEW_TOKENS)
    # An unknown field: refused by the server's validation, with a message.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model=str(folder), prompt="w5", max_tokens=2, extra_body={"bogus": 1})
    assert "Unexpected fields" in refused.value.response.json()["detail"]
    # Parameters generate would refuse (upstream: a bare 500 from the inference thread) get a 400 with the
    # message before anything is generated, streamed or not, on the completions and chat endpoints.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=str(folder), prompt="w5", max_tokens=-1, stream=stream)
        assert "max_new_tokens" in refused.value.response.json()["detail"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "w5"}], max_tokens=0)
    assert "max_new_tokens" in refused.value.response.json()["detail"]
    # A client that leaves mid-stream: the generation is cancelled at its next token.
    stream = client.completions.create(model=str(folder), prompt=LONG_PROMPT, max_tokens=500, stream=True)
    next(iter(stream))
    stream.close()
    assert health(server[1]) == 200
    assert complete(client, folder, LONG_PROMPT, NEW_TOKENS) == before


def test_resident_memory_stays_flat_over_many_requests(client, folder, server):
    def resident_kib() -> int:
        status = Path(f"/proc/{server[0].pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    first = complete(client, folder, LONG_PROMPT, NEW_TOKENS)
    for _ in range(20):
        complete(client, folder, "w5 w6", 1)
    after_20 = resident_kib()
    for _ in range(180):
        complete(client, folder, "w5 w6", 1)
    growth_mib = (resident_kib() - after_20) / 1024
    assert growth_mib < 8, f"the server grew by {growth_mib:.1f} MiB from request 20 to request 200"
    # ... and no request left anything behind in the model: the first answer is still the same.
    assert complete(client, folder, LONG_PROMPT, NEW_TOKENS) == first


def test_served_parameters_stay_bit_identical_to_the_saved_weights(folder):
    # The same server in a thread of this process, to reach the model it holds.
    from transformers.cli.serve import Serve

    install_remote_code_lookup()
    port = free_port()
    server = Serve(
        force_model=str(folder), trust_remote_code=True, device="cpu", host="127.0.0.1", port=port, non_blocking=True
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}")
        (timed,) = server._model_manager.loaded_models.values()
        model = timed.model
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        client = make_client(f"http://127.0.0.1:{port}")
        for stream in (False, True):
            complete(client, folder, LONG_PROMPT, NEW_TOKENS, stream=stream)
            client.chat.completions.create(
                model=str(folder), messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=NEW_TOKENS
            )
        saved = load_file(folder / "model.safetensors")
        state = model.state_dict()
        assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
        assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())
    finally:
        server.kill_server()
