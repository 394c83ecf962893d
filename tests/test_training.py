"""Pretraining with Accelerate (resumable, multi-process), Trainer fine-tuning, the tokenizer, the data
pipeline and long-document perplexity, on Python standard-library text, offline, on CPU."""

import json
import logging
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import TINY, tiny_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from atlas_mag import AtlasMAGConfig, AtlasMAGForCausalLM
from atlas_mag.compat import is_activation_checkpointing
from atlas_mag.hub import save_model_folder
from atlas_mag.tasks.perplexity import document_token_nll, evaluate_perplexity
from atlas_mag.tokenization import SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer
from atlas_mag.training import (
    ConfigError,
    config_from_dict,
    finetune,
    iterate_metrics,
    load_config,
    plot_metrics,
    train,
)
from atlas_mag.training.build import build_datasets, lr_multiplier, make_accelerator
from atlas_mag.training.checkpoints import list_checkpoints, resolve_checkpoint, resume_signature
from atlas_mag.training.config import apply_override
from atlas_mag.training.data import (
    DataSource,
    Document,
    PackedWindows,
    ScoredTokens,
    TokenBatch,
    encode_document,
    load_source,
    mix_sources,
    split_holdout,
    stack_windows,
    stdlib_documents,
    write_jsonl,
)
from atlas_mag.training.finetune import pack_for_causal_lm
from atlas_mag.training.loop import summed_loss_scale
from atlas_mag.training.validation import causal_lm_loss, evaluate

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "reference" / "tokenizer_atlas_mag_32k.json"
# The model section of the test runs: the tests' tiny model (its vocabulary comes from the run's tokenizer) with
# the published model's inner-loop settings and an Omega window and TTL chunk of 16, crossed a few times by a
# training window of 64 tokens.
MODEL = {
    **{name: value for name, value in TINY.items() if name not in ("vocab_size", "qk_normalizer_scale", "ttl_lr")},
    "omega_window": 16,
    "ttl_chunk_size": 16,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    documents = stdlib_documents(max_files=60, max_chars=4000)
    return write_jsonl(documents, tmp_path_factory.mktemp("corpus") / "stdlib.jsonl")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(texts, vocab_size=512).save_pretrained(path)
    return path


def run_config(output_dir: Path, corpus: Path, tokenizer: Path, **sections) -> dict:
    """A raw config for a tiny run; `sections` update its sections key by key."""
    raw = {
        "output_dir": str(output_dir),
        "tokenizer": str(tokenizer),
        "seed": 0,
        "model": dict(MODEL),
        "data": {
            "seq_len": 64,
            "validation_documents": 4,
            "validation_windows": 4,
            "sources": [{"path": str(corpus)}],
        },
        "training": {
            "max_steps": 12,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
            "gradient_checkpointing": True,
        },
        "logging": {
            "log_every": 1,
            "eval_every": 0,
            "save_every": 4,
            "keep_last": 2,
            "trackers": [],
            "progress_bar": False,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    raw = run_config(output_dir, corpus, tokenizer_dir, logging={"trackers": ["tensorboard"]})
    final = train(config_from_dict(raw))
    assert final == output_dir / "final"
    return output_dir


# ------------------------------------------------------------------------------------------------ pretraining


def test_training_lowers_validation_loss_and_exports_a_loadable_model(uninterrupted_run, tokenizer_dir):
    records = list(iterate_metrics(uninterrupted_run / "metrics.jsonl"))
    validations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 12]
    assert validations[-1]["val_loss"] < validations[0]["val_loss"] - 0.3
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("perplexity", "lr", "grad_norm", "tokens_per_second", "tokens_seen", "ttl_gradient_norm"):
        assert all(key in r for r in steps), key
    assert all(r["ttl_gradient_norm"] > 0 for r in steps)
    assert steps[-1]["tokens_seen"] == 12 * 2 * 2 * 64
    assert {"val_loss_ttl_off", "val_ttl_gain", "ttl_memory_update_norm"} <= set(validations[-1])
    assert validations[-1]["ttl_memory_update_norm"] > 0
    assert list((uninterrupted_run / "tensorboard").rglob("events.out.tfevents*"))
    assert [p.name for p in list_checkpoints(uninterrupted_run / "checkpoints")] == [
        "step_00000008",
        "step_00000012",
    ]

    # The exported folder loads through its own code and scores the validation set as the run measured it.
    final = uninterrupted_run / "final"
    assert {"model.safetensors", "modeling_atlas.py", "README.md", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    assert type(model).__name__ == "AtlasMAGForCausalLM"
    config = config_from_dict(yaml.safe_load((uninterrupted_run / "config.yaml").read_text()))
    tokenizer = load_tokenizer(final)
    _, windows = build_datasets(config, tokenizer, rank=0, world_size=1)
    batch = torch.tensor([window.ids for window in windows])
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1], ttl=True).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert abs(loss - validations[-1]["val_loss"]) < 1e-4
    assert evaluate(model, windows, 2, make_accelerator(config))["val_loss"] == pytest.approx(loss, abs=1e-5)

    png = plot_metrics(uninterrupted_run / "metrics.jsonl", uninterrupted_run / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_and_resumed_run_ends_with_the_same_parameters(
    uninterrupted_run, tmp_path, corpus, tokenizer_dir, caplog, capsys
):
    output_dir = tmp_path / "interrupted"
    raw = run_config(output_dir, corpus, tokenizer_dir, training={"stop_at_step": 5})
    with caplog.at_level(logging.WARNING):
        checkpoint = train(config_from_dict(raw))
    assert "Removed shared tensor" not in caplog.text  # tied weights are saved once, silently
    assert checkpoint.name == "step_00000005" and not (output_dir / "final").exists()
    # A kill in the middle of the next save leaves only a hidden partial folder, which resuming ignores.
    partial = output_dir / "checkpoints" / ".step_00000008.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config_from_dict(run_config(output_dir, corpus, tokenizer_dir)))
    capsys.readouterr()
    train(config_from_dict(run_config(output_dir, corpus, tokenizer_dir)), resume="latest")
    assert f"resumed from {checkpoint}: step 5 of 12" in capsys.readouterr().out

    expected = load_file(uninterrupted_run / "final" / "model.safetensors")
    resumed = load_file(output_dir / "final" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert (expected[name] - resumed[name]).abs().max() <= 1e-6, name
    # Same data, learning rates and losses at every step: the metrics read as one run.
    reference = [r for r in iterate_metrics(uninterrupted_run / "metrics.jsonl") if "loss" in r]
    continued = [r for r in iterate_metrics(output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in continued] == list(range(1, 13))
    for ours, theirs in zip(continued, reference, strict=True):
        assert ours["lr"] == theirs["lr"] and ours["tokens_seen"] == theirs["tokens_seen"]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_resume_skips_a_corrupt_latest_checkpoint_and_names_it(uninterrupted_run, tmp_path):
    """A truncated newest checkpoint (a full disk, a copy cut short): "latest" falls back to the newest intact
    one with a warning naming the broken file; asked for by path, it is refused; nothing is deleted."""
    root = tmp_path / "run"
    shutil.copytree(uninterrupted_run / "checkpoints", root / "checkpoints")
    older, newest = list_checkpoints(root / "checkpoints")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    files_before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.warns(UserWarning, match=rf"skipped corrupt checkpoint.*{newest.name}.*model\.safetensors"):
        assert resolve_checkpoint("latest", root) == older
    with pytest.raises(ValueError, match=rf"checkpoint {newest} is corrupt \(model\.safetensors"):
        resolve_checkpoint(newest, root)
    (older / "optimizer.bin").write_bytes(b"cut")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        resolve_checkpoint("latest", root)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files_before


def test_resume_with_a_longer_schedule_continues_the_learning_rate_and_says_so(tmp_path, corpus, tokenizer_dir):
    output_dir = tmp_path / "longer"
    train(config_from_dict(run_config(output_dir, corpus, tokenizer_dir, training={"stop_at_step": 4})))
    longer = run_config(output_dir, corpus, tokenizer_dir, training={"max_steps": 24, "stop_at_step": 6})
    with pytest.warns(UserWarning, match="max_steps 12 -> 24"):
        train(config_from_dict(longer), resume="latest")
    rates = {r["step"]: r["lr"] for r in iterate_metrics(output_dir / "metrics.jsonl") if "lr" in r}
    # No second warm-up: the steps after the resume follow the new schedule at their own step numbers.
    for step in (5, 6):
        assert rates[step] == pytest.approx(1e-2 * lr_multiplier(step - 1, 2, 24, 0.1), rel=1e-6), step


def test_resuming_with_other_data_settings_is_refused(uninterrupted_run, corpus, tokenizer_dir):
    raw = run_config(uninterrupted_run, corpus, tokenizer_dir, data={"seq_len": 32})
    with pytest.raises(ValueError, match="other data/batch settings"):
        train(config_from_dict(raw), resume="latest")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train(config_from_dict(raw), resume=uninterrupted_run / "final")


def test_two_processes_with_accelerate_launch_hold_identical_parameters(tmp_path, corpus, tokenizer_dir):
    output_dir = tmp_path / "ddp"
    raw = run_config(output_dir, corpus, tokenizer_dir, training={"max_steps": 2}, logging={"save_every": 2})
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    # `accelerate launch --cpu` starts a single process unless MPI is set up; torchrun processes (--multi_gpu)
    # with ACCELERATE_USE_CPU=1 run data-parallel on CPU over gloo.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "scripts" / "train.py"), str(config_path), "--set", "data.validation_windows=3",
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = output_dir / "checkpoints" / "step_00000002"
    states = [json.loads((checkpoint / f"trainer_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["param_sha256"] == states[1]["param_sha256"]
    # The two processes read different documents (so their gradients differed before averaging).
    assert states[0]["data"]["buffer"] != states[1]["data"]["buffer"]
    assert states[0]["tokens_seen"] == 2 * 2 * 2 * 64 * 2
    assert (output_dir / "final" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- bad input


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_config_keys_are_named(tmp_path, corpus, tokenizer_dir):
    raw = run_config(tmp_path / "out", corpus, tokenizer_dir)
    raw["training"]["max_stepz"] = 3
    with pytest.raises(ConfigError, match=r"training\.max_stepz"):
        load_config(write_config(tmp_path, raw))
    raw = run_config(tmp_path / "out", corpus, tokenizer_dir, model={"hiden_size": 32})
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        load_config(write_config(tmp_path, raw))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.pth"):
        load_config(write_config(tmp_path, run_config(tmp_path, corpus, tokenizer_dir)), ["data.sources.0.pth=x"])
    with pytest.raises(ConfigError, match=r"training\.learning_rate.*must be a number"):
        load_config(write_config(tmp_path, run_config(tmp_path, corpus, tokenizer_dir)), ["training.learning_rate=x"])
    with pytest.raises(FileNotFoundError, match="Config file"):
        load_config(tmp_path / "missing.yaml")


def short_documents(path: Path, count: int = 30) -> Path:
    return write_jsonl([f"x = {i}" for i in range(count)], path)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing path", FileNotFoundError, "does not exist"),
        ("empty file", ValueError, "is empty"),
        ("no text column", ValueError, "no text column 'text'.*python-edu"),
        ("short validation documents", ValueError, "validation data gives no window.*shorter than needed"),
        ("short training documents", ValueError, "training data is too small.*shorter than needed"),
        ("too few documents to hold out", ValueError, "leaves none to train on"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, corpus, tokenizer_dir, case, error, message):
    data = {}
    if case == "missing path":
        data["sources"] = [{"path": str(tmp_path / "nowhere.jsonl")}]
    elif case == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        data["sources"] = [{"path": str(tmp_path / "empty.jsonl")}]
    elif case == "no text column":
        rows = "".join(json.dumps({"blob_id": f"{i:040x}", "repo_name": "r"}) + "\n" for i in range(10))
        (tmp_path / "blobs.jsonl").write_text(rows)
        data["sources"] = [{"path": str(tmp_path / "blobs.jsonl")}]
    elif case == "short validation documents":
        data["sources"] = [{"path": str(short_documents(tmp_path / "short.jsonl"))}]
    elif case == "short training documents":
        data["sources"] = [{"path": str(short_documents(tmp_path / "short.jsonl", count=1))}]
        data["validation_sources"] = [{"path": str(corpus)}]
    else:
        data["sources"] = [{"path": str(short_documents(tmp_path / "short.jsonl", count=3))}]
    output_dir = tmp_path / "out"
    with pytest.raises(error, match=message):
        train(config_from_dict(run_config(output_dir, corpus, tokenizer_dir, data=data)))
    assert not output_dir.exists(), "nothing is written before the checks pass"


# ------------------------------------------------------------------------------------------------ config


def test_overrides_parse_yaml_values_and_address_list_items():
    raw = {"training": {"max_steps": 5}, "data": {"sources": [{"path": "a"}, {"path": "b"}]}}
    for assignment in ("training.max_steps=20", "training.betas=[0.8, 0.9]", "data.sources.1.path=c.jsonl",
                       "training.stop_at_step=null", "logging.trackers=[]"):  # fmt: skip
        apply_override(raw, assignment)
    assert raw["training"] == {"max_steps": 20, "betas": [0.8, 0.9], "stop_at_step": None}
    assert raw["data"]["sources"] == [{"path": "a"}, {"path": "c.jsonl"}]
    assert raw["logging"] == {"trackers": []}
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(raw, "data.sources.7.path=x")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "training.max_steps")


def test_set_values_reach_the_model_and_training_as_their_field_types(tmp_path, corpus, tokenizer_dir):
    """`--set model.ttl_lr=1e-3` and `--set training.learning_rate=3e-4`: YAML reads both as strings."""
    path = write_config(tmp_path, run_config(tmp_path / "out", corpus, tokenizer_dir))
    config = load_config(path, ["model.ttl_lr=1e-3", "training.learning_rate=3e-4"])
    assert config.model["ttl_lr"] == 1e-3 and isinstance(config.model["ttl_lr"], float)
    assert config.training.learning_rate == 3e-4
    with pytest.raises(ConfigError, match="`model.ttl_lr` must be a number, got 'fast'"):
        load_config(path, ["model.ttl_lr=fast"])
    with pytest.raises(ConfigError, match="model: `ttl_lr` must be a finite number, got nan"):
        load_config(path, ["model.ttl_lr=.nan"])
    with pytest.raises(ConfigError, match=r"model\.hidden_sise"):
        load_config(path, ["model.hidden_sise=32"])


def test_shipped_configs_load():
    published = load_config(REPO / "configs" / "atlas_mag_43m.yaml")
    assert (published.training.micro_batch_size, published.training.gradient_accumulation_steps) == (24, 4)
    assert published.data.seq_len == 2048 and published.training.betas == [0.9, 0.95]
    assert [s.probability for s in published.data.sources] == [0.4, 0.5, 0.1]
    assert sum(p.numel() for p in AtlasMAGForCausalLM(AtlasMAGConfig(**published.model)).parameters()) == 43_356_422
    tiny = load_config(REPO / "configs" / "tiny.yaml", ["training.max_steps=7"])
    assert tiny.training.max_steps == 7


def test_learning_rate_schedule():
    values = [lr_multiplier(step, warmup_steps=4, max_steps=14, min_ratio=0.1) for step in range(15)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[9] == pytest.approx(0.55) and values[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))


# --------------------------------------------------------------------------------------------------- data


def test_windows_are_the_packed_documents_and_resume_exactly(corpus, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    dataset = load_source(DataSource(str(corpus)))
    texts = list(dataset.select(range(12))["text"])
    small = Dataset.from_dict({"text": texts})

    def windows(rank=0, world_size=1):
        return PackedWindows(small.to_iterable_dataset(), tokenizer, 65, rank=rank, world_size=world_size)

    # Independent packing: concatenate <bos> text <eos> of every document, cut into 65-token pieces.
    stream = [t for text in texts for t in [2, *tokenizer.encode(text, add_special_tokens=False), 3]]
    expected = [stream[i : i + 65] for i in range(0, len(stream) - 64, 65)]
    iterator = iter(windows())
    first_epoch = [next(iterator) for _ in range(len(expected))]
    assert [window.ids for window in first_epoch] == expected
    assert all(all(window.scored) for window in first_epoch), "rows without a completion are scored throughout"
    leftover = stream[len(expected) * 65 :]
    assert next(iterator).ids == leftover + stream[: 65 - len(leftover)], "the next epoch continues the stream"

    # Stop anywhere (here across the epoch boundary), restore into a fresh iterator, continue identically.
    reference = windows()
    uninterrupted = list(islice(reference, len(expected) + 6))
    for stop in (3, len(expected) - 1, len(expected) + 2):
        interrupted = windows()
        iterator = iter(interrupted)
        head = [next(iterator) for _ in range(stop)]
        state = json.loads(json.dumps(interrupted.state_dict()))
        restored = windows()
        restored.load_state_dict(state)
        iterator = iter(restored)
        tail = [next(iterator) for _ in range(len(uninterrupted) - stop)]
        assert head + tail == uninterrupted, stop

    # Two processes split the documents between them.
    assert encode_document(tokenizer, texts[0]).ids[:65] == next(iter(windows(0, 2))).ids
    assert encode_document(tokenizer, texts[1]).ids[:65] == next(iter(windows(1, 2))).ids


def test_completion_rows_score_only_their_completion(tmp_path, tokenizer_dir):
    """Prompt-completion rows: the windows mark only the completion's tokens and <eos> as scored, the losses of
    the training loop, of validation and of the Trainer's labels count only those, and such a source mixes with
    a plain text one."""
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = [Document("def f(x):", " return x"), "import os", Document("class A:", " pass")]
    needles = load_source(DataSource(str(write_jsonl(rows, tmp_path / "rows.jsonl"))))
    plain = load_source(DataSource(str(write_jsonl(["x = 1", "y = 2"], tmp_path / "plain.jsonl"))))
    assert needles["completion"] == [" return x", None, " pass"] and plain["completion"] == ["", ""]
    assert {row["text"] for row in islice(mix_sources([needles, plain], [0.5, 0.5], seed=0), 4)} <= {
        "def f(x):", "import os", "class A:", "x = 1", "y = 2"
    }

    # Independently: <bos> prompt completion <eos>, scored from the completion on (rows without: every token).
    ids, scored = [], []
    for row in rows:
        text, completion = (row, "") if isinstance(row, str) else row
        prompt = [2, *tokenizer.encode(text, add_special_tokens=False)]
        answer = tokenizer.encode(completion, add_special_tokens=False) + [3]
        ids += prompt + answer
        scored += [not completion] * len(prompt) + [True] * len(answer)
    window = len(ids)
    (packed,) = islice(PackedWindows(needles.to_iterable_dataset(), tokenizer, window, cycle=False), 1)
    assert packed == ScoredTokens(ids, scored) and not all(scored)

    batch = stack_windows([packed, packed])
    logits = torch.randn(2, window - 1, len(tokenizer))
    targets, target_scored = batch.ids[:, 1:], batch.scored[:, 1:]
    picked = torch.nn.functional.cross_entropy(logits[target_scored], targets[target_scored])
    assert causal_lm_loss(logits, targets, target_scored).item() == pytest.approx(picked.item(), rel=1e-6)
    assert causal_lm_loss(logits, targets, torch.zeros_like(target_scored)).item() == 0.0

    model = AtlasMAGForCausalLM(tiny_config(**MODEL, vocab_size=len(tokenizer))).eval()
    with torch.no_grad():
        model_logits = model(input_ids=batch.ids[:, :-1], ttl=True).logits
    expected = causal_lm_loss(model_logits, targets, target_scored).item()
    assert evaluate(model, [packed], 2, Accelerator(), measure_memory=False)["val_loss"] == pytest.approx(expected)

    (block,) = pack_for_causal_lm(needles, tokenizer, window)
    assert block["input_ids"] == ids
    assert block["labels"] == [token if keep else -100 for token, keep in zip(ids, scored, strict=True)]


def test_accumulated_micro_batches_weigh_every_scored_target_alike():
    """Two accumulated micro-batches with 3 and 9 scored targets give the gradient of the mean over all 12, as one
    batch holding both would (the loop's loss scale, with Accelerate's own division by the accumulation)."""
    torch.manual_seed(0)
    model = AtlasMAGForCausalLM(tiny_config())
    ids = torch.randint(4, 97, (2, 1, 17))
    scored = torch.zeros(2, 1, 17, dtype=torch.bool)
    scored[0, 0, -3:] = True
    scored[1, 0, -9:] = True
    micro_batches = [TokenBatch(ids[i], scored[i]) for i in range(2)]
    accelerator = Accelerator(gradient_accumulation_steps=2)
    scale = summed_loss_scale(micro_batches, accelerator)
    for batch in micro_batches:
        with accelerator.accumulate(model):
            logits = model(input_ids=batch.ids[:, :-1]).logits
            accelerator.backward(scale * causal_lm_loss(logits, batch.ids[:, 1:], batch.scored[:, 1:], reduction="sum"))
    accumulated = [param.grad.clone() for param in model.parameters()]
    model.zero_grad()
    whole = stack_windows([ScoredTokens(i[0].tolist(), m[0].tolist()) for i, m in zip(ids, scored, strict=True)])
    logits = model(input_ids=whole.ids[:, :-1]).logits
    causal_lm_loss(logits, whole.ids[:, 1:], whole.scored[:, 1:]).backward()
    for got, param in zip(accumulated, model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-7)


def test_resume_signature_of_a_source_field_at_its_default_is_the_one_saved_before_it():
    """Checkpoints written before `completion_field` existed resume: at its default it is not in the signature."""
    config = config_from_dict({**yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())})
    (source,) = resume_signature(config)["data"]["sources"]
    assert "completion_field" not in source and source["text_field"] == "text"
    config.data.sources[0].completion_field = "answer"
    assert resume_signature(config)["data"]["sources"][0]["completion_field"] == "answer"


def test_mixture_follows_probabilities_and_holdout_is_disjoint():
    first = Dataset.from_dict({"text": [f"a{i}" for i in range(4000)]})
    second = Dataset.from_dict({"text": [f"b{i}" for i in range(4000)]})
    drawn = [row["text"] for row in islice(mix_sources([first, second], [0.8, 0.2], seed=1), 2000)]
    share = sum(text.startswith("a") for text in drawn) / len(drawn)
    assert abs(share - 0.8) < 0.03
    assert drawn == [row["text"] for row in islice(mix_sources([first, second], [4, 1], seed=1), 2000)]
    train_part, validation = split_holdout(first, 10, "first")
    assert validation["text"] == [f"a{i}" for i in range(10)]
    assert train_part[0]["text"] == "a10" and len(train_part) == 3990


# ------------------------------------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_has_the_published_layout(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 512
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    text = "def f(x):\n    return x ** 2  # ünïcode"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    published = load_tokenizer(SHARED_TOKENIZER)
    assert len(published) == 32000 and (published.bos_token_id, published.eos_token_id) == (2, 3)
    with pytest.raises(ValueError, match="learned no merges"):
        train_bpe_tokenizer([""], vocab_size=512)


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_trainer_finetuning_lowers_the_loss_with_gradient_checkpointing(tmp_path, corpus, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    model = AtlasMAGForCausalLM(tiny_config(**MODEL, vocab_size=len(tokenizer), ttl_lr=0.01))
    start = save_model_folder(model, tmp_path / "start", tokenizer=tokenizer)
    arguments = {
        "max_steps": 10,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "per_device_train_batch_size": 4,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    trainer, metrics = finetune(
        start,
        DataSource(str(corpus)),
        tmp_path / "ft",
        block_size=64,
        eval_documents=4,
        training_arguments=arguments,
    )
    assert is_activation_checkpointing(trainer.model)
    # The starting model scored on the same held-out blocks, independently of the Trainer.
    blocks = torch.tensor(trainer.eval_dataset["input_ids"])
    with torch.no_grad():
        initial_loss = model(input_ids=blocks, labels=blocks).loss.item()
    assert metrics["eval_loss"] < initial_loss - 0.3
    # The exported folder holds the trained model (compared on the same blocks; the Trainer's own eval_loss
    # averages per batch in older releases, so it is not the reference here), with the cache on for decoding.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "final")
    trainer.model.eval()
    with torch.no_grad():
        trained_loss = trainer.model(input_ids=blocks, labels=blocks).loss.item()
        assert reloaded(input_ids=blocks, labels=blocks).loss.item() == pytest.approx(trained_loss, abs=1e-5)
    assert trained_loss < initial_loss - 0.3
    assert reloaded.config.use_cache is True


# ------------------------------------------------------------------------------------------------ perplexity


def test_long_document_perplexity_through_the_cache_equals_one_pass():
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    document = torch.randint(0, 97, (45,)).tolist()
    with torch.no_grad():
        one_pass = model(input_ids=torch.tensor([document]), labels=torch.tensor([document])).loss.item()
    for segment_length in (7, 16, 45):
        segmented = document_token_nll(model, document, segment_length, ttl=True)
        assert segmented.shape == (44,)
        assert segmented.mean().item() == pytest.approx(one_pass, abs=1e-5), segment_length
    ttl_off = document_token_nll(model, document, 7, ttl=False)
    assert (ttl_off - document_token_nll(model, document, 7, ttl=True)).abs().max() > 1e-3

    results = evaluate_perplexity(model, [document, document[:30]], segment_length=7)
    on, off = results["settings"]["ttl_on"], results["settings"]["ttl_off"]
    assert on["tokens"] == off["tokens"] == 44 + 29
    assert sum(bucket["tokens"] for bucket in on["by_position"]) == 73
    expected_nll = (segmented.sum() + document_token_nll(model, document[:30], 45, ttl=True).sum()) / 73
    assert on["nll"] == pytest.approx(expected_nll.item(), abs=1e-5)
