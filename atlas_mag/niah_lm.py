"""A language model trained here that uses its memory (`make niah-lm`): with nothing downloaded, on a CPU.

1. Data: the Python standard library's sources and reference docs (`pydoc_data.topics`), split by file into
   training and held-out text and cut into passages; a ByteLevel BPE with one token per digit trained on the
   training text; needle documents (`NeedleDocuments`: facts stated at random depths of training text, asked at
   the end) made from each side's text.
2. Training: `atlas_mag.training.train` on the run configuration (configs/niah_lm.yaml), which mixes passages
   and needle documents. A killed run resumes from its latest checkpoint.
3. Evaluation of the exported folder, loaded as a user would (`trust_remote_code`):
   - the needle benchmark (`run_niah`) over context lengths up to 16 windows and needle depths, TTL on, off and
     with the gate removed, with the benchmark's own names and filler sentences, never seen in training;
   - the loss by position on long held-out documents, TTL on and off (`evaluate_perplexity`).
4. JSON, Markdown tables and PNGs under the output folder, and a short report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .reporting import new_figure, save_figure, write_json, write_text
from .tasks.demo import load_model_folder
from .tasks.niah import DEFAULT_DEPTHS, NeedleDocuments, niah_table, run_niah, write_niah_report
from .tasks.perplexity import evaluate_perplexity, format_table, long_documents
from .tasks.recall import receptive_field
from .tokenization import load_tokenizer, train_bpe_tokenizer
from .training import TrainConfig, load_config, train
from .training.checkpoints import checkpoints_dir, list_checkpoints
from .training.data import python_docs_documents, stdlib_documents, write_jsonl

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "niah_lm.yaml"


@dataclass
class NeedleLMSettings:
    """What `run_niah_lm` prepares and measures around the run configuration (`config`, a YAML file)."""

    # Everything goes under here: data/, tokenizer/, train/ (the run: checkpoints, metrics, final/), niah/.
    output_dir: Path = Path("outputs/niah_lm")
    config: Path = DEFAULT_CONFIG
    # `--set key=value` overrides of the run configuration, e.g. "training.max_steps=50".
    overrides: tuple[str, ...] = ()
    vocab_size: int = 2048
    # Read only the first this many standard-library source files (None: all of them), for quick runs.
    stdlib_files: int | None = None
    # Every `held_out_every`-th file (sources and doc topics, in sorted order) is held out from training.
    held_out_every: int = 10
    # Training text is cut into passages of about this many characters at line ends, so that a passage and a
    # needle document are of similar length (the mixture's probabilities are per document).
    passage_chars: int = 1000
    # One fact per document, as the benchmark asks: with two, the recall models retrieve about one of them.
    needles: NeedleDocuments = NeedleDocuments(needles=1, num_digits=4, min_filler_tokens=32, max_filler_tokens=224)
    needle_documents: int = 6000
    held_out_needle_documents: int = 64
    # The benchmark: context lengths as multiples of the sliding window, needle depths, prompts per cell.
    window_multiples: tuple[int, ...] = (8, 16, 32)
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    samples_per_cell: int = 8
    # Held-out documents for the loss by position, and their length in windows.
    perplexity_documents: int = 16
    perplexity_windows: int = 32


@dataclass(frozen=True)
class NeedleLMData:
    """The files of step 1, at the paths the run configuration names."""

    text: Path
    needles: Path
    held_out_text: Path
    held_out_needles: Path
    tokenizer: Path


@dataclass(frozen=True)
class NeedleLMCorpus:
    """What step 1 split: how many files train, and the held-out files' texts (the loss by position reads them)."""

    training_files: int
    held_out_texts: list[str]


def passages(texts: Sequence[str], max_chars: int) -> list[str]:
    """Each text cut at line ends into passages of at most about `max_chars` characters (a longer line is a
    passage of its own)."""
    cut: list[str] = []
    for text in texts:
        passage = ""
        for line in text.splitlines(keepends=True):
            if passage and len(passage) + len(line) > max_chars:
                cut.append(passage)
                passage = ""
            passage += line
        if passage.strip():
            cut.append(passage)
    return cut


def data_paths(output_dir: Path) -> NeedleLMData:
    data = output_dir / "data"
    return NeedleLMData(
        text=data / "text.jsonl",
        needles=data / "needles.jsonl",
        held_out_text=data / "held_out_text.jsonl",
        held_out_needles=data / "held_out_needles.jsonl",
        tokenizer=output_dir / "tokenizer",
    )


def run_config(settings: NeedleLMSettings, paths: NeedleLMData) -> TrainConfig:
    """The run configuration with its paths under `settings.output_dir`: the run in train/, the training sources
    text then needles, the validation sources likewise (the configuration's own probabilities are kept)."""
    config = load_config(settings.config, list(settings.overrides))
    sources, validation = config.data.sources, config.data.validation_sources or []
    if len(sources) != 2 or len(validation) != 2:
        raise ValueError(
            f"{settings.config}: the needle LM needs two data.sources (text, needles) and two "
            f"data.validation_sources (held-out text, held-out needles); it has {len(sources)} and {len(validation)}"
        )
    data = replace(
        config.data,
        sources=[replace(sources[0], path=str(paths.text)), replace(sources[1], path=str(paths.needles))],
        validation_sources=[
            replace(validation[0], path=str(paths.held_out_text)),
            replace(validation[1], path=str(paths.held_out_needles)),
        ],
    )
    return replace(config, output_dir=str(settings.output_dir / "train"), tokenizer=str(paths.tokenizer), data=data)


# Bumped when the files `prepare_data` writes change form (2: needle documents with their answer as completion).
DATA_FORMAT = 2


def data_recipe(settings: NeedleLMSettings, seed: int) -> dict[str, Any]:
    """Everything the files of step 1 depend on."""
    names = (
        "stdlib_files", "held_out_every", "passage_chars", "vocab_size", "needle_documents", "held_out_needle_documents"
    )
    settings_used = {name: getattr(settings, name) for name in names}
    return {"format": DATA_FORMAT, "seed": seed, **settings_used, "needles": asdict(settings.needles)}


def check_data_recipe(settings: NeedleLMSettings, paths: NeedleLMData, seed: int) -> None:
    """Refuse files that an earlier run wrote with other settings (reusing them would train on other data), or
    record the recipe before writing any."""
    recipe = data_recipe(settings, seed)
    manifest = paths.text.parent / "recipe.json"
    written = [path for path in (paths.text.parent, paths.tokenizer) if path.exists() and any(path.iterdir())]
    if manifest.exists():
        old = json.loads(manifest.read_text())
        changed = {key: (old.get(key), value) for key, value in recipe.items() if old.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: {was!r} there, {now!r} here" for key, (was, now) in changed.items())
            raise ValueError(
                f"{paths.text.parent} was written with other settings ({details}); give another --output-dir or "
                "remove its data/, tokenizer/ and train/ folders"
            )
    elif written:
        raise ValueError(
            f"{written[0]} was written by an earlier version of this job (no {manifest.name}); give another "
            "--output-dir or remove its data/, tokenizer/ and train/ folders"
        )
    else:
        write_json(manifest, recipe)


def prepare_data(settings: NeedleLMSettings, paths: NeedleLMData, seed: int) -> NeedleLMCorpus:
    """Write the corpora and train the tokenizer (step 1), skipping what an earlier run with the same settings
    already wrote (every file is written atomically, so one that exists is whole); files written with other
    settings are refused (`check_data_recipe`)."""
    check_data_recipe(settings, paths, seed)
    texts = stdlib_documents(settings.stdlib_files) + python_docs_documents()
    held_out = texts[:: settings.held_out_every]
    training = [text for index, text in enumerate(texts) if index % settings.held_out_every]
    if not paths.text.exists():
        write_jsonl(passages(training, settings.passage_chars), paths.text)
    if not paths.held_out_text.exists():
        write_jsonl(passages(held_out, settings.passage_chars), paths.held_out_text)
    if not (paths.tokenizer / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(training, vocab_size=settings.vocab_size, split_digits=True)
        tokenizer.save_pretrained(paths.tokenizer)
    tokenizer = load_tokenizer(paths.tokenizer)
    if not paths.needles.exists():
        write_jsonl(settings.needles.documents(tokenizer, training, settings.needle_documents, seed), paths.needles)
    if not paths.held_out_needles.exists():
        documents = settings.needles.documents(tokenizer, held_out, settings.held_out_needle_documents, seed + 1)
        write_jsonl(documents, paths.held_out_needles)
    return NeedleLMCorpus(training_files=len(training), held_out_texts=held_out)


def train_or_resume(config: TrainConfig) -> Path:
    """Train, or continue from the latest checkpoint of `config.output_dir` when it holds one."""
    resume = "latest" if list_checkpoints(checkpoints_dir(Path(config.output_dir))) else None
    if resume:
        logger.info("resuming the run in %s from its latest checkpoint", config.output_dir)
    return train(config, resume=resume)


def beyond_reach_accuracy(results: dict[str, Any], reach: int) -> dict[str, dict[str, float]]:
    """Accuracy per condition over the prompts whose needle is more than `reach` tokens from the end (beyond the
    receptive field without TTL) and over the others, pooled over cells."""
    pooled: dict[str, dict[str, list[bool]]] = {}
    for cell in results["cells"]:
        for sample in cell["samples"]:
            side = "beyond_reach" if sample["needle_distance"] > reach else "within_reach"
            pooled.setdefault(cell["condition"], {}).setdefault(side, []).append(sample["correct"])
    return {
        condition: {side: sum(values) / len(values) for side, values in sides.items()} | {
            f"{side}_prompts": len(values) for side, values in sides.items()
        }
        for condition, sides in pooled.items()
    }


def plot_loss_by_position(perplexity: dict[str, Any], window: int, reach: int, path: Path) -> Path:
    """Mean loss per position range, TTL on and off, with the window and the receptive field marked."""
    figure = new_figure(5.6, 3.6)
    axes = figure.add_subplot()
    for setting, color in (("ttl_on", "tab:green"), ("ttl_off", "tab:red")):
        buckets = [b for b in perplexity["settings"][setting]["by_position"] if b["perplexity"] is not None]
        middles = [(b["start"] + b["end"]) / 2 for b in buckets]
        axes.plot(middles, [math.log(b["perplexity"]) for b in buckets], marker="o", color=color, label=setting)
    axes.axvline(window, color="gray", linestyle=":", label=f"window ({window})")
    axes.axvline(reach, color="black", linestyle="--", linewidth=1, label=f"receptive field without TTL ({reach})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("position in the document (tokens)")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("Held-out text: loss by position")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def run_niah_lm(settings: NeedleLMSettings) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    paths = data_paths(output_dir)
    config = run_config(settings, paths)
    logger.info("writing the corpora and the tokenizer")
    corpus = prepare_data(settings, paths, config.seed)
    model_dir = train_or_resume(config)
    trained = time.perf_counter()

    model, tokenizer = load_model_folder(model_dir)
    window = model.config.sliding_window
    reach = receptive_field(model.config)
    lengths = [window * multiple for multiple in settings.window_multiples]
    logger.info("needle benchmark at %s tokens (receptive field without TTL: %d)", lengths, reach)
    niah = run_niah(
        model,
        tokenizer,
        lengths=lengths,
        depths=settings.depths,
        samples_per_cell=settings.samples_per_cell,
        seed=config.seed,
        num_digits=settings.needles.num_digits,
    )
    niah |= {"model": str(model_dir), "receptive_field_without_ttl": reach}
    niah["by_reach"] = beyond_reach_accuracy(niah, reach)
    niah_files = write_niah_report(niah, output_dir / "niah")

    logger.info("loss by position on held-out documents")
    documents = long_documents(
        corpus.held_out_texts,
        tokenizer,
        settings.perplexity_documents,
        min_tokens=settings.perplexity_windows * window,
        max_tokens=settings.perplexity_windows * window,
    )
    perplexity = evaluate_perplexity(model, documents, segment_length=4 * window, first_bucket=window, progress=True)
    files = {
        **{f"niah_{name}": path for name, path in niah_files.items()},
        "perplexity": write_json(output_dir / "perplexity.json", perplexity),
        "perplexity_table": write_text(output_dir / "perplexity.md", format_table(perplexity) + "\n"),
        "loss_by_position": plot_loss_by_position(perplexity, window, reach, output_dir / "loss_by_position.png"),
        "model": model_dir,
    }
    result = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "sliding_window": window},
        "receptive_field_without_ttl": reach,
        "training_files": corpus.training_files,
        "held_out_files": len(corpus.held_out_texts),
        "steps": config.training.max_steps,
        "niah_by_reach": niah["by_reach"],
        "perplexity": {s: v["perplexity"] for s, v in perplexity["settings"].items()},
        "training_seconds": trained - started,
        "seconds": time.perf_counter() - started,
        "files": {name: str(path) for name, path in files.items()},
    }
    write_json(output_dir / "niah_lm_results.json", result)
    return result | {"niah_table": niah_table(niah), "perplexity_table": format_table(perplexity)}


def format_report(result: dict[str, Any]) -> str:
    lines = [
        "Atlas-MAG needle-in-a-haystack language model",
        f"  model: {result['model']['parameters']:,} parameters, window {result['model']['sliding_window']}, "
        f"receptive field without TTL {result['receptive_field_without_ttl']} tokens; {result['steps']} steps on "
        f"{result['training_files']} stdlib files ({result['held_out_files']} held out)",
        "  exact match, needle beyond / within the receptive field without TTL:",
    ]
    for condition, accuracy in result["niah_by_reach"].items():
        lines.append(
            f"    {condition:13s} {accuracy.get('beyond_reach', float('nan')):.3f} "
            f"({accuracy.get('beyond_reach_prompts', 0)} prompts) / {accuracy.get('within_reach', float('nan')):.3f} "
            f"({accuracy.get('within_reach_prompts', 0)} prompts)"
        )
    lines += ["", result["niah_table"], "", "Held-out text, perplexity by position:", result["perplexity_table"], ""]
    lines += [f"  {name}: {path}" for name, path in result["files"].items()]
    lines.append(f"  training {result['training_seconds']:.0f} s, total {result['seconds']:.0f} s")
    return "\n".join(lines)


__all__ = ["NeedleLMSettings", "format_report", "passages", "run_niah_lm"]
