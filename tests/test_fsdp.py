"""FSDP2 sharding of a training run (`training.sharding: fsdp2`) on CPU: two processes over gloo, started the way
torchrun starts them, against an unsharded single-process run of the same steps.

Every document is exactly one training window long, so the two processes' micro-batches (documents 0, 2, ... and
1, 3, ...) together hold the same windows as the single process's batch of 4: their averaged gradient is the same
mean, up to fp32 rounding (the sharded runs also accumulate gradients over 2 micro-batches)."""

import json
import multiprocessing
import os
import shutil
import socket
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from atlas_mag import AtlasMAGForCausalLM
from atlas_mag.training import config_from_dict, iterate_metrics, load_config, train
from atlas_mag.training.sharding import SHARDING_CHOICES, check_launch

SEQ_LEN = 32
STEPS = 3
# The tests' tiny model with the published inner-loop settings, its TTL chunk crossed twice by a window.
MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "sliding_window": 16,
    "memory_key_dim": 8,
    "memory_expansion": 2,
    "poly_rank": 24,
    "omega_window": 16,
    "gamma_gate_hidden_size": 8,
    "ttl_chunk_size": 16,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A word tokenizer and documents of SEQ_LEN - 1 words (with <bos> and <eos>: one window each)."""
    from conftest import word_tokenizer

    folder = tmp_path_factory.mktemp("fsdp_data")
    word_tokenizer().save_pretrained(folder / "tokenizer")
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(4, 97, (24, SEQ_LEN - 1), generator=generator).tolist()
    lines = [json.dumps({"text": " ".join(f"w{i}" for i in row)}) for row in words]
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "tokenizer", folder / "documents.jsonl"


def run_config(output_dir: Path, data: tuple[Path, Path], sharding: str) -> dict:
    """Steps of 4 windows: one process's batch of 4 unsharded, or 2 processes x 2 accumulated windows sharded."""
    tokenizer, documents = data
    micro_batch_size, accumulation = (4, 1) if sharding == "none" else (1, 2)
    return {
        "output_dir": str(output_dir),
        "tokenizer": str(tokenizer),
        "model": dict(MODEL),
        "data": {
            "seq_len": SEQ_LEN,
            "validation_documents": 2,
            "validation_windows": 2,
            "sources": [{"path": str(documents)}],
        },
        "training": {
            "max_steps": STEPS,
            "micro_batch_size": micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            # Below the gradient norms (about 0.9): every step clips its sharded gradients.
            "max_grad_norm": 0.5,
            "gradient_checkpointing": True,
            "sharding": sharding,
        },
        "logging": {"log_every": 1, "eval_every": 0, "save_every": 2, "trackers": [], "progress_bar": False},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config: dict, folder: Path, resume: str | None = None) -> list[dict]:
    """Run `config` sharded in two processes over gloo, each with the environment torchrun gives it; returns
    what each process recorded (see `run_one_process`). The processes are forked from this one, which has
    imported everything already (starting two interpreters costs more than the run on a busy machine)."""
    config_path = folder / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = str(free_port())
    environment = {"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    environment.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["atlas_mag.training", "accelerate"])
    records = [folder / f"record_{rank}.json" for rank in (0, 1)]
    processes = [
        context.Process(target=run_one_process, args=(rank, environment, config_path, records[rank], resume))
        for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    results = [json.loads(path.read_text()) if path.is_file() else {"error": "no record"} for path in records]
    for process, result in zip(processes, results, strict=True):
        assert process.exitcode == 0 and "error" not in result, result.get("error", process.exitcode)
    return results


def run_one_process(rank: int, environment: dict, config_path: Path, record_path: Path, resume: str | None) -> None:
    """One process of `launch`: the run, recording each parameter's local and full size after sharding and the
    types of the memory parameters its test-time learning starts from (or the error)."""
    from atlas_mag.memory_atlas import AtlasMAGMemory
    from atlas_mag.training import loop
    from atlas_mag.training.sharding import local_tensor

    os.environ.update(environment, RANK=str(rank), LOCAL_RANK=str(rank))
    record = {"shards": {}, "memory_weight_types": set()}

    def recording_shard_model(model, accelerator):
        model = shard_model(model, accelerator)
        for name, param in model.named_parameters():
            name = name.replace(".parametrizations.output_scale.original", ".output_scale")
            record["shards"][name] = (local_tensor(param).numel(), param.numel(), param.shape[0])
        return model

    def recording_initial_state(self, batch_size):
        record["memory_weight_types"].update(type(tensor).__name__ for tensor in self.weights().tensors())
        return initial_state(self, batch_size)

    shard_model, initial_state = loop.shard_model, AtlasMAGMemory.initial_state
    loop.shard_model, AtlasMAGMemory.initial_state = recording_shard_model, recording_initial_state
    try:
        train(load_config(config_path), resume=resume)
    except BaseException:
        record_path.write_text(json.dumps({"error": traceback.format_exc()}))
        raise
    record["memory_weight_types"] = sorted(record["memory_weight_types"])
    record_path.write_text(json.dumps(record))


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, data) -> Path:
    output_dir = tmp_path_factory.mktemp("unsharded")
    train(config_from_dict(run_config(output_dir, data, "none")))
    return output_dir


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("sharded")
    records = launch(run_config(folder / "run", data, "fsdp2"), folder)
    return folder / "run", records


def test_sharded_steps_equal_unsharded_steps(unsharded, sharded):
    output_dir, records = sharded
    expected = load_file(unsharded / "final" / "model.safetensors")
    trained = load_file(output_dir / "final" / "model.safetensors")
    # Three AdamW steps of 1e-3 from the same start on the same windows: only fp32 rounding of the sums (over
    # processes and micro-batches, or over one batch) tells them apart (1.0e-6 measured).
    assert max_difference(expected, trained) < 5e-6
    reference = [r for r in iterate_metrics(unsharded / "metrics.jsonl") if "loss" in r]
    measured = [r for r in iterate_metrics(output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in measured] == list(range(1, STEPS + 1))
    for ours, theirs in zip(measured, reference, strict=True):
        assert ours["lr"] == theirs["lr"] and ours["tokens_seen"] == theirs["tokens_seen"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        # The norm of the averaged full gradient (not of one process's shard, nor of a sum over processes).
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6)

    # Each process holds its half (FSDP2 splits dim 0) of every parameter, and the memory read whole tensors.
    shards = [record["shards"] for record in records]
    unsharded_model = AtlasMAGForCausalLM(AtlasMAGForCausalLM.config_class(**MODEL, vocab_size=97))
    assert shards[0].keys() == shards[1].keys() == {name for name, _ in unsharded_model.named_parameters()}
    for name, (local, full, rows) in shards[0].items():
        other_local = shards[1][name][0]
        assert local + other_local == full, name
        assert max(local, other_local) <= -(-rows // 2) * (full // rows), name
    assert sum(local for local, _, _ in shards[0].values()) < 0.55 * sum(full for _, full, _ in shards[0].values())
    # Unsharded parameters, never DTensors (the scalar `output_scale` is read through its 1-element vector).
    for record in records:
        assert record["memory_weight_types"] == ["Parameter", "Tensor"]


def test_sharded_checkpoint_resumes_exactly_and_loads_unsharded(unsharded, sharded, tmp_path, data):
    output_dir, _ = sharded
    # Resume from the step-2 checkpoint of the sharded run in a fresh folder: step 3 must come out the same.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoints" / "step_00000002", resumed_dir / "checkpoints" / "step_00000002")
    launch(run_config(resumed_dir, data, "fsdp2"), tmp_path, resume="latest")
    uninterrupted = load_file(output_dir / "final" / "model.safetensors")
    assert max_difference(uninterrupted, load_file(resumed_dir / "final" / "model.safetensors")) <= 1e-6
    losses = [
        [r["loss"] for r in iterate_metrics(folder / "metrics.jsonl") if "loss" in r]
        for folder in (output_dir, resumed_dir)
    ]
    assert losses[1] == pytest.approx(losses[0][2:], abs=1e-6)

    # The sharded checkpoint holds the full parameters under the unsharded names and shapes (the tied head once,
    # as an unsharded checkpoint): a new unsharded model loads every one of them, and they are the unsharded
    # run's parameters at the same step.
    saved = load_file(output_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    model = AtlasMAGForCausalLM(AtlasMAGForCausalLM.config_class(**MODEL, vocab_size=97))
    loaded = model.load_state_dict(saved, strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert max_difference({name: model.state_dict()[name] for name in saved}, saved) == 0
    expected = load_file(unsharded / "checkpoints" / "step_00000002" / "model.safetensors")
    assert max_difference(expected, saved) < 5e-6
    final = AtlasMAGForCausalLM.from_pretrained(output_dir / "final").state_dict()
    last = load_file(output_dir / "checkpoints" / "step_00000003" / "model.safetensors")
    assert max_difference({name: final[name] for name in last}, last) == 0


def test_sharding_is_refused_where_it_cannot_run(tmp_path, data):
    with pytest.raises(ValueError, match=r"`training.sharding` must be one of"):
        config_from_dict(run_config(tmp_path, data, "fsdp1"))
    raw = run_config(tmp_path, data, "fsdp2")
    raw["training"]["mixed_precision"] = "fp16"
    with pytest.raises(ValueError, match=r"fp16.*training.sharding: fsdp2"):
        config_from_dict(raw)
    with pytest.raises(ValueError, match=r"`training.sharding: fsdp2` needs several processes"):
        train(config_from_dict(run_config(tmp_path / "single", data, "fsdp2")))
    assert not (tmp_path / "single").exists(), "refused before anything is written"
    # A GPU launch through Accelerate's FSDP plugin (`distributed_type: FSDP`), sharded or not.
    plugin_launch = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    for sharding in SHARDING_CHOICES:
        with pytest.raises(ValueError, match=r"FSDP plugin is not supported.*accelerate_fsdp.yaml"):
            check_launch(plugin_launch, sharding)


def test_fsdp_recipe_is_a_multi_gpu_launch_of_this_accelerate():
    """configs/accelerate_fsdp.yaml reads as a launch configuration of the installed Accelerate (the newest and
    1.3 in CI): one process per GPU, without the FSDP plugin that `check_launch` refuses."""
    from accelerate.commands.config.config_args import load_config_from_file

    recipe = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp.yaml"))
    assert recipe.distributed_type == DistributedType.MULTI_GPU and recipe.num_processes == 2
    assert not recipe.fsdp_config and recipe.mixed_precision == "bf16"
