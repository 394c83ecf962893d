"""Resumable checkpoints of a training run: writing them so that a kill never leaves a half-written one,
finding the one to resume from and checking that it reads back, and the trainer state saved beside
`accelerator.save_state` (step, data position, the settings a resume must keep)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open

from ..reporting import move_folder_into_place
from .config import LoopConfig, TrainConfig
from .data import COMPLETION_COLUMN
from .sharding import save_sharded_state

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")


def checkpoints_dir(output_dir: Path) -> Path:
    """The folder of a run's checkpoints."""
    return output_dir / "checkpoints"


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders being written are hidden and not listed)."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (a file truncated or unreadable, say after a full disk or a copy cut
    short), or None if every file in it reads back."""
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):  # checks the header against the file's length
                    pass
            elif zipfile.is_zipfile(path):  # torch.save files (optimizer, scheduler, random states)
                with zipfile.ZipFile(path) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{path.name}: corrupt entry {bad}"
            elif path.suffix in (".bin", ".pt"):
                return f"{path.name}: not a complete torch.save archive"
        except Exception as error:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            return f"{path.name}: {error}"
    return None


def resolve_checkpoint(resume: str | Path, output_dir: Path) -> Path:
    """`resume` is "latest" (the newest intact checkpoint of `output_dir`; corrupt newer ones are skipped with
    a warning) or a checkpoint folder, which must be intact."""
    if str(resume) == "latest":
        root = checkpoints_dir(output_dir)
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        problems = []
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate)
            if problem is None:
                if problems:
                    warnings.warn(
                        f"--resume: skipped corrupt checkpoint(s) {'; '.join(problems)}; resuming from {candidate}",
                        stacklevel=2,
                    )
                return candidate
            problems.append(f"{candidate} ({problem})")
        raise ValueError(f"--resume: no intact checkpoint under {root}: {'; '.join(problems)}")
    path = Path(resume)
    if not (path / "trainer_state_rank0.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder written by atlas_mag.training")
    if (problem := checkpoint_problem(path)) is not None:
        raise ValueError(f"--resume: checkpoint {path} is corrupt ({problem})")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_root: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write `accelerator.save_state`, the full state of a `sharded` (model, optimizer), which Accelerate does
    not hold, and every process's trainer state into a hidden folder, then rename it to `step_XXXXXXXX`: a run
    killed while saving leaves no half-written checkpoint behind. Keeps the last `keep_last`. All processes must
    call it (the folder is shared)."""
    final = checkpoint_root / f"step_{step:08d}"
    staging = checkpoint_root / f".step_{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if sharded is not None:
        save_sharded_state(*sharded, staging, accelerator.is_main_process)
    state_file = staging / f"trainer_state_rank{accelerator.process_index}.json"
    state_file.write_text(json.dumps(trainer_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        move_folder_into_place(staging, final)
        for old in list_checkpoints(checkpoint_root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Process `rank`'s trainer state in `checkpoint`, which must have been written by `world_size` processes."""
    saved_ranks = len(list(checkpoint.glob("trainer_state_rank*.json")))
    if saved_ranks != world_size:
        raise ValueError(
            f"Checkpoint {checkpoint} was written by {saved_ranks} process(es); resume it with as many "
            f"(this run has {world_size}), since each process's data position is saved separately"
        )
    return json.loads((checkpoint / f"trainer_state_rank{rank}.json").read_text())


# Data-source fields added after checkpoints recorded signatures, with their defaults: left out of a signature
# while at the default, so that a checkpoint written before the field existed still resumes.
LATER_SOURCE_FIELDS = {"completion_field": COMPLETION_COLUMN}


def resume_signature(config: TrainConfig) -> dict[str, Any]:
    """The settings that fix what the data position means; they must not change across a resume."""
    data = asdict(config.data)
    for source in [*data["sources"], *(data["validation_sources"] or [])]:
        for name, default in LATER_SOURCE_FIELDS.items():
            if source.get(name) == default:
                del source[name]
    return {
        "data": data,
        "micro_batch_size": config.training.micro_batch_size,
        "gradient_accumulation_steps": config.training.gradient_accumulation_steps,
        "seed": config.seed,
    }


def schedule_settings(loop: LoopConfig) -> dict[str, Any]:
    """The settings of the learning-rate schedule, saved with each checkpoint so a resume can say what changed."""
    return {"max_steps": loop.max_steps, "warmup_steps": loop.warmup_steps, "min_lr_ratio": loop.min_lr_ratio}


def drop_tied_aliases(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """Save each tied tensor once (the tied LM head is the embedding): safetensors cannot hold aliases, and
    Accelerate would drop them itself with a warning at every checkpoint. Loading re-ties them."""
    for state in weights:
        seen = set()
        for name in list(state):
            tensor = state[name]
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                del state[name]
            seen.add(key)


def parameter_fingerprint(parameters: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and bytes: of this process's parameters, equal on every process of a
    data-parallel run (or of its shards in a sharded run)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(parameters.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
