"""Text data for training and evaluation: sources (streamed Hub datasets or local files), their mixture,
`<bos> text <eos>` tokenisation and packing into fixed windows, with a position that can be saved and
restored.

SmolLM-Corpus (`HuggingFaceTB/smollm-corpus`) is streamed config by config and mixed with
`interleave_datasets`. Its `python-edu` config holds Software Heritage blob ids, not text: a source without
its text column is refused with a message, and the 43M recipe substitutes a Python source that does hold text
(see configs/atlas_mag_43m.yaml).
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from datasets import Dataset, DatasetDict, IterableDataset, interleave_datasets, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from ..reporting import write_text

logger = logging.getLogger(__name__)

# Local file builders of `datasets`, by file suffix.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_COLUMN = "text"
# A row's completion (the prompt-completion rows of TRL): with one, the loss counts only the completion's tokens.
COMPLETION_COLUMN = "completion"


class Document(NamedTuple):
    """A training document: its text and an optional completion that follows it. With a completion, the loss
    counts only the completion's tokens and the end of the document (the text is the prompt, read but not
    scored)."""

    text: str
    completion: str = ""


class ScoredTokens(NamedTuple):
    """Token ids and, for each, whether it counts in the loss as a next-token target."""

    ids: list[int]
    scored: list[bool]


class TokenBatch(NamedTuple):
    """Windows [batch, window] of token ids and of whether each counts in the loss (`ScoredTokens`, stacked)."""

    ids: torch.Tensor
    scored: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.ids.to(device), self.scored.to(device))


@dataclass
class DataSource:
    """One dataset of documents.

    `path` is a local file (.txt, .jsonl/.json, .parquet), a `save_to_disk` folder, or, with `from_hub: true`,
    a Hub dataset id streamed with config `name`. `probability` is its share of documents in a mixture.
    `.txt` files are split into documents by `sample_by`: "line", "paragraph" (blank lines) or "document".
    Rows with a non-empty `completion_field` (when the source has that column) are prompt-completion documents:
    the loss counts only the completion (`Document`).
    """

    path: str
    name: str | None = None
    split: str = "train"
    from_hub: bool = False
    probability: float = 1.0
    text_field: str = TEXT_COLUMN
    completion_field: str = COMPLETION_COLUMN
    sample_by: str = "paragraph"

    @property
    def label(self) -> str:
        return f"{self.path} ({self.name})" if self.name else self.path


def load_source(source: DataSource) -> Dataset | IterableDataset:
    """The source's documents with columns "text" and "completion" (local data without completions gets empty
    ones, so that every local source mixes with every other; a Hub stream without them keeps its "text" column
    alone): a map-style `Dataset` for local data, a streaming `IterableDataset` for the Hub. Missing files, empty
    datasets and missing text columns are errors."""
    if source.from_hub:
        dataset = load_dataset(source.path, source.name, split=source.split, streaming=True)
    else:
        dataset = _load_local(source)
    columns = dataset.column_names
    # Streams whose features are unknown until read give None; rows without text are then skipped as they come.
    if columns is not None and source.text_field not in columns:
        raise ValueError(
            f"Data source {source.label} has no text column {source.text_field!r} (columns: {columns}). Set "
            "`text_field`. SmolLM-Corpus `python-edu` rows hold Software Heritage blob ids instead of text: "
            "download the files first or substitute a Python source that holds text."
        )
    names = {source.text_field: TEXT_COLUMN}
    if columns is None:
        logger.warning(
            "The columns of data source %s are unknown until read: only its text column %r is read (a completion "
            "column would not be used)", source.label, source.text_field
        )
    elif source.completion_field in columns:
        names[source.completion_field] = COMPLETION_COLUMN
    dataset = dataset.select_columns(list(names))
    dataset = dataset.rename_columns({old: new for old, new in names.items() if old != new})
    if COMPLETION_COLUMN in names.values() or isinstance(dataset, IterableDataset):
        # A stream without completions stays as it was (its saved positions keep fitting it); its rows have none.
        return dataset
    return dataset.add_column(COMPLETION_COLUMN, [""] * len(dataset))


def _load_local(source: DataSource) -> Dataset:
    path = Path(source.path)
    if not path.exists():
        raise FileNotFoundError(
            f"Data source {source.path!r} does not exist (for a Hub dataset id set `from_hub: true`)"
        )
    if path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as error:
            raise ValueError(f"Data folder {path} is not a `save_to_disk` dataset: {error}") from error
        if isinstance(dataset, DatasetDict):
            if source.split not in dataset:
                raise ValueError(f"Data folder {path} has splits {list(dataset)}, not {source.split!r}")
            dataset = dataset[source.split]
    else:
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Data file {path} has an unsupported suffix; use one of {sorted(LOCAL_BUILDERS)}")
        if path.stat().st_size == 0:
            raise ValueError(f"Data file {path} is empty")
        options = {"sample_by": source.sample_by} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=str(path), split="train", **options)
    if len(dataset) == 0:
        raise ValueError(f"Data source {source.label} is empty (0 documents)")
    return dataset


def split_holdout(
    dataset: Dataset | IterableDataset, documents: int, label: str
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """(training, validation): the first `documents` documents are held out for validation."""
    if isinstance(dataset, IterableDataset):
        return dataset.skip(documents), dataset.take(documents)
    if len(dataset) <= documents:
        raise ValueError(
            f"Data source {label} has {len(dataset)} documents; holding out {documents} for validation "
            "leaves none to train on. Lower data.validation_documents or add data."
        )
    return dataset.select(range(documents, len(dataset))), dataset.select(range(documents))


def mix_sources(
    datasets: Sequence[Dataset | IterableDataset],
    probabilities: Sequence[float],
    seed: int,
    stopping_strategy: str = "first_exhausted",
) -> IterableDataset:
    """One stream drawing each next document from source i with probability p_i (`interleave_datasets`)."""
    if len(datasets) != len(probabilities):
        raise ValueError("one probability per source is needed")
    if any(p <= 0 for p in probabilities):
        raise ValueError(f"source probabilities must be positive, got {list(probabilities)}")
    streams = [d.to_iterable_dataset() if isinstance(d, Dataset) else d for d in datasets]
    if len(streams) == 1:
        return streams[0]
    total = sum(probabilities)
    return interleave_datasets(
        streams,
        probabilities=[p / total for p in probabilities],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str, completion: str = "") -> ScoredTokens:
    """`<bos> text completion <eos>` as token ids, the way the published model was trained (text and completion
    encoded apart), every token scored, or with a completion only the completion's and `<eos>`."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    scored = [not completion] * len(ids)
    if completion:
        ids += tokenizer.encode(completion, add_special_tokens=False)
    ids.append(tokenizer.eos_token_id)
    scored += [True] * (len(ids) - len(scored))
    return ScoredTokens(ids, scored)


def pack_documents(documents: Sequence[ScoredTokens], window: int) -> list[ScoredTokens]:
    """Concatenate encoded documents and cut them into windows of `window` tokens, dropping the incomplete tail."""
    ids = [token for document in documents for token in document.ids]
    scored = [flag for document in documents for flag in document.scored]
    starts = range(0, len(ids) - window + 1, window)
    return [ScoredTokens(ids[start : start + window], scored[start : start + window]) for start in starts]


class PackedWindows:
    """Windows of `window` token ids cut from the concatenation of a stream's documents.

    In a run of `world_size` processes, process `rank` takes documents `rank, rank + world_size, ...`, so the
    processes see disjoint data. With `cycle`, the stream restarts (next epoch) when it ends. `state_dict()`
    taken between two windows is the exact position: the stream's own `datasets` state, the epoch, the
    documents read and the tokens left over, so a restored iterator yields exactly the windows that would have
    followed.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        window: int,
        rank: int = 0,
        world_size: int = 1,
        cycle: bool = True,
        label: str = "training data",
    ) -> None:
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.window = window
        self.rank = rank
        self.world_size = world_size
        self.cycle = cycle
        self.label = label
        self.epoch = 0
        self.documents_read = 0
        # The tokens read but not yet yielded, and whether each is scored.
        self.buffer: list[int] = []
        self.scored: list[bool] = []
        self._dataset_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "documents_read": self.documents_read,
            "buffer": list(self.buffer),
            "scored": list(self.scored),
            "dataset": self._dataset_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.documents_read = state["documents_read"]
        self.buffer = list(state["buffer"])
        # Saved before completions existed: every token was scored.
        self.scored = list(state.get("scored", [True] * len(self.buffer)))
        self._dataset_state = state["dataset"]

    def __iter__(self) -> Iterator[ScoredTokens]:
        while True:
            windows_this_pass = 0
            from_start = self._dataset_state is None
            self.dataset.set_epoch(self.epoch)
            if not from_start:
                self.dataset.load_state_dict(self._dataset_state)
            for row in self.dataset:
                index = self.documents_read
                self.documents_read += 1
                text = row.get(TEXT_COLUMN)
                if index % self.world_size != self.rank or not text:
                    continue
                document = encode_document(self.tokenizer, text, row.get(COMPLETION_COLUMN) or "")
                self.buffer.extend(document.ids)
                self.scored.extend(document.scored)
                if len(self.buffer) >= self.window:
                    # The stream's position is only needed where this generator pauses: at a window.
                    self._dataset_state = self.dataset.state_dict()
                while len(self.buffer) >= self.window:
                    window = ScoredTokens(self.buffer[: self.window], self.scored[: self.window])
                    del self.buffer[: self.window], self.scored[: self.window]
                    windows_this_pass += 1
                    yield window
            if not self.cycle:
                return
            if from_start and windows_this_pass == 0:
                raise ValueError(
                    f"The {self.label} is too small: a full pass gives no window of {self.window} tokens "
                    f"(data.seq_len + 1) for process {self.rank} of {self.world_size}. Its documents are "
                    "empty or shorter than needed; lower data.seq_len or add data."
                )
            self.epoch += 1
            self.documents_read = 0
            self._dataset_state = None


def stack_windows(windows: Sequence[ScoredTokens]) -> TokenBatch:
    """Windows of equal length as one batch."""
    ids = torch.tensor([window.ids for window in windows], dtype=torch.long)
    return TokenBatch(ids, torch.tensor([window.scored for window in windows], dtype=torch.bool))


def batches(windows: Iterator[ScoredTokens], batch_size: int) -> Iterator[TokenBatch]:
    """Batches of `batch_size` windows from an iterator of windows (an incomplete last batch is dropped)."""
    while True:
        rows = list(islice(windows, batch_size))
        if len(rows) < batch_size:
            return
        yield stack_windows(rows)


def stdlib_documents(max_files: int | None = None, max_chars: int | None = None) -> list[str]:
    """The Python standard library's own sources, one document per module file (sorted, so always the same):
    text that every Python installation has, for offline smoke training and tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:max_files]
    documents = [path.read_text(encoding="utf-8", errors="replace")[:max_chars] for path in files]
    return [document for document in documents if document.strip()]


def python_docs_documents() -> list[str]:
    """The Python documentation's reference topics as the standard library ships them for `help()`
    (`pydoc_data.topics`), one document per topic, in topic order: English prose, offline."""
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items()) if text.strip()]


def write_jsonl(documents: Sequence[str | Document], path: str | Path) -> Path:
    """Write documents as JSON lines `{"text": ...}`, with `"completion"` for a `Document` that has one
    (atomically, so no half-written file)."""
    rows = []
    for document in documents:
        text, completion = (document, "") if isinstance(document, str) else document
        rows.append({TEXT_COLUMN: text, **({COMPLETION_COLUMN: completion} if completion else {})})
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
