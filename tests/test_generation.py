"""Every generation mode scores each step exactly as a full forward over the sequence so far (TTL on).

Comparing tokens alone hides a cache that is silently dropped (a random model repeats one token); these tests
compare the logits of every generated step, and beam search's sequence scores, against forwards without a
cache.
"""

import pytest
import torch
from conftest import tiny_config, word_tokenizer
from transformers import pipeline

from atlas_mag import AtlasMAGCache, AtlasMAGForCausalLM
from atlas_mag.modeling_atlas import CACHE_FIELD

ATOL = 1e-4
NEW_TOKENS = 9


@pytest.fixture(scope="module")
def model() -> AtlasMAGForCausalLM:
    # Larger weights: a random model whose greedy output does not repeat one token. Chunks of 8 tokens, so the
    # memory learns several times during the prompt and during generation.
    torch.manual_seed(0)
    return AtlasMAGForCausalLM(tiny_config(initializer_range=0.2)).eval()


def prefix_logits(model, sequences, prompt_length, attention_mask=None):
    """Next-token logits after every prefix `sequences[:, :prompt_length + k]`, each from its own forward
    without a cache: [steps, batch, vocab]."""
    steps = []
    with torch.no_grad():
        for end in range(prompt_length, sequences.shape[1]):
            mask = None
            if attention_mask is not None:
                grown = torch.ones(sequences.shape[0], end - prompt_length, dtype=attention_mask.dtype)
                mask = torch.cat([attention_mask, grown], dim=1)
            steps.append(model(sequences[:, :end], attention_mask=mask, use_cache=False, ttl=True).logits[:, -1])
    return torch.stack(steps)


def assert_steps_match(model, output, prompt, attention_mask=None):
    generated = torch.stack(output.logits)
    expected = prefix_logits(model, output.sequences, prompt.shape[1], attention_mask)
    assert generated.shape == expected.shape
    torch.testing.assert_close(generated, expected, atol=ATOL, rtol=0)


def generate(model, prompt, **kwargs):
    with torch.inference_mode():
        return model.generate(
            prompt, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True, **kwargs
        )


def test_greedy_steps_equal_full_forwards_and_ttl_changes_them(model):
    prompt = torch.randint(4, 97, (1, 23))
    output = generate(model, prompt, do_sample=False)
    assert_steps_match(model, output, prompt)
    off = generate(model, prompt, do_sample=False, ttl=False)
    steps = min(len(off.logits), len(output.logits))
    assert (torch.stack(off.logits[:steps]) - torch.stack(output.logits[:steps])).abs().max() > 1e-2


def test_sampling_with_several_return_sequences_equals_full_forwards(model):
    prompt = torch.randint(4, 97, (2, 19))
    torch.manual_seed(3)
    output = generate(model, prompt, do_sample=True, top_k=20, num_return_sequences=3)
    assert output.sequences.shape[0] == 6
    assert_steps_match(model, output, prompt.repeat_interleave(3, dim=0))


def test_left_padded_batch_equals_full_forwards(model):
    prompt = torch.randint(4, 97, (2, 19))
    mask = torch.ones_like(prompt)
    mask[1, :6] = 0
    prompt[1, :6] = 0
    output = generate(model, prompt, attention_mask=mask, do_sample=False)
    assert_steps_match(model, output, prompt, mask)


def test_continuing_from_the_returned_cache_equals_full_forwards(model):
    prompt = torch.randint(4, 97, (1, 21))
    first = generate(model, prompt, do_sample=False)
    cache = getattr(first, CACHE_FIELD)  # generate's own output class: the installed release's name
    assert isinstance(cache, AtlasMAGCache)
    resumed = generate(model, first.sequences, do_sample=False, **{CACHE_FIELD: cache})
    assert_steps_match(model, resumed, first.sequences)


def test_beam_search_sequence_scores_equal_full_forwards(model):
    """With length_penalty=0 a beam's score is the sum of its tokens' log-probabilities; min_new_tokens keeps
    every beam alive to the end (it masks EOS after the log-softmax, so the sum is unchanged)."""
    prompt = torch.randint(4, 97, (2, 17))
    with torch.inference_mode():
        output = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            num_beams=3,
            num_return_sequences=2,
            length_penalty=0.0,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    sequences = output.sequences
    logits = prefix_logits(model, sequences, prompt.shape[1])
    tokens = sequences[:, prompt.shape[1] :].T
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1).sum(0)
    torch.testing.assert_close(output.sequences_scores, expected, atol=ATOL, rtol=0)


def test_pipeline_steps_equal_full_forwards(model):
    tokenizer = word_tokenizer()
    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: step_logits.append(out[:, -1].clone()))
    try:
        prompt = " ".join(f"w{i}" for i in torch.randint(4, 97, (30,)).tolist())
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        result = generator(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)
    finally:
        hook.remove()
    sequence = torch.tensor([result[0]["generated_token_ids"]])
    prompt_length = len(tokenizer(prompt)["input_ids"])
    generated = torch.stack(step_logits)[: sequence.shape[1] - prompt_length]
    torch.testing.assert_close(generated, prefix_logits(model, sequence, prompt_length), atol=ATOL, rtol=0)


def test_generate_passes_the_tokenizer_through_to_forward_harmlessly(model):
    # `generate` hands its `tokenizer` (which stop strings need; `transformers serve` always passes one) on to
    # every forward with the model inputs.
    prompt = torch.randint(4, 97, (1, 12))
    plain = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    given = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, tokenizer=word_tokenizer())
    assert torch.equal(given, plain)
