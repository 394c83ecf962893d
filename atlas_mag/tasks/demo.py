"""Test-time learning at inference: the same prompts through `generate` with TTL on and off, side by side.

Each `generate` call builds a fresh `AtlasMAGCache`, so every prompt (and every setting) starts from the memory
weights stored in the model: nothing learned from one prompt reaches the next, and the order in which prompts
and settings run does not change any result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..cli import synchronize

DEFAULT_PROMPTS = (
    "The history of the printing press begins",
    "Alice put the red key in the blue box and the green key in the yellow box. Later she opened the blue box "
    "and found the",
    "def fibonacci(n):\n    ",
)
SETTINGS = {"on": True, "off": False}
# The model's per-call switches behind each condition of the NIAH and recall evaluations. "gate_removed" takes the
# memory out of every block (MAG: `x + attn(x)`), so only attention can carry information.
CONDITIONS: dict[str, dict[str, bool]] = {
    "ttl_on": {"ttl": True},
    "ttl_off": {"ttl": False},
    "gate_removed": {"ttl": False, "memory_gate": False},
}



def condition_switches(condition: str) -> dict[str, bool]:
    """The model's per-call switches for one of `CONDITIONS`."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {tuple(CONDITIONS)}")
    return CONDITIONS[condition]

def load_model_folder(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder (converted or trained) the way a user of the Hub would: the model's own code
    (`trust_remote_code=True`) and its tokenizer. Returns the model in eval mode on `device`."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text`, starting with BOS when the tokenizer has one (the model was trained on
    `<bos> text <eos>` documents) and the text does not already start with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise ValueError(f"the prompt {text!r} encodes to no tokens")
    return ids


@dataclass
class GenerationResult:
    ttl: bool
    prompt_tokens: int
    perplexity: float | None
    generated_ids: list[int]
    generated_text: str
    seconds: float

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.seconds / max(len(self.generated_ids), 1)


@torch.inference_mode()
def prompt_perplexity(model: PreTrainedModel, input_ids: torch.Tensor, ttl: bool) -> float | None:
    """exp(mean next-token loss) over the prompt; None for a one-token prompt (nothing to predict)."""
    if input_ids.shape[1] < 2:
        return None
    loss = model(input_ids, labels=input_ids, ttl=ttl, use_cache=False).loss
    return math.exp(loss.item())


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    **switches: bool,
) -> list[int]:
    """The greedy continuation of one prompt (`input_ids` [1, L]) by `generate`, as a server would run it;
    `switches` are the model's per-call switches (`ttl`, `memory_gate`). Returns the new token ids."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **switches,
    )
    return output[0, input_ids.shape[1] :].tolist()


@torch.inference_mode()
def generate_with(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int, ttl: bool
) -> GenerationResult:
    """Greedy `generate` of one prompt with TTL on or off, timed (prefill included)."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    perplexity = prompt_perplexity(model, ids, ttl)
    synchronize(device)
    start = time.perf_counter()
    new_ids = greedy_generate(model, tokenizer, ids, max_new_tokens, ttl=ttl)
    synchronize(device)
    seconds = time.perf_counter() - start
    return GenerationResult(
        ttl=ttl,
        prompt_tokens=ids.shape[1],
        perplexity=perplexity,
        generated_ids=new_ids,
        generated_text=tokenizer.decode(new_ids, skip_special_tokens=True),
        seconds=seconds,
    )


def run_demo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    order: Sequence[str] = ("on", "off"),
    warmup: bool = True,
) -> list[dict[str, Any]]:
    """Every prompt under every setting in `order` ("on"/"off"). Returns, per prompt, the results by setting and
    whether TTL on and off generated different tokens. `warmup` first runs each setting once, untimed, so that
    one-off costs (kernel selection, allocations) do not land in the first prompt's time per token."""
    unknown = [setting for setting in order if setting not in SETTINGS]
    if unknown or not order:
        raise ValueError(f"order must list settings from {tuple(SETTINGS)}, got {list(order)}")
    model.eval()
    if warmup and prompts:
        for setting in order:
            generate_with(model, tokenizer, prompts[0], 2, SETTINGS[setting])
    report = []
    for prompt in prompts:
        results = {
            setting: generate_with(model, tokenizer, prompt, max_new_tokens, SETTINGS[setting]) for setting in order
        }
        entry: dict[str, Any] = {"prompt": prompt, "results": results}
        if "on" in results and "off" in results:
            entry["outputs_differ"] = results["on"].generated_ids != results["off"].generated_ids
        report.append(entry)
    return report


def demo_to_json(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **{key: value for key, value in entry.items() if key != "results"},
            "results": {
                setting: {**asdict(result), "ms_per_token": result.ms_per_token}
                for setting, result in entry["results"].items()
            },
        }
        for entry in report
    ]


def format_demo(report: list[dict[str, Any]]) -> str:
    lines = []
    for index, entry in enumerate(report, start=1):
        lines.append(f"=== prompt {index}: {entry['prompt']!r}")
        for setting, result in entry["results"].items():
            perplexity = "n/a" if result.perplexity is None else f"{result.perplexity:.2f}"
            lines.append(
                f"  TTL {setting:<3}  prompt ppl {perplexity:>9}  {result.ms_per_token:7.1f} ms/token "
                f"({len(result.generated_ids)} new tokens, prompt {result.prompt_tokens} tokens)"
            )
            lines.append(f"           -> {result.generated_text!r}")
        if "outputs_differ" in entry:
            lines.append(f"  outputs differ between TTL on and off: {'yes' if entry['outputs_differ'] else 'no'}")
    return "\n".join(lines)
