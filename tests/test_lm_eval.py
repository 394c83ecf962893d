"""lm-evaluation-harness (the `evaluation` extra) on a saved folder, offline: the local recall tasks run with TTL on
and off through scripts/evaluate_lm_eval.py, and the harness's scores are the model's own: its loglikelihoods
equal full forwards with the TTL setting it was given (so `ttl_enabled` reaches the config), and its greedy
answers through `generate` equal the argmax of a full forward."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # the evaluation extra (`make setup-evaluation`); Makefile's test-oldest leaves this file out
import pytest
import torch
from conftest import tiny_config, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_mag import AtlasMAGForCausalLM
from atlas_mag.hub import save_model_folder
from atlas_mag.lm_eval_harness import TASK_METRICS, TASK_NAMES, recall_task_for, run_lm_eval
from atlas_mag.tasks.recall import BOS_ID, RecallTask, build_tokenizer, receptive_field

REPOSITORY = Path(__file__).resolve().parent.parent
TASK = RecallTask(num_keys=8, num_values=8, num_filler=4)
LIMIT = 4
# Few documents from few sequences: each run makes (and the harness reads) only these.
METADATA = {"recall_sequences": LIMIT}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random tiny model over the recall task's symbols (larger weights, so that TTL moves its scores)."""
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=TASK.vocab_size, pad_token_id=0, bos_token_id=BOS_ID, eos_token_id=3, initializer_range=0.2
    )
    model = AtlasMAGForCausalLM(config)
    return save_model_folder(model, tmp_path_factory.mktemp("lm_eval") / "model", tokenizer=build_tokenizer(TASK))


@pytest.fixture(scope="module")
def outputs(folder) -> dict[bool, dict]:
    """simple_evaluate's outputs (samples included) with TTL on and off, keyed by TTL; batches of 2, so that some
    requests are padded (loglikelihood: on the right, no attention mask; generate: on the left, with one)."""
    return {
        ttl: run_lm_eval(folder, TASK_NAMES, ttl=ttl, limit=LIMIT, batch_size=2, bootstrap_iters=0, metadata=METADATA)
        for ttl in (True, False)
    }


@pytest.fixture(scope="module")
def model_and_tokenizer(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def full_forward_logprobs(model_and_tokenizer, context: str, ttl: bool) -> torch.Tensor:
    """Log-probabilities of the token after `context`: one forward over the whole context, no cache."""
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False, ttl=ttl).logits
    return torch.log_softmax(logits[0, -1].double(), -1)


def test_the_documents_follow_the_folder(folder):
    task = recall_task_for(folder)
    assert task == RecallTask(num_keys=8, num_values=8, num_filler=4, gap=receptive_field(tiny_config()))


def test_a_model_of_other_symbols_is_refused(tmp_path):
    folder = save_model_folder(AtlasMAGForCausalLM(tiny_config()), tmp_path / "words", tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="no recall task fits its tokenizer"):
        recall_task_for(folder)


def test_script_writes_scores_with_ttl_on_and_off(folder, tmp_path):
    output = tmp_path / "scores.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, str(REPOSITORY / "scripts" / "evaluate_lm_eval.py"), str(folder), "--device", "cpu",
        "--limit", str(LIMIT), "--metadata", f"recall_sequences={LIMIT}", "--bootstrap-iters", "10",
        "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(output.read_text())
    assert summary["lm_eval_version"] == lm_eval.__version__
    assert list(summary["settings"]) == ["ttl_on", "ttl_off"]
    for setting, scores in summary["settings"].items():
        assert scores["ttl_enabled"] == (setting == "ttl_on")
        for task in TASK_NAMES:
            assert scores["scores"][task]["n_samples"] == LIMIT
            for metric in TASK_METRICS[task]:
                assert math.isfinite(scores["scores"][task][metric])
                assert math.isfinite(scores["scores"][task][f"{metric}_stderr"])
    assert "| atlas_recall_gen | exact_match |" in done.stdout


@pytest.mark.parametrize("task", ["atlas_recall_mc", "atlas_recall_loglik"])
def test_loglikelihoods_equal_full_forwards_with_the_ttl_setting(outputs, model_and_tokenizer, task):
    differences = []
    for ttl, output in outputs.items():
        samples = output["samples"][task]
        assert len(samples) == LIMIT
        for sample in samples:
            context = sample["doc"]["context"]
            # Several TTL chunks before the answer: the memory learned from this very prompt.
            assert len(context.split()) > 2 * tiny_config().ttl_chunk_size
            expected = full_forward_logprobs(model_and_tokenizer, context, ttl)
            other = full_forward_logprobs(model_and_tokenizer, context, not ttl)
            for (request_context, continuation), [(loglikelihood, greedy)] in zip(
                sample["arguments"], sample["resps"], strict=True
            ):
                assert request_context == context
                token = model_and_tokenizer[1].convert_tokens_to_ids(continuation.strip())
                assert loglikelihood == pytest.approx(expected[token].item(), abs=1e-4)
                assert greedy == (int(expected.argmax()) == token)
                differences.append(abs(loglikelihood - other[token].item()))
    # The other setting's forward scores differently: the harness ran the setting it was given.
    assert max(differences) > 1e-2


def test_greedy_answers_through_generate_equal_full_forward_argmax(outputs, model_and_tokenizer):
    answers = {}
    for ttl, output in outputs.items():
        for sample in output["samples"]["atlas_recall_gen"]:
            expected = full_forward_logprobs(model_and_tokenizer, sample["doc"]["context"], ttl).argmax()
            (answer,) = sample["resps"][0]
            assert answer == model_and_tokenizer[1].decode([int(expected)], skip_special_tokens=True)
            assert sample["exact_match"] == float(answer == sample["doc"]["answer"])
            answers.setdefault(sample["doc_id"], []).append(answer)
    # With TTL off, some prompt gets another answer.
    assert len(answers) == LIMIT and any(on != off for on, off in answers.values())
