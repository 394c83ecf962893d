"""Pretraining Atlas-MAG with Accelerate: `train` runs a configuration (see `config`) unchanged on a CPU, one GPU
or many (`accelerate launch`: DDP, or FSDP2 with `training.sharding: fsdp2`, see `sharding`), with bf16 mixed
precision, gradient accumulation, clipping, gradient checkpointing with TTL on, resumable checkpoints that lose
nothing, and metrics. Its steps are the functions below, in the order a run calls them.

Output folder of a run:
    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON record per logged step and per validation
    tensorboard/                Accelerate trackers
    checkpoints/step_XXXXXXXX/  `accelerator.save_state` (under sharding also the full model and optimizer state)
                                + `trainer_state_rank{r}.json` (step, data position)
    final/                      the trained model as a Hub folder (safetensors, custom code, model card)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..compat import enable_activation_checkpointing
from ..hub import render_model_card, save_model_folder
from ..modeling_atlas import AtlasMAGForCausalLM
from ..tokenization import load_tokenizer
from .build import build_datasets, build_model, learning_rate_schedule, make_accelerator, make_optimizer
from .checkpoints import (
    checkpoints_dir,
    list_checkpoints,
    parameter_fingerprint,
    read_trainer_state,
    resolve_checkpoint,
    resume_signature,
    save_checkpoint,
    schedule_settings,
)
from .config import TrainConfig, config_to_dict
from .data import PackedWindows, ScoredTokens, TokenBatch, batches
from .metrics import MetricsLog, flatten_config
from .sharding import check_launch, full_model_state_dict, full_tensor, load_sharded_state, local_tensor, shard_model
from .validation import causal_lm_loss, evaluate


def train(config: TrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or, with `resume`, continue) pretraining. Returns the exported model folder, or the checkpoint
    when the run stops early at `training.stop_at_step`. Every check of data and configuration happens before
    the first step."""
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    checkpoint, trainer_state = find_resume_point(config, resume, accelerator)
    run = set_up_run(config, accelerator, trainer_state)
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint, trainer_state)
    log = start_logging(run, resumed=checkpoint is not None)
    if checkpoint is None:
        log.record(0, run.validate())
    last_checkpoint = run_steps(run, log, checkpoint)
    if run.stop_step < config.training.max_steps:
        accelerator.end_training()
        accelerator.print(f"stopped at step {run.stop_step}; resume from {last_checkpoint}")
        return last_checkpoint
    final_dir = export_final_model(config, accelerator, run.model, run.tokenizer, run.tokens_seen)
    accelerator.end_training()
    accelerator.print(f"saved the trained model to {final_dir}")
    return final_dir


@dataclass
class TrainingRun:
    """What the steps of a run share: its configuration, the data, the model, optimizer and scheduler as
    Accelerate prepared them (a sharded model and its optimizer as `shard_model` left them), and the counters a
    checkpoint saves (`start_step` is the step it resumed at)."""

    config: TrainConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    train_windows: PackedWindows
    train_batches: Iterator[TokenBatch]
    validation_windows: list[ScoredTokens]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: AcceleratedScheduler
    start_step: int
    tokens_seen: int

    @property
    def stop_step(self) -> int:
        return self.config.training.stop_at_step or self.config.training.max_steps

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step, over all processes."""
        loop = self.config.training
        processes = self.accelerator.num_processes
        return loop.micro_batch_size * self.config.data.seq_len * loop.gradient_accumulation_steps * processes

    def validate(self) -> dict[str, float]:
        batch_size = self.config.logging.eval_batch_size or self.config.training.micro_batch_size
        # A sharded model holds its initial memory whole only inside a block's forward.
        measure_memory = not self.config.training.sharded
        return evaluate(self.model, self.validation_windows, batch_size, self.accelerator, measure_memory)


@dataclass
class RunLog:
    """Where a run's measurements go: metrics.jsonl (written by the main process) and the trackers."""

    metrics_log: MetricsLog
    accelerator: Accelerator

    def record(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics_log.write({"step": step, **metrics})
        self.accelerator.log(metrics, step=step)


class TrainingInterval:
    """The training loss and TTL gradient norm summed on the device over the steps since the last training
    record; they are reduced over the processes and read only when a record is made."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.ttl_gradient_norm = torch.zeros((), device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, ttl_gradient_norms: torch.Tensor | None, micro_batches: int) -> None:
        """One micro-batch, weighted so that the micro-batches of a step add up to one step."""
        self.loss += loss.detach() / micro_batches
        if ttl_gradient_norms is not None:
            self.ttl_gradient_norm += ttl_gradient_norms.mean() / micro_batches

    def metrics(self, run: TrainingRun, learning_rate: float, grad_norm: torch.Tensor) -> dict[str, float]:
        """The training record of the interval: means per step, over all processes."""
        accelerator = run.accelerator
        mean_loss = accelerator.reduce(self.loss, reduction="mean").item() / self.steps
        elapsed = time.perf_counter() - self.start
        return {
            "loss": mean_loss,
            "perplexity": math.exp(min(mean_loss, 50.0)),
            "lr": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_second": self.steps * run.tokens_per_step / elapsed,
            "tokens_seen": run.tokens_seen,
            "epoch": run.train_windows.epoch,
            # Mean norm of the memory gradients of the test-time updates made during the training forwards.
            "ttl_gradient_norm": accelerator.reduce(self.ttl_gradient_norm, reduction="mean").item() / self.steps,
        }

    def reset(self) -> None:
        self.loss.zero_()
        self.ttl_gradient_norm.zero_()
        self.steps, self.start = 0, time.perf_counter()


def find_resume_point(
    config: TrainConfig, resume: str | Path | None, accelerator: Accelerator
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint that `resume` names and this process's trainer state in it, or (None, None) for a new
    run. Refuses a new run in a folder that holds checkpoints, and a checkpoint written with other data or batch
    settings."""
    output_dir = Path(config.output_dir)
    checkpoint = resolve_checkpoint(resume, output_dir) if resume is not None else None
    trainer_state = (
        read_trainer_state(checkpoint, accelerator.process_index, accelerator.num_processes) if checkpoint else None
    )
    if checkpoint is None and list_checkpoints(checkpoints_dir(output_dir)):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or use another output_dir"
        )
    if trainer_state is not None and trainer_state["signature"] != resume_signature(config):
        raise ValueError(
            f"Checkpoint {checkpoint} was written with other data/batch settings: {trainer_state['signature']}"
        )
    return checkpoint, trainer_state


def set_up_run(config: TrainConfig, accelerator: Accelerator, trainer_state: dict[str, Any] | None) -> TrainingRun:
    """Load the tokenizer and the data (at the saved position when resuming), then build the model, optimizer and
    scheduler and hand them to Accelerate, or shard the model (`training.sharding`) and hand it the scheduler."""
    loop = config.training
    check_launch(accelerator, loop.sharding)
    tokenizer = load_tokenizer(config.tokenizer)
    train_windows, validation_windows = build_datasets(
        config, tokenizer, accelerator.process_index, accelerator.num_processes
    )
    start_step, tokens_seen = 0, 0
    if trainer_state is not None:
        start_step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        train_windows.load_state_dict(trainer_state["data"])
    train_batches = batches(iter(train_windows), loop.micro_batch_size)
    # Pull the first batch now, so that data too small for one window fails before any training.
    train_batches = chain([next(train_batches)], train_batches)

    model = build_model(config, tokenizer)
    model.train()
    if loop.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # The optimizer is made after sharding or `prepare`, so that it holds the parameters the model trains.
    if loop.sharded:
        # Not handed to Accelerate, which would wrap the model in DDP and save only the main process's shards.
        model = shard_model(model, accelerator)
        optimizer = make_optimizer(model, loop)
        scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_schedule(loop)))
    else:
        model = accelerator.prepare(model)
        optimizer = make_optimizer(model, loop)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_schedule(loop))
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        tokenizer=tokenizer,
        train_windows=train_windows,
        train_batches=train_batches,
        validation_windows=validation_windows,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        start_step=start_step,
        tokens_seen=tokens_seen,
    )


def restore_checkpoint(run: TrainingRun, checkpoint: Path, trainer_state: dict[str, Any]) -> None:
    """Load the model, optimizer, scheduler and random states saved at `checkpoint`. The learning rate follows
    the current schedule settings from the saved step on, with a warning naming those that changed."""
    accelerator, loop, start_step = run.accelerator, run.config.training, run.start_step
    accelerator.load_state(str(checkpoint))
    if loop.sharded:
        load_sharded_state(run.model, run.optimizer, checkpoint)
    # The schedule is a function of the step: a new max_steps or warm-up reshapes it from here on.
    run.scheduler.scheduler.last_epoch = start_step
    saved_schedule = trainer_state.get("schedule", {})
    changed = {
        key: (saved_schedule[key], value)
        for key, value in schedule_settings(loop).items()
        if key in saved_schedule and saved_schedule[key] != value
    }
    if changed:
        multiplier = learning_rate_schedule(loop)(start_step)
        for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * multiplier
    if changed and accelerator.is_main_process:
        warnings.warn(
            "--resume: learning-rate schedule settings changed since the checkpoint ("
            + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            + f"); the schedule follows the new settings from step {start_step}",
            stacklevel=3,  # the caller of `train`
        )
    accelerator.print(
        f"resumed from {checkpoint}: step {start_step} of {loop.max_steps}, {run.tokens_seen:,} tokens seen, "
        f"learning rate {run.optimizer.param_groups[0]['lr']:.3g}"
    )


def start_logging(run: TrainingRun, resumed: bool) -> RunLog:
    """Write config.yaml, open metrics.jsonl (cut back to the resumed step) and start the trackers."""
    config, accelerator = run.config, run.accelerator
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    resume_step = run.start_step if resumed else None
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process, resume_step)
    if config.logging.trackers:
        accelerator.init_trackers("atlas_mag", config=flatten_config(config_to_dict(config)))
    return RunLog(metrics_log, accelerator)


def run_steps(run: TrainingRun, log: RunLog, last_checkpoint: Path | None) -> Path | None:
    """The optimizer steps from `start_step + 1` to `stop_step`, with the training records, validations and
    checkpoints that fall on them. Returns the last checkpoint (`last_checkpoint` if none was written)."""
    config, accelerator = run.config, run.accelerator
    logging = config.logging
    progress = tqdm(
        total=config.training.max_steps,
        initial=run.start_step,
        desc="training",
        disable=not (accelerator.is_main_process and logging.progress_bar),
    )
    interval = TrainingInterval(accelerator.device)
    for step in range(run.start_step + 1, run.stop_step + 1):
        learning_rate = run.optimizer.param_groups[0]["lr"]
        grad_norm = optimizer_step(run, interval)
        progress.update(1)
        if step % logging.log_every == 0 or step == run.stop_step:
            metrics = interval.metrics(run, learning_rate, grad_norm)
            log.record(step, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{learning_rate:.2e}")
            interval.reset()
        if (logging.eval_every and step % logging.eval_every == 0) or step == config.training.max_steps:
            metrics = run.validate()
            log.record(step, metrics)
            if accelerator.is_main_process:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step % logging.save_every == 0 or step == run.stop_step:
            last_checkpoint = save_run_checkpoint(run, step)
    progress.close()
    return last_checkpoint


def summed_loss_scale(micro_batches: list[TokenBatch], accelerator: Accelerator) -> torch.Tensor:
    """The factor of each micro-batch's summed loss that makes the step's gradient the mean over all of its
    scored targets, however unevenly they fall into micro-batches and processes (completion-only rows): one over
    their count on every process, times what Accelerate (micro-batches) and the data-parallel reduction
    (processes) divide by. With every target scored, each micro-batch's loss is its mean, as before."""
    targets = torch.stack([batch.scored[:, 1:].sum() for batch in micro_batches]).sum()
    step_targets = accelerator.reduce(targets, reduction="sum").clamp(min=1)
    return accelerator.gradient_accumulation_steps * accelerator.num_processes / step_targets.float()


def optimizer_step(run: TrainingRun, interval: TrainingInterval) -> torch.Tensor:
    """One optimizer step over `gradient_accumulation_steps` micro-batches. Returns the gradient norm before
    clipping, measured at the last micro-batch, where Accelerate synchronises the gradients and the optimizer
    steps (an Accelerate optimizer would skip the other micro-batches itself; a sharded run's is a plain one)."""
    accelerator, model, optimizer, loop = run.accelerator, run.model, run.optimizer, run.config.training
    micro_batches = [next(run.train_batches).to(accelerator.device) for _ in range(loop.gradient_accumulation_steps)]
    scale = summed_loss_scale(micro_batches, accelerator)
    for batch in micro_batches:
        with accelerator.accumulate(model):
            outputs = model(input_ids=batch.ids[:, :-1])
            loss = scale * causal_lm_loss(outputs.logits, batch.ids[:, 1:], batch.scored[:, 1:], reduction="sum")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad()
        interval.add(loss, outputs.ttl_gradient_norms, loop.gradient_accumulation_steps)
    run.scheduler.step()
    run.tokens_seen += run.tokens_per_step
    interval.steps += 1
    return full_tensor(grad_norm) if loop.sharded else grad_norm


def save_run_checkpoint(run: TrainingRun, step: int) -> Path:
    """A checkpoint of the run after `step`: Accelerate's state (and a sharded run's full model and optimizer
    state) plus this process's trainer state."""
    sharded = run.config.training.sharded
    parameters = run.accelerator.unwrap_model(run.model).state_dict()
    if sharded:
        parameters = {name: local_tensor(tensor) for name, tensor in parameters.items()}
    trainer_state = {
        "step": step,
        "tokens_seen": run.tokens_seen,
        "data": run.train_windows.state_dict(),
        "signature": resume_signature(run.config),
        "schedule": schedule_settings(run.config.training),
        "param_sha256": parameter_fingerprint(parameters),
    }
    root = checkpoints_dir(Path(run.config.output_dir))
    sharded_state = (run.model, run.optimizer) if sharded else None
    return save_checkpoint(run.accelerator, root, step, trainer_state, run.config.logging.keep_last, sharded_state)


def export_final_model(
    config: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tokens_seen: int,
) -> Path:
    """Save the trained weights as a Hub folder (`output_dir/final`). The full state dict is gathered from
    every process (sharded included) into a plain fp32 model."""
    sharded = config.training.sharded
    state_dict = full_model_state_dict(model) if sharded else accelerator.get_state_dict(model)
    final_dir = Path(config.output_dir) / "final"
    if accelerator.is_main_process:
        trained = AtlasMAGForCausalLM(accelerator.unwrap_model(model).config)
        trained.load_state_dict(state_dict)
        sources = ", ".join(f"{s.label} (p={s.probability:g})" for s in config.data.sources)
        provenance = (
            f"Pretrained from scratch with `scripts/train.py` for {config.training.max_steps} steps "
            f"({tokens_seen:,} tokens, sequence length {config.data.seq_len}) on {sources}."
        )
        if config.init_from:
            provenance = provenance.replace("from scratch", f"from {config.init_from}")
        card = render_model_card(trained, config.export.title, config.export.summary, provenance)
        save_model_folder(trained, final_dir, tokenizer=tokenizer, card=card, overwrite=True)
    accelerator.wait_for_everyone()
    return final_dir
