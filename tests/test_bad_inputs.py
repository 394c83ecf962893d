"""Bad input gets an error that names the problem, and loses nothing: the cache, the config and the files on
disk are as they were."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from atlas_mag import AtlasMAGCache, AtlasMAGConfig, AtlasMAGForCausalLM
from atlas_mag.cli import coerce_model_fields, local_or_hub
from atlas_mag.hub import save_model_folder
from atlas_mag.reporting import write_json
from atlas_mag.tokenization import load_tokenizer
from atlas_mag.training.finetune import training_arguments_from

REPO = Path(__file__).resolve().parents[1]


def cache_tensors(cache: AtlasMAGCache) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in cache.state_tensors()]


def assert_cache_unchanged(cache: AtlasMAGCache, before: list[torch.Tensor], seen: int) -> None:
    after = list(cache.state_tensors())
    assert cache.get_seq_length() == seen and len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field", ["ttl_lr", "rope_theta", "rms_norm_eps", "qk_normalizer_scale", "omega_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf, "0.01"])
def test_config_refuses_non_finite_or_non_numeric_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        AtlasMAGConfig(**{field: value})


@pytest.mark.parametrize("field", ["use_memory", "ttl_enabled", "ttl_adaptive_lr", "use_cache"])
@pytest.mark.parametrize("value", ["false", "no", 0])
def test_config_refuses_strings_for_switches(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be True or False"):
        AtlasMAGConfig(**{field: value})


def test_config_refuses_unknown_keys_with_a_suggestion_and_loads_what_transformers_saves(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\): `hidden_sise` \(did you mean `hidden_size`\?\)"):
        AtlasMAGConfig(hidden_sise=32)
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Keys Transformers wrote in earlier releases load too.
    saved.update(torch_dtype="float32", transformers_version="4.57.0", architectures=["AtlasMAGForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = AtlasMAGConfig.from_pretrained(tmp_path, ttl_enabled=False)
    assert reloaded.hidden_size == config.hidden_size and reloaded.ttl_enabled is False


def test_set_values_are_coerced_to_the_field_type_or_name_the_key():
    assert coerce_model_fields({"ttl_lr": "1e-3", "hidden_size": 32}, "model.") == {"ttl_lr": 1e-3, "hidden_size": 32}
    with pytest.raises(ValueError, match="`model.hidden_size` must be an integer"):
        coerce_model_fields({"hidden_size": "big"}, "model.")
    arguments = training_arguments_from({"learning_rate": "1e-4", "max_steps": 200})
    assert arguments == {"learning_rate": 1e-4, "max_steps": 200}
    with pytest.raises(ValueError, match="`learning_rate` must be a number"):
        training_arguments_from({"learning_rate": "fast"})
    with pytest.raises(ValueError, match="learning_rat"):
        training_arguments_from({"learning_rat": 1e-4})


# ------------------------------------------------------------------------------------------------ forward


def test_unknown_forward_arguments_raise_and_known_ones_are_documented():
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    ids = torch.randint(4, 97, (1, 6))
    with pytest.raises(TypeError, match="'cache_params'"):
        model(ids, cache_params=None)
    with pytest.raises(TypeError, match="'position_idz'"):
        model.model(ids, position_idz=None)
    with pytest.raises(ValueError, match="no attention weights"):
        model(ids, output_attentions=True)
    model(ids, output_attentions=False, cache_position=torch.arange(6))  # what generate passes
    cache = model(ids).cache
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], cache=cache, past_key_values=cache)
    # The old name still works, with the same result as the new one.
    old = model(ids[:, :1], past_key_values=model(ids).cache).logits
    new = model(ids[:, :1], cache=model(ids).cache).logits
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_no_deprecation_warning_from_our_forward_or_outputs(recwarn):
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    ids = torch.randint(4, 97, (1, 6))
    with torch.no_grad():
        out = model(ids)
        model(ids[:, :1], cache=out.cache)
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_hidden_states_flag_comes_from_the_config():
    model = AtlasMAGForCausalLM(tiny_config(output_hidden_states=True)).eval()
    ids = torch.randint(4, 97, (1, 6))
    assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1
    assert model(ids, output_hidden_states=False).hidden_states is None


def test_ttl_gradient_norms_are_per_sequence_and_always_present():
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    ids = torch.randint(4, 97, (3, 10))  # two updates per sequence (chunks of 4)
    with torch.no_grad():
        batched = model(ids).ttl_gradient_norms
        single = torch.cat([model(ids[i : i + 1]).ttl_gradient_norms for i in range(3)])
        off = model(ids, ttl=False).ttl_gradient_norms
    assert batched.shape == (3, model.config.num_hidden_layers) and (batched > 0).all()
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert off.shape == batched.shape and (off == 0).all()


def test_labels_of_another_shape_raise():
    model = AtlasMAGForCausalLM(tiny_config())
    ids = torch.randint(4, 97, (2, 6))
    with pytest.raises(ValueError, match=r"labels must have the input's shape \(2, 6\)"):
        model(ids, labels=ids.T)


def test_non_finite_input_at_a_decoding_step_is_refused_and_the_cache_stays_usable():
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    ids = torch.randint(4, 97, (1, 24))
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        cache = model(inputs_embeds=embeds[:, :21]).cache  # the next step does not end a TTL chunk
        before = cache_tensors(cache)
        poisoned = embeds[:, 21:22].clone()
        poisoned[0, 0, 3] = math.nan
        with pytest.raises(ValueError, match="input embeddings.*NaN or inf.*cache was left as it was"):
            model(inputs_embeds=poisoned, cache=cache)
        assert_cache_unchanged(cache, before, 21)
        continued = torch.cat([model(inputs_embeds=embeds[:, t : t + 1], cache=cache).logits for t in range(21, 24)], 1)
        expected = model(inputs_embeds=embeds, use_cache=False).logits[:, 21:]
    torch.testing.assert_close(continued, expected, atol=1e-5, rtol=0)


def test_a_cache_from_another_configuration_is_refused_naming_the_difference():
    model = AtlasMAGForCausalLM(tiny_config()).eval()
    other = AtlasMAGForCausalLM(tiny_config(ttl_chunk_size=8, sliding_window=12)).eval()
    ids = torch.randint(4, 97, (1, 6))
    with torch.no_grad():
        cache = other(ids).cache
        before = cache_tensors(cache)
        with pytest.raises(
            ValueError, match=r"sliding_window=12 \(this model: 16\).*ttl_chunk_size=8 \(this model: 4\)"
        ):
            model(ids[:, :1], cache=cache)
    assert_cache_unchanged(cache, before, 6)
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        model(ids, cache=AtlasMAGCache(tiny_config(num_hidden_layers=3)))


# ------------------------------------------------------------------------------------------------ entry points


def test_a_missing_local_tokenizer_or_model_path_is_named_without_trying_the_hub(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"tokenizer '{missing}' does not exist"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="'outputs/tiny/finall' does not exist"):
        local_or_hub("outputs/tiny/finall", "--model")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        local_or_hub("someone/some-model", "--model")
    assert time.perf_counter() - start < 5
    assert local_or_hub(tmp_path, "--model") == str(tmp_path)


@pytest.mark.parametrize(
    "script, arguments",
    [
        ("demo_ttl_inference.py", ["--model", "{empty}"]),
        ("evaluate_ppl.py", ["--model", "outputs/tiny/finall", "--data", "{empty}/x.jsonl"]),
    ],
)
def test_scripts_say_what_is_wrong_with_a_model_folder(tmp_path, script, arguments):
    arguments = [argument.format(empty=tmp_path) for argument in arguments]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "does not exist" in result.stderr or "no config.json" in result.stderr, result.stderr


def test_written_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        written = write_json(tmp_path / "results" / "out.json", {"a": 1})
        folder = save_model_folder(AtlasMAGForCausalLM(tiny_config()), tmp_path / "model")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
