import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tests run tiny tensors, for which extra threads only add contention (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from atlas_mag import AtlasMAGConfig, AtlasMAGForCausalLM  # noqa: E402
from atlas_mag.hub import save_model_folder  # noqa: E402

torch.set_num_threads(1)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    sliding_window=16,
    memory_key_dim=8,
    memory_expansion=2,
    poly_rank=24,
    omega_window=8,
    gamma_gate_hidden_size=8,
    ttl_chunk_size=4,
    qk_normalizer_scale=0.05,
    # A large inner learning rate makes the effect of every TTL step visible in the logits of a random model.
    ttl_lr=0.3,
)


def word_tokenizer(vocab_size: int = 97):
    """A whitespace tokenizer over the words w4 .. w{vocab_size - 1} and the four special tokens, for pipelines
    on tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_config(**overrides) -> AtlasMAGConfig:
    """A small config whose windows and chunks are short enough to cross many times in a short test."""
    return AtlasMAGConfig(**{**TINY, **overrides})


def save_tiny_model(output_dir: Path) -> Path:
    """A tiny model and its word tokenizer saved as a model folder at `output_dir`, for the tests that serve a
    folder. Larger weights, as in test_generation: a random model whose greedy output does not repeat one token."""
    torch.manual_seed(0)
    model = AtlasMAGForCausalLM(tiny_config(initializer_range=0.2))
    return save_model_folder(model, output_dir, tokenizer=word_tokenizer())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
