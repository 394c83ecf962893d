"""Converting training checkpoints of the original Atlas-MAG implementation into Hub model folders.

The published checkpoint cannot be downloaded here, so `checkpoint_factory` builds checkpoints in its exact
layout (`../shared/reference/atlas_mag_reference.md`) with random values, and `reference_forward` recomputes
the original forward pass from those tensors independently of the model code.
"""

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_factory import PUBLISHED, ReferenceSizes, reference_checkpoint, reference_state_dict
from reference_forward import reference_logits
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from atlas_mag import AtlasMAGForCausalLM
from atlas_mag.convert import (
    CheckpointError,
    config_from_reference_state_dict,
    convert_checkpoint,
    convert_state_dict,
)
from atlas_mag.tokenization import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_32K = REPO.parent / "shared" / "reference" / "tokenizer_atlas_mag_32k.json"
SMALL = ReferenceSizes()  # vocab 97, dim 32, 2 layers, 4 heads, key dim 8, rank 24, omega window 8
WINDOW = 16


@pytest.fixture
def word_tokenizer(tmp_path) -> Path:
    """A 97-token tokenizer with the published special-token ids (<pad> 0, <unk> 1, <bos> 2, <eos> 3)."""
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(SMALL.vocab_size - 4)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def save(checkpoint, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


def assert_nothing_left(parent: Path, output: Path) -> None:
    """No output folder and no staging folder beside it."""
    assert not output.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}.")]


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(sizes=ReferenceSizes(disable_memory=True)),
        dict(persistent_scale=0.2, normalizer_scale=1 / 32),
        dict(untied=True),
    ],
    ids=["memory", "attention-only", "other-qk-scales", "untied-head"],
)
def test_small_checkpoint_converts_to_the_reference_forward(tmp_path, word_tokenizer, variant):
    sizes = variant.get("sizes", SMALL)
    sd = reference_state_dict(
        sizes,
        persistent_scale=variant.get("persistent_scale", 0.1),
        normalizer_scale=variant.get("normalizer_scale", 0.01),
    )
    if variant.get("untied"):
        sd["lm_head.weight"] = sd["tok_emb.weight"] + 0.05 * torch.randn_like(sd["tok_emb.weight"])
    checkpoint_path = save(reference_checkpoint(sizes, window=WINDOW, state_dict=sd), tmp_path / "ckpt.pt")
    output = convert_checkpoint(checkpoint_path, word_tokenizer, tmp_path / "out")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out", "tokenizer.json"]
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_atlas.py",
        "modeling_atlas.py",
        "memory_atlas.py",
        "cache_atlas.py",
        "ops_atlas.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert (output / name).is_file(), name
    config_json = json.loads((output / "config.json").read_text())
    assert config_json["architectures"] == ["AtlasMAGForCausalLM"]
    assert config_json["auto_map"] == {
        "AutoConfig": "configuration_atlas.AtlasMAGConfig",
        "AutoModelForCausalLM": "modeling_atlas.AtlasMAGForCausalLM",
    }

    model, info = AtlasMAGForCausalLM.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        sizes.vocab_size,
        sizes.dim,
        sizes.n_layers,
        sizes.n_heads,
    )
    assert config.intermediate_size == sizes.ffn_hidden
    assert (config.sliding_window, config.ttl_ns_steps, config.ttl_lr, config.ttl_adaptive_lr) == (
        WINDOW,
        10,
        0.01,
        True,
    )
    assert config.use_memory is not sizes.disable_memory
    assert config.tie_word_embeddings is not variant.get("untied", False)
    if config.use_memory:
        assert (config.memory_key_dim, config.poly_degree, config.poly_rank) == (
            sizes.key_dim,
            2,
            sizes.poly_rank,
        )
        assert (config.memory_mlp_hidden_size, config.gamma_gate_hidden_size) == (
            sizes.memory_hidden,
            sizes.gamma_hidden,
        )
        assert (config.omega_window, config.omega_decay) == (sizes.omega_window, sizes.omega_decay)
        assert config.qk_persistent_scale == variant.get("persistent_scale", 0.1)
        assert config.qk_normalizer_scale == variant.get("normalizer_scale", 0.01)

    stored = load_file(output / "model.safetensors")
    assert ("lm_head.weight" in stored) is bool(variant.get("untied"))
    assert sum(t.numel() for t in stored.values()) == sum(p.numel() for p in model.parameters())
    assert not any("momentum" in key or "qk_memory" in key for key in stored)

    ids = torch.randint(0, sizes.vocab_size, (3 * WINDOW,), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(
        sd, ids, sizes.n_layers, sizes.n_heads, WINDOW, sizes.omega_window, sizes.omega_decay
    )
    with torch.no_grad():
        logits = model(ids[None], ttl=False).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-5

    card = (output / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "library_name: transformers" in card
    assert "pipeline_tag: text-generation" in card and "trust_remote_code=True" in card
    assert hashlib.sha256(checkpoint_path.read_bytes()).hexdigest() in card
    assert "ckpt.pt" in card and "training step 8800" in card and f"{8800 * 8 * 2048:,} tokens seen" in card
    assert "NIAH 85.9%" in card and "not retrieval accuracy" in card and "4 validation sequences" in card
    if config.use_memory:
        assert f"Dropped: the {2 * sizes.n_layers * 5} TTL momentum buffers" in card
        assert "never trained by the outer optimiser" in card
    else:
        assert "attention-only ablation" in card


def test_published_size_checkpoint_converts_with_the_reference_parameter_count(tmp_path):
    checkpoint = reference_checkpoint(PUBLISHED, window=512, optimizer_state=False)
    output = convert_checkpoint(
        save(checkpoint, tmp_path / "checkpoint_step008800.pt"), TOKENIZER_32K, tmp_path / "out"
    )
    model, info = AtlasMAGForCausalLM.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == 43_356_422
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        32000,
        512,
        6,
        8,
    )
    assert (config.intermediate_size, config.memory_key_dim, config.feature_size, config.poly_rank) == (
        1365,
        64,
        2144,
        512,
    )
    assert (config.sliding_window, config.omega_window, config.memory_mlp_hidden_size) == (512, 256, 256)
    assert (config.qk_persistent_scale, config.qk_normalizer_scale, config.omega_decay) == (0.1, 0.01, 0.95)
    stored = load_file(output / "model.safetensors")
    assert "lm_head.weight" not in stored
    assert torch.equal(
        stored["model.layers.5.memory.mlp.0.weight"],
        checkpoint["model_state_dict"]["blocks.5.memory.w2.weight"],
    )
    assert "43,356,422" in (output / "README.md").read_text()


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["atlas_mag"] = None  # the package cannot be imported: the folder's own code must suffice
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    prompt = " ".join(f"Note {i}: the river bends north of the old mill." for i in range(30))
    settings = dict(max_new_tokens=12, do_sample=False, return_full_text=False)
    print(json.dumps({
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "pipeline_model_class": type(generator.model).__module__,
        "ttl_lr": config.ttl_lr,
        "prompt_ids": tokenizer(prompt).input_ids,
        "ttl_on": generator(prompt, **settings)[0]["generated_text"],
        "ttl_off": generator(prompt, ttl=False, **settings)[0]["generated_text"],
        "atlas_mag_imported": any(
            name.split(".")[0] == "atlas_mag" and module is not None for name, module in sys.modules.items()
        ),
    }))
    """
)


def test_fresh_process_loads_the_folder_with_remote_code_and_generates(tmp_path):
    sizes = ReferenceSizes(vocab_size=32000)
    # A large inner learning rate (read from the training settings) makes TTL change greedy decoding.
    checkpoint = reference_checkpoint(sizes, window=64, ttl_eta=0.3)
    output = convert_checkpoint(
        save(checkpoint, tmp_path / "ckpt.pt"), TOKENIZER_32K, tmp_path / "atlas-tiny"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "child.py").write_text(CHILD)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "HF_HOME": str(work / "hf"),
        "HF_MODULES_CACHE": str(work / "modules"),
        "HF_HUB_OFFLINE": "1",
        # One thread: tiny matmuls with an OpenMP team on a busy 2-core CI machine wait whole time slices.
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "child.py", str(output)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["config_class"].startswith("transformers_modules.") and report["config_class"].endswith(
        "AtlasMAGConfig"
    )
    assert report["model_class"].startswith("transformers_modules.")
    assert report["pipeline_model_class"].startswith("transformers_modules.")
    assert not report["atlas_mag_imported"]
    assert report["ttl_lr"] == 0.3
    assert (
        report["prompt_ids"][0] == 2 and 2 not in report["prompt_ids"][1:] and 3 not in report["prompt_ids"]
    )
    assert len(report["prompt_ids"]) > 256  # longer than one TTL chunk: the memory learns before decoding
    assert report["ttl_on"] and report["ttl_off"] and report["ttl_on"] != report["ttl_off"]
    assert (work / "modules" / "transformers_modules").is_dir()


@pytest.fixture(scope="module")
def tokenizers_32k(tmp_path_factory):
    """The published tokenizer as `load_tokenizer` builds it, and as `AutoTokenizer` reloads it once saved."""
    tokenizer = load_tokenizer(TOKENIZER_32K)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return tokenizer, AutoTokenizer.from_pretrained(folder), Tokenizer.from_file(str(TOKENIZER_32K))


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, trailing newline\n",
        "Ünïcödé — 漢字, emoji 🙂 and Ελληνικά",
        "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
    ],
)
def test_tokenizer_round_trips_and_starts_with_bos(tokenizers_32k, text):
    *tokenizers, raw = tokenizers_32k
    for tok in tokenizers:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id == 2
        assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 3)
        # `<bos> text`: the prompt part of the training documents `<bos> text <eos>`.
        assert 2 not in ids[1:] and 3 not in ids
        assert ids[1:] == raw.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------------------------
# Errors: each names the problem, and nothing is left behind.
# ------------------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_tensors_are_listed_in_one_error(tmp_path, word_tokenizer):
    checkpoint = reference_checkpoint(SMALL, window=WINDOW)
    sd = checkpoint["model_state_dict"]
    del sd["blocks.1.ffn.w2.weight"]
    del sd["blocks.0.memory.poly_norm.bias"]
    sd["blocks.0.qkv.w_x.weight"] = torch.zeros(4)
    sd["blocks.1.memory.w1.weight"] = sd["blocks.1.memory.w1.weight"].T.contiguous()
    output = tmp_path / "out"
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(save(checkpoint, tmp_path / "ckpt.pt"), word_tokenizer, output)
    message = str(raised.value)
    assert "missing keys (2): blocks.0.memory.poly_norm.bias; blocks.1.ffn.w2.weight" in message
    assert "unexpected keys (1): blocks.0.qkv.w_x.weight" in message
    assert "wrong shapes (1): blocks.1.memory.w1.weight: [16, 8], expected [8, 16]" in message
    assert "momentum" not in message  # momentum buffers are expected extras, not unexpected keys
    assert_nothing_left(tmp_path, output)


def test_training_settings_that_contradict_the_tensors_are_refused(word_tokenizer, tmp_path):
    checkpoint = reference_checkpoint(SMALL, window=WINDOW, n_heads=8, poly_degree=3)
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(save(checkpoint, tmp_path / "ckpt.pt"), word_tokenizer, tmp_path / "out")
    assert "n_heads=8 but the tensors give num_attention_heads=4" in str(raised.value)
    assert "poly_degree=3 but the tensors give poly_degree=2" in str(raised.value)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_disable_memory_setting_with_memory_tensors_reports_them_as_unexpected():
    sd = reference_state_dict(SMALL)
    config = config_from_reference_state_dict(sd, {"disable_memory": True})
    assert not config.use_memory
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(\d+\): .*blocks\.0\.memory\.proj_down\.weight"
    ):
        convert_state_dict(sd, config)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (
            lambda sd: sd["blocks.0.qk_memory.m_persistent"].add_(torch.randn(32, 32)),
            "is not a scaled identity",
        ),
        (
            lambda sd: sd["blocks.1.qk_memory.m_persistent"].mul_(2.0),
            "blocks.1.qk_memory.m_persistent is not 0.1 * I",
        ),
        (
            lambda sd: sd["blocks.1.qk_memory.norm_persistent"].fill_(1.0),
            "blocks.1.qk_memory.norm_persistent is 1.0",
        ),
        (
            lambda sd: sd["blocks.0.qk_memory.decay_weights"].add_(0.5),
            "decay_weights is not decay ** arange(8)",
        ),
        (lambda sd: sd["lm_head.weight"].__setitem__(0, 1.0), None),  # untied, not an error
    ],
    ids=[
        "m_persistent-not-identity",
        "m_persistent-scale-differs",
        "norm-differs",
        "decay-not-geometric",
        "untied",
    ],
)
def test_fixed_buffers_are_checked_against_their_defining_values(tamper, expected):
    sd = reference_state_dict(SMALL)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    tamper(sd)
    if expected is None:
        config = config_from_reference_state_dict(sd)
        assert not config.tie_word_embeddings
        assert set(convert_state_dict(sd, config)) >= {"lm_head.weight", "model.embed_tokens.weight"}
        return
    with pytest.raises(CheckpointError) as raised:
        convert_state_dict(sd, config_from_reference_state_dict(sd))
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"this is not a torch file", "could not be read by torch.load"),
        ([1, 2, 3], "holds a list, not a dict"),
        ("bare", "is a bare state dict"),
        ({"state_dict": {}, "step": 3}, "has no 'model_state_dict'"),
        (
            {"model_state_dict": {"w": [1.0]}, "config": {}},
            "'model_state_dict' is not a dict of named tensors",
        ),
        ({"model_state_dict": {"w": torch.ones(1)}, "config": "dim=512"}, "'config' is a str"),
    ],
    ids=["garbage", "list", "bare-state-dict", "no-model-state-dict", "not-tensors", "config-not-dict"],
)
def test_files_that_are_not_training_checkpoints_are_refused(tmp_path, word_tokenizer, content, expected):
    path = tmp_path / "file.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(reference_state_dict(SMALL) if content == "bare" else content, path)
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(path, word_tokenizer, tmp_path / "out")
    assert expected in str(raised.value)
    assert "expected an Atlas-MAG training checkpoint" in str(raised.value)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_the_pickle_warning_is_logged(tmp_path, word_tokenizer, caplog):
    checkpoint_path = save(reference_checkpoint(SMALL, window=WINDOW), tmp_path / "ckpt.pt")
    with caplog.at_level(logging.WARNING, logger="atlas_mag.convert"):
        convert_checkpoint(checkpoint_path, word_tokenizer, tmp_path / "out")
    assert any(
        "pickle" in r.message and "trust" in r.message for r in caplog.records if r.levelno == logging.WARNING
    )


def test_non_empty_output_needs_overwrite(tmp_path, word_tokenizer):
    checkpoint_path = save(reference_checkpoint(SMALL, window=WINDOW), tmp_path / "ckpt.pt")
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not empty; pass overwrite=True \(--overwrite\)"):
        convert_checkpoint(checkpoint_path, word_tokenizer, output)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    convert_checkpoint(checkpoint_path, word_tokenizer, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out", "tokenizer.json"]


def test_a_failure_while_writing_leaves_the_previous_folder_untouched(tmp_path, word_tokenizer, monkeypatch):
    checkpoint_path = save(reference_checkpoint(SMALL, window=WINDOW), tmp_path / "ckpt.pt")
    output = convert_checkpoint(checkpoint_path, word_tokenizer, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(checkpoint_path, word_tokenizer, output, overwrite=True)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out", "tokenizer.json"]


def test_tokenizer_problems_are_named(tmp_path, word_tokenizer):
    checkpoint_path = save(reference_checkpoint(SMALL, window=WINDOW), tmp_path / "ckpt.pt")
    with pytest.raises(
        CheckpointError, match="the tokenizer has 32000 tokens but the checkpoint's embedding only 97"
    ):
        convert_checkpoint(checkpoint_path, TOKENIZER_32K, tmp_path / "out")
    no_specials = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    no_specials.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"lacks the special tokens \['<pad>', '<bos>', '<eos>'\]"):
        convert_checkpoint(checkpoint_path, tmp_path / "plain.json", tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint_cli", REPO / "scripts" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_converts_and_pushes_exactly_the_output_folder(tmp_path, word_tokenizer, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeHfApi:
        def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(
                (
                    "upload_folder",
                    Path(folder_path),
                    repo_id,
                    sorted(p.name for p in Path(folder_path).iterdir()),
                )
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    checkpoint_path = save(reference_checkpoint(SMALL, window=WINDOW), tmp_path / "ckpt.pt")
    output = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(checkpoint_path),
        "--tokenizer",
        str(word_tokenizer),
        "--output",
        str(output),
        "--push-to-hub",
        "someone/atlas-mag-tiny",
        "--private",
    ]
    load_cli().main(argv)
    assert capsys.readouterr().out.strip() == str(output)
    assert calls == [
        ("create_repo", "someone/atlas-mag-tiny", True, True),
        ("upload_folder", output, "someone/atlas-mag-tiny", sorted(p.name for p in output.iterdir())),
    ]
    assert (
        'from_pretrained("someone/atlas-mag-tiny", trust_remote_code=True)'
        in (output / "README.md").read_text()
    )

    with pytest.raises(SystemExit, match="error: .* exists and is not empty"):
        load_cli().main(argv)
    assert len(calls) == 2  # a refused conversion pushes nothing
