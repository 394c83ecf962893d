"""Writing Hub-ready model folders: weights (safetensors), the model's own code (`trust_remote_code`), the
tokenizer and a model card rendered from `hub_card/README.md`; and publishing them."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from string import Template

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.hub import CHAT_TEMPLATE_FILE

from .reporting import move_folder_into_place, umask_mode

# The template lives in the repository's hub_card/ (a source checkout or editable install); a regular install
# places it under <prefix>/share/atlas_mag/hub_card (setup.cfg data_files).
CARD_TEMPLATE_LOCATIONS = (
    Path(__file__).resolve().parent.parent / "hub_card" / "README.md",
    Path(sys.prefix) / "share" / "atlas_mag" / "hub_card" / "README.md",
)
DEFAULT_DATASETS = ("HuggingFaceTB/smollm-corpus",)

# The chat template a saved folder gets when its tokenizer has none (chat endpoints such as `transformers serve`'s
# /v1/chat/completions need one): each turn as `role: content` on its own line, then `assistant:` to answer. The
# models here are trained on plain text, not on chats, so this only makes the prompt a plain-text transcript.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def render_model_card(
    model: PreTrainedModel,
    title: str,
    summary: str,
    provenance: str,
    repo_id: str = "path/to/this/folder",
    datasets: Sequence[str] = DEFAULT_DATASETS,
) -> str:
    """Fill `hub_card/README.md` with the model's configuration and the given texts."""
    config = model.config
    fields = {
        "title": title,
        "summary": summary,
        "provenance": provenance,
        "repo_id": repo_id,
        "datasets": "\n".join(f"- {name}" for name in datasets),
        "num_parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "sliding_window": config.sliding_window,
        "ttl_chunk_size": config.ttl_chunk_size,
    }
    if config.use_memory:
        fields["memory"] = (
            f"{config.feature_map} features of degree {config.poly_degree} on {config.memory_key_dim} dims, "
            f"rank {config.poly_rank}, MLP width {config.memory_mlp_hidden_size}, "
            f"optimizer `{config.memory_optimizer}`"
        )
        rates = (
            f"eta {config.ttl_lr}{' (adaptive)' if config.ttl_adaptive_lr else ''}, momentum {config.ttl_momentum}, "
            f"decay {config.ttl_decay}"
        )
        if config.ttl_data_dependent_rates:
            rates = f"data-dependent rates per token, starting at {rates}"
        fields["ttl"] = (
            f"chunk {config.ttl_chunk_size}, Omega window {config.omega_window}, {rates}, "
            f"Newton–Schulz steps {config.ttl_ns_steps}"
        )
    else:
        fields["memory"] = "none: attention-only ablation (`use_memory=False`)"
        fields["ttl"] = "none (no memory to learn)"
    template = next((path for path in CARD_TEMPLATE_LOCATIONS if path.is_file()), None)
    if template is None:
        raise FileNotFoundError(f"model-card template not found in {[str(p) for p in CARD_TEMPLATE_LOCATIONS]}")
    return Template(template.read_text()).substitute(fields)


def check_output_dir(output_dir: str | Path, overwrite: bool = False) -> None:
    """Raise unless `output_dir` may be written: absent, an empty folder, or a folder and `overwrite`."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} exists and is not a folder; refusing to replace it")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


@contextmanager
def atomic_directory(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir` and move it into place only if the block succeeds, so a
    failure never leaves a half-written folder where a good one (or nothing) was."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(umask_mode(0o777))
    try:
        yield staging
        move_folder_into_place(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_model_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` as a Hub model repository: config.json with `auto_map`, model.safetensors (tied weights
    once), generation_config.json, the model code (modeling_atlas.py and the sibling files it imports), the
    tokenizer (with `PLAIN_CHAT_TEMPLATE` if it has no chat template) and README.md."""
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
            if tokenizer.chat_template is None:
                # Written beside the tokenizer (where from_pretrained reads it), leaving the caller's tokenizer as is.
                (staging / CHAT_TEMPLATE_FILE).write_text(PLAIN_CHAT_TEMPLATE)
        if card is not None:
            (staging / "README.md").write_text(card)
    return Path(output_dir)


def push_folder_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a folder written by `save_model_folder` as it is; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload Atlas-MAG model")
    return str(url)
