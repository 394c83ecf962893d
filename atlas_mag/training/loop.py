"""Pretraining Atlas-MAG with Accelerate: the YAML run configuration, and a training loop that runs
unchanged on a CPU, one GPU or many (`accelerate launch`, DDP or FSDP), with bf16 mixed precision, gradient
accumulation, clipping, gradient checkpointing with TTL on, resumable checkpoints that lose nothing, and
metrics.

Output folder of a run:
    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON record per logged step and per validation
    tensorboard/                Accelerate trackers
    checkpoints/step_XXXXXXXX/  `accelerator.save_state` + `trainer_state_rank{r}.json` (step, data position)
    final/                      the trained model as a Hub folder (safetensors, custom code, model card)
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from itertools import chain
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..compat import enable_activation_checkpointing
from ..hub import render_model_card, save_model_folder
from ..modeling_atlas import AtlasMAGForCausalLM
from ..tokenization import load_tokenizer
from .build import build_datasets, build_model, lr_multiplier, make_accelerator, make_optimizer
from .checkpoints import (
    list_checkpoints,
    parameter_fingerprint,
    read_trainer_state,
    resolve_checkpoint,
    resume_signature,
    save_checkpoint,
    schedule_settings,
)
from .config import TrainConfig, config_to_dict
from .data import batches
from .metrics import MetricsLog, flatten_config
from .validation import causal_lm_loss, evaluate


def train(config: TrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or, with `resume`, continue) pretraining. Returns the exported model folder, or the checkpoint
    when the run stops early at `training.stop_at_step`. Every check of data and configuration happens before
    the first step."""
    loop, logging = config.training, config.logging
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    accelerator = make_accelerator(config)
    rank, world_size, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(config.seed)

    checkpoint = resolve_checkpoint(resume, output_dir) if resume is not None else None
    trainer_state = read_trainer_state(checkpoint, rank, world_size) if checkpoint else None
    if checkpoint is None and list_checkpoints(checkpoint_root):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or use another output_dir"
        )
    if trainer_state is not None and trainer_state["signature"] != resume_signature(config):
        raise ValueError(
            f"Checkpoint {checkpoint} was written with other data/batch settings: {trainer_state['signature']}"
        )

    tokenizer = load_tokenizer(config.tokenizer)
    train_windows, validation_windows = build_datasets(config, tokenizer, rank, world_size)
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
    model = accelerator.prepare(model)
    # After `prepare`, so that FSDP hands the optimizer its sharded parameters.
    optimizer = make_optimizer(model, loop)
    schedule = partial(
        lr_multiplier, warmup_steps=loop.warmup_steps, max_steps=loop.max_steps, min_ratio=loop.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        # The schedule is a function of the step: a new max_steps or warm-up reshapes it from here on.
        scheduler.scheduler.last_epoch = start_step
        saved_schedule = trainer_state.get("schedule", {})
        changed = {
            key: (saved_schedule[key], value)
            for key, value in schedule_settings(loop).items()
            if key in saved_schedule and saved_schedule[key] != value
        }
        if changed:
            for group, base_lr in zip(optimizer.param_groups, scheduler.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * schedule(start_step)
        if changed and is_main:
            warnings.warn(
                "--resume: learning-rate schedule settings changed since the checkpoint ("
                + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
                + f"); the schedule follows the new settings from step {start_step}",
                stacklevel=2,
            )
        accelerator.print(
            f"resumed from {checkpoint}: step {start_step} of {loop.max_steps}, {tokens_seen:,} tokens seen, "
            f"learning rate {optimizer.param_groups[0]['lr']:.3g}"
        )

    stop_step = loop.stop_at_step or loop.max_steps
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", is_main, start_step if checkpoint else None)
    if logging.trackers:
        accelerator.init_trackers("atlas_mag", config=flatten_config(config_to_dict(config)))
    eval_batch_size = logging.eval_batch_size or loop.micro_batch_size
    tokens_per_step = loop.micro_batch_size * config.data.seq_len * loop.gradient_accumulation_steps * world_size

    def record(step: int, metrics: dict[str, float]) -> None:
        metrics_log.write({"step": step, **metrics})
        accelerator.log(metrics, step=step)

    def checkpoint_at(step: int) -> Path:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "data": train_windows.state_dict(),
            "signature": resume_signature(config),
            "schedule": schedule_settings(loop),
            "param_sha256": parameter_fingerprint(accelerator.unwrap_model(model)),
        }
        return save_checkpoint(accelerator, checkpoint_root, step, state, logging.keep_last)

    if checkpoint is None:
        record(0, evaluate(model, validation_windows, eval_batch_size, accelerator))
    progress = tqdm(
        total=loop.max_steps,
        initial=start_step,
        desc="training",
        disable=not (is_main and logging.progress_bar),
    )
    interval_loss = torch.zeros((), device=accelerator.device)
    interval_ttl_norm = torch.zeros((), device=accelerator.device)
    interval_steps, interval_start = 0, time.perf_counter()
    last_checkpoint = checkpoint
    for step in range(start_step + 1, stop_step + 1):
        learning_rate = optimizer.param_groups[0]["lr"]
        for _ in range(loop.gradient_accumulation_steps):
            batch = next(train_batches).to(accelerator.device)
            with accelerator.accumulate(model):
                outputs = model(input_ids=batch[:, :-1])
                loss = causal_lm_loss(outputs.logits, batch[:, 1:])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad()
            interval_loss += loss.detach() / loop.gradient_accumulation_steps
            if outputs.ttl_gradient_norms is not None:
                interval_ttl_norm += outputs.ttl_gradient_norms.mean() / loop.gradient_accumulation_steps
        scheduler.step()
        tokens_seen += tokens_per_step
        interval_steps += 1
        progress.update(1)

        if step % logging.log_every == 0 or step == stop_step:
            mean_loss = accelerator.reduce(interval_loss, reduction="mean").item() / interval_steps
            elapsed = time.perf_counter() - interval_start
            metrics = {
                "loss": mean_loss,
                "perplexity": math.exp(min(mean_loss, 50.0)),
                "lr": learning_rate,
                "grad_norm": float(grad_norm),
                "tokens_per_second": interval_steps * tokens_per_step / elapsed,
                "tokens_seen": tokens_seen,
                "epoch": train_windows.epoch,
                # Mean norm of the memory gradients of the test-time updates made during the training forwards.
                "ttl_gradient_norm": accelerator.reduce(interval_ttl_norm, reduction="mean").item() / interval_steps,
            }
            record(step, metrics)
            progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{learning_rate:.2e}")
            interval_loss.zero_()
            interval_ttl_norm.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        if (logging.eval_every and step % logging.eval_every == 0) or step == loop.max_steps:
            metrics = evaluate(model, validation_windows, eval_batch_size, accelerator)
            record(step, metrics)
            if is_main:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step % logging.save_every == 0 or step == stop_step:
            last_checkpoint = checkpoint_at(step)
    progress.close()

    if stop_step < loop.max_steps:
        accelerator.end_training()
        accelerator.print(f"stopped at step {stop_step}; resume from {last_checkpoint}")
        return last_checkpoint
    final_dir = export_final_model(config, accelerator, model, tokenizer, tokens_seen)
    accelerator.end_training()
    accelerator.print(f"saved the trained model to {final_dir}")
    return final_dir


def export_final_model(
    config: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tokens_seen: int,
) -> Path:
    """Save the trained weights as a Hub folder (`output_dir/final`). The full state dict is gathered from
    every process (FSDP included) into a plain fp32 model."""
    state_dict = accelerator.get_state_dict(model)
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
