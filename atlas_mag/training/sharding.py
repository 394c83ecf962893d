"""FSDP2 sharding of a training run (`training.sharding: fsdp2`): each Atlas-MAG block and the root are
`fully_shard`-ed over all processes, on CPU (gloo) and GPU (NCCL) alike, and the run's checkpoints and export hold
the full, unsharded tensors.

The sharding is ours rather than Accelerate's FSDP plugin: accelerate 1.3 (the oldest release we allow) has no
FSDP2, the plugin refuses CPUs, and its bf16 policy would hand the memory bf16 copies of its initial fast weights.
Here the parameters stay fp32 and bf16 comes from the same autocast as in an unsharded run. Inside a block's
forward FSDP2 has swapped in the unsharded parameters (plain tensors), so the memory's test-time learning reads
its initial fast weights as it does unsharded; outside a forward they are sharded DTensors.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from ..modeling_atlas import AtlasMAGBlock

SHARDING_CHOICES = ("none", "fsdp2")
# The launches `fully_shard` runs under: torchrun-style processes on CPUs or on GPUs.
SHARDED_LAUNCHES = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
# A parametrized parameter's name in `state_dict`, and the name it has in an unparametrized model.
PARAMETRIZED = "parametrizations.{name}.original"


class ScalarAsVector(nn.Module):
    """Holds a 0-d parameter as a 1-element vector: FSDP2 shards along dim 0 and refuses 0-d parameters (the
    memory's `output_scale`). The module still reads a 0-d tensor."""

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.reshape(())

    def right_inverse(self, scalar: torch.Tensor) -> torch.Tensor:
        return scalar.reshape(1)


def check_launch(accelerator: Accelerator, sharding: str) -> None:
    """Refuse launches this run cannot shard (or would shard with an untested mechanism), naming the fix."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "Accelerate's FSDP plugin is not supported (it has never run on Atlas-MAG, and accelerate 1.3 has no "
            "FSDP2); launch with configs/accelerate_fsdp.yaml (multi-GPU processes) and set "
            "`training.sharding: fsdp2`, which shards each block with FSDP2 itself"
        )
    if sharding == "fsdp2" and accelerator.distributed_type not in SHARDED_LAUNCHES:
        raise ValueError(
            f"`training.sharding: fsdp2` needs several processes on CPUs or GPUs (this launch is "
            f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es)): start it with "
            "`accelerate launch --config_file configs/accelerate_fsdp.yaml` or torchrun"
        )


def shard_model(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Shard `model` in place over all processes with FSDP2: each `AtlasMAGBlock` is a unit (its parameters are
    gathered for its forward and backward, then freed) and the root holds the rest (embeddings, tied head, final
    norm). Under mixed precision its forward runs in Accelerate's autocast, as a prepared model's does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(accelerator.device)
    for module in list(model.modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                parametrize.register_parametrization(module, name, ScalarAsVector())
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for module in model.modules():
        if isinstance(module, AtlasMAGBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if accelerator.mixed_precision != "no":
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            with accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a DTensor (a sharded parameter, or a norm computed from sharded gradients) is gathered."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: its shard of a DTensor, else `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _scalar_names(model: nn.Module) -> dict[str, str]:
    """The state-dict names of the 0-d parameters `shard_model` parametrized, to their unsharded names."""
    names = {}
    for module_name, module in model.named_modules():
        for name in getattr(module, "parametrizations", {}):
            prefix = f"{module_name}." if module_name else ""
            names[prefix + PARAMETRIZED.format(name=name)] = prefix + name
    return names


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (the tied LM head), saved once like Accelerate does."""
    first_names: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_names:
            aliases.add(name)
        first_names.setdefault(id(param), name)
    return aliases


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered onto the main process's host memory; the other processes get empty dicts.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters of a sharded model under an unsharded model's names and shapes, on the main process
    (empty elsewhere). All processes must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_state_options())
    scalars = _scalar_names(model)
    return {scalars.get(name, name): value.reshape(()) if name in scalars else value for name, value in state.items()}


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, is_main: bool) -> None:
    """Write the full model (`model.safetensors`, as an unsharded checkpoint holds it) and optimizer state
    (`optimizer.bin`, keyed by parameter name) of a sharded run into `folder`. All processes must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = full_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if is_main:
        aliases = _tied_aliases(model)
        saved = {name: value.contiguous() for name, value in model_state.items() if name not in aliases}
        save_file(saved, str(folder / "model.safetensors"))
        torch.save(optimizer_state, folder / "optimizer.bin")


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load what `save_sharded_state` wrote into a sharded model and its optimizer: each process reads the full
    tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = load_file(str(folder / "model.safetensors"))
    unsharded_names = {unsharded: name for name, unsharded in _scalar_names(model).items()}
    model_state = {
        unsharded_names.get(name, name): value.reshape(1) if name in unsharded_names else value
        for name, value in saved.items()
    }
    sources = {id(param): name for name, param in model.named_parameters()}
    for alias, param in model.named_parameters(remove_duplicate=False):
        model_state.setdefault(alias, model_state[sources[id(param)]])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    optimizer_state = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
