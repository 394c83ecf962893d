"""Fine-tuning a saved Atlas-MAG model (converted or pretrained) with the Transformers `Trainer`: a `datasets`
text dataset tokenised as `<bos> text <eos>` (or prompt-completion rows, whose labels are the completion's),
packed into blocks of input ids and labels, gradient checkpointing on (with test-time learning on, as in
pretraining)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, default_data_collator

from ..cli import coerce_scalar, local_or_hub
from ..compat import checkpointing_training_arguments
from ..hub import render_model_card, save_model_folder
from ..tokenization import load_tokenizer
from .build import load_atlas_model
from .data import (
    COMPLETION_COLUMN,
    TEXT_COLUMN,
    DataSource,
    encode_document,
    load_source,
    pack_documents,
    split_holdout,
)
from .validation import IGNORE_INDEX

DEFAULT_TRAINING_ARGUMENTS = {
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "tensorboard",
}


def pack_for_causal_lm(
    dataset: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> Dataset | IterableDataset:
    """Tokenise every document as `<bos> text <eos>` (`encode_document`) and cut the concatenation into blocks of
    `block_size` tokens ("text" and "completion" columns in, "input_ids" and "labels" out, the labels
    `IGNORE_INDEX` where a token is not scored; the tail of each map batch and blocks with nothing scored are
    dropped)."""

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        completions = batch.get(COMPLETION_COLUMN) or [""] * len(batch[TEXT_COLUMN])
        rows = zip(batch[TEXT_COLUMN], completions, strict=True)
        documents = [encode_document(tokenizer, text, completion or "") for text, completion in rows if text]
        # A block of prompt tokens only has nothing to score (the Trainer's evaluation loss would be NaN).
        blocks = [block for block in pack_documents(documents, block_size) if any(block.scored)]
        labels = [[i if s else IGNORE_INDEX for i, s in zip(*block, strict=True)] for block in blocks]
        return {"input_ids": [block.ids for block in blocks], "labels": labels}

    return dataset.map(pack, batched=True, batch_size=256, remove_columns=dataset.column_names or [TEXT_COLUMN])


def training_arguments_from(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` checked against `TrainingArguments`' fields (unknown keys name the key) and coerced to their
    types (`--set learning_rate=1e-4` arrives as a string)."""
    names = {item.name for item in fields(TrainingArguments) if item.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown TrainingArguments field(s) {unknown}")
    hints = get_type_hints(TrainingArguments)
    return {key: coerce_scalar(hints[key], value, key) for key, value in overrides.items()}


def finetune(
    model_path: str | Path,
    train_source: DataSource,
    output_dir: str | Path,
    block_size: int = 1024,
    eval_source: DataSource | None = None,
    eval_documents: int = 50,
    tokenizer_path: str | Path | None = None,
    training_arguments: dict[str, Any] | None = None,
) -> tuple[Trainer, dict[str, float]]:
    """Fine-tune the model saved at `model_path` and export it to `output_dir/final`. Without `eval_source`, the
    first `eval_documents` documents of the training data are held out for evaluation. `training_arguments`
    override `DEFAULT_TRAINING_ARGUMENTS` (any `TrainingArguments` field). Returns the trainer and the final
    evaluation metrics."""
    model_path = local_or_hub(model_path, "model")
    arguments = {
        **DEFAULT_TRAINING_ARGUMENTS,
        **training_arguments_from(training_arguments or {}),
        "output_dir": str(output_dir),
        **checkpointing_training_arguments(),
    }
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_atlas_model(model_path)
    train_data = load_source(train_source)
    if eval_source is None:
        train_data, eval_data = split_holdout(train_data, eval_documents, train_source.label)
    else:
        eval_data = load_source(eval_source)
    train_blocks = pack_for_causal_lm(train_data, tokenizer, block_size)
    eval_blocks = pack_for_causal_lm(eval_data, tokenizer, block_size)
    for name, blocks in (("training", train_blocks), ("evaluation", eval_blocks)):
        if isinstance(blocks, Dataset) and len(blocks) == 0:
            raise ValueError(
                f"The {name} data gives no block of {block_size} tokens: its documents are empty or shorter "
                "than needed. Lower the block size or add data."
            )

    trainer = Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        # The blocks have one length and their own labels: stacking them is all a collator has to do.
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        provenance = (
            f"Fine-tuned from `{model_path}` with the Transformers Trainer (`scripts/finetune.py`) for "
            f"{trainer.state.global_step} steps on {train_source.label}, blocks of {block_size} tokens."
        )
        # The Trainer turns the cache off for checkpointed training; the exported model decodes with it.
        trainer.model.config.use_cache = True
        card = render_model_card(
            trainer.model, "Atlas-MAG (fine-tuned)", "An Atlas-MAG model fine-tuned with the Trainer.", provenance
        )
        save_model_folder(trainer.model, Path(output_dir) / "final", tokenizer=tokenizer, card=card, overwrite=True)
    return trainer, metrics
