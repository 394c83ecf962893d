"""The needle language model's job (`make niah-lm`): its training documents, its corpora, its report, and the job
itself end to end at a tiny size (the real run is `scripts/train_niah_lm.py`)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from atlas_mag.niah_lm import NeedleLMSettings, beyond_reach_accuracy, format_report, passages, run_niah_lm
from atlas_mag.tasks.niah import NAMES, NeedleDocuments
from atlas_mag.tokenization import train_bpe_tokenizer
from atlas_mag.training.data import python_docs_documents, stdlib_documents

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FACT = re.compile(r" The secret number for (\w+) is (\d+)\.")
QUESTION = re.compile(r" What is the secret number for (\w+)\? The secret number for (\w+) is (\d+)\.")


@pytest.fixture(scope="module")
def digit_tokenizer():
    return train_bpe_tokenizer(stdlib_documents(max_files=20), vocab_size=400, split_digits=True)


def test_split_digits_makes_every_digit_a_token_and_round_trips(digit_tokenizer):
    text = "x = 1234567 + 89.5  # 2026-12-02"
    ids = digit_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [digit_tokenizer.decode([token]) for token in ids]
    digits = [piece for piece in pieces if any(character.isdigit() for character in piece)]
    assert digits == list("1234567" "895" "20261202")
    assert digit_tokenizer.decode(ids) == text


def test_needle_documents_state_every_fact_before_asking_it(digit_tokenizer):
    recipe = NeedleDocuments(needles=3, num_digits=5, min_filler_tokens=40, max_filler_tokens=80)
    filler = stdlib_documents(max_files=5)
    documents = recipe.documents(digit_tokenizer, filler, count=20, seed=3)
    assert documents == recipe.documents(digit_tokenizer, filler, count=20, seed=3)
    assert documents != recipe.documents(digit_tokenizer, filler, count=20, seed=4)
    for prompt, completion in documents:
        # The completion is the answer to the last question, the only part the loss counts.
        last_asked = re.findall(r"secret number for (\w+) is$", prompt)
        assert last_asked and re.fullmatch(r" (\d{5})\.", completion)
        document = prompt + completion
        questions = QUESTION.findall(document)
        facts = FACT.findall(document.split(" What is the secret number for")[0])
        assert len(facts) == len(questions) == 3
        assert len({name for name, _ in facts}) == 3 and not {name for name, _ in facts} & set(NAMES)
        # Each fact is asked once, with its own answer, after every fact was stated.
        assert sorted((asked, answer) for asked, again, answer in questions if asked == again) == sorted(facts)
        assert dict(facts)[last_asked[0]] == completion[1:-1]
        assert all(len(answer) == 5 for _, answer in facts)
        body = FACT.sub("", document.split(" What is the secret number for")[0])
        filler_length = len(digit_tokenizer(body, add_special_tokens=False)["input_ids"])
        # The filler is a run of the given text, re-encoded (a cut word may tokenize differently at the seams).
        assert 40 - 6 <= filler_length <= 80 + 6
        assert body.strip() and body.strip().split()[0] in " ".join(filler)


def test_needle_documents_place_facts_at_every_depth(digit_tokenizer):
    recipe = NeedleDocuments(needles=1, num_digits=4, min_filler_tokens=100, max_filler_tokens=100)
    documents = recipe.documents(digit_tokenizer, stdlib_documents(max_files=5), count=200, seed=0)
    depths = []
    for document in (prompt + completion for prompt, completion in documents):
        fact = FACT.search(document)
        depths.append(fact.start() / (document.index(" What is the secret number") - len(fact.group(0))))
    assert min(depths) < 0.1 and max(depths) > 0.9
    assert 0.4 < sum(depths) / len(depths) < 0.6


def test_needle_documents_refuse_bad_settings():
    with pytest.raises(ValueError, match="needles"):
        NeedleDocuments(needles=0)
    with pytest.raises(ValueError, match="max_filler_tokens"):
        NeedleDocuments(min_filler_tokens=50, max_filler_tokens=10)


def test_passages_cut_at_line_ends_and_keep_all_text():
    texts = ["a" * 30 + "\n" + "b" * 30 + "\n" + "c" * 100 + "\nd\n", "short\n"]
    cut = passages(texts, max_chars=64)
    assert "".join(cut) == "".join(texts)
    assert all(piece.endswith("\n") for piece in cut)
    assert cut == ["a" * 30 + "\n" + "b" * 30 + "\n", "c" * 100 + "\n", "d\n", "short\n"]


def test_python_docs_are_english_reference_topics():
    documents = python_docs_documents()
    assert len(documents) > 20
    assert any("while" in document and "loop" in document for document in documents)


def test_beyond_reach_accuracy_pools_prompts_by_needle_distance():
    def cell(condition, distances, correct):
        samples = [{"needle_distance": d, "correct": c} for d, c in zip(distances, correct, strict=True)]
        return {"condition": condition, "samples": samples}

    results = {
        "cells": [
            cell("ttl_on", [100, 20, 50], [True, True, False]),
            cell("ttl_on", [200], [True]),
            cell("ttl_off", [100, 20, 50, 200], [False, True, False, False]),
        ]
    }
    pooled = beyond_reach_accuracy(results, reach=30)
    assert pooled["ttl_on"] == {
        "beyond_reach": 2 / 3, "within_reach": 1.0, "beyond_reach_prompts": 3, "within_reach_prompts": 1
    }
    assert pooled["ttl_off"]["beyond_reach"] == 0.0 and pooled["ttl_off"]["within_reach"] == 1.0


TINY_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.memory_key_dim=8",
    "model.poly_rank=16",
    "model.gamma_gate_hidden_size=8",
    "training.max_steps=2",
    "training.micro_batch_size=2",
    "data.seq_len=64",
    "data.validation_windows=2",
    "logging.eval_every=0",
    "logging.save_every=1",
    "logging.trackers=[]",
    "logging.progress_bar=false",
]


def test_niah_lm_job_end_to_end_and_resumes(tmp_path):
    settings = NeedleLMSettings(
        output_dir=tmp_path / "niah_lm",
        overrides=tuple(TINY_MODEL),
        vocab_size=300,
        stdlib_files=12,
        needles=NeedleDocuments(needles=1, num_digits=3, min_filler_tokens=16, max_filler_tokens=40),
        needle_documents=40,
        held_out_needle_documents=8,
        window_multiples=(16,),
        depths=(0.0, 1.0),
        samples_per_cell=1,
        perplexity_documents=2,
        perplexity_windows=8,
    )
    result = run_niah_lm(settings)
    root = tmp_path / "niah_lm"
    assert (root / "train" / "final" / "model.safetensors").is_file()
    saved = json.loads((root / "niah_lm_results.json").read_text())
    assert saved["steps"] == 2 and saved["receptive_field_without_ttl"] == 2 * 7
    assert set(saved["niah_by_reach"]) == {"ttl_on", "ttl_off", "gate_removed"}
    niah = json.loads((root / "niah" / "niah_results.json").read_text())
    assert niah["lengths"] == [128] and niah["num_digits"] == 3
    assert all(len(sample["answer"]) == 3 for cell in niah["cells"] for sample in cell["samples"])
    perplexity = json.loads((root / "perplexity.json").read_text())
    assert set(perplexity["settings"]) == {"ttl_on", "ttl_off"}
    assert perplexity["settings"]["ttl_on"]["by_position"][0] == {
        **perplexity["settings"]["ttl_on"]["by_position"][0], "start": 0, "end": 8
    }
    assert (root / "loss_by_position.png").read_bytes().startswith(PNG_MAGIC)
    assert "exact match, needle beyond / within" in format_report(result)

    # Run again: the data is reused as written and training resumes from its last checkpoint (step 2 of 2).
    written = {path: path.stat().st_mtime_ns for path in (root / "data").iterdir()}
    again = run_niah_lm(settings)
    assert {path: path.stat().st_mtime_ns for path in (root / "data").iterdir()} == written
    assert again["niah_by_reach"] == result["niah_by_reach"]
    assert again["perplexity"] == pytest.approx(result["perplexity"])

    # Other data settings on the same folder are refused before anything is written or trained.
    checkpoints = sorted((root / "train" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"needle_documents: 40 there, 41 here"):
        run_niah_lm(replace(settings, needle_documents=41))
    assert {path: path.stat().st_mtime_ns for path in (root / "data").iterdir()} == written
    assert sorted((root / "train" / "checkpoints").iterdir()) == checkpoints


def test_niah_lm_refuses_a_config_without_its_sources(tmp_path):
    config = tmp_path / "one_source.yaml"
    text = (Path(__file__).parents[1] / "configs" / "niah_lm.yaml").read_text()
    config.write_text(text.replace("    - path: outputs/niah_lm/data/needles.jsonl\n      probability: 0.9\n", ""))
    with pytest.raises(ValueError, match="two data.sources"):
        run_niah_lm(NeedleLMSettings(output_dir=tmp_path / "out", config=config))


def test_niah_lm_refuses_data_written_without_a_recipe(tmp_path):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    (data / "text.jsonl").write_text('{"text": "old"}\n')
    with pytest.raises(ValueError, match="earlier version of this job"):
        run_niah_lm(NeedleLMSettings(output_dir=tmp_path / "out"))
    assert [path.name for path in data.iterdir()] == ["text.jsonl"]
