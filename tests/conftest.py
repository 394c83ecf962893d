import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tests run tiny tensors, for which extra threads only add contention (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from atlas_mag import AtlasMAGConfig  # noqa: E402

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


def tiny_config(**overrides) -> AtlasMAGConfig:
    """A small config whose windows and chunks are short enough to cross many times in a short test."""
    return AtlasMAGConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
