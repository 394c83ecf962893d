"""Synthetic training checkpoints in the layout of the original Atlas-MAG implementation
(`../shared/reference/atlas_mag_reference.md`, "File layout"), written from that description alone: random
values for every entry, momentum buffers included, the fixed Q-K buffers at their defining values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MEMORY_PARAMETERS = (
    "output_scale",
    "proj_down.weight",
    "poly_norm.weight",
    "poly_norm.bias",
    "poly_compress.weight",
    "w2.weight",
    "w1.weight",
    "proj_up.weight",
    "output_norm.weight",
    "output_norm.bias",
)


@dataclass
class ReferenceSizes:
    vocab_size: int = 97
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    key_dim: int = 8
    poly_degree: int = 2
    poly_rank: int = 24
    memory_hidden: int = 16
    gamma_hidden: int = 8
    omega_window: int = 8
    omega_decay: float = 0.95
    disable_memory: bool = False

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim * 4 * 2 / 3)

    @property
    def feature_size(self) -> int:
        return sum(math.comb(self.key_dim + d - 1, d) for d in range(1, self.poly_degree + 1))


PUBLISHED = ReferenceSizes(
    vocab_size=32000,
    dim=512,
    n_layers=6,
    n_heads=8,
    key_dim=64,
    poly_rank=512,
    memory_hidden=256,
    gamma_hidden=64,
    omega_window=256,
)


def reference_state_dict(
    sizes: ReferenceSizes,
    persistent_scale: float = 0.1,
    normalizer_scale: float = 0.01,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A `model_state_dict` of the original layout with random weights (scaled so activations stay O(1))."""
    generator = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(size, generator=generator)

    def small(*shape: int) -> torch.Tensor:
        return 0.2 * torch.randn(shape, generator=generator)

    dim, head_dim = sizes.dim, sizes.dim // sizes.n_heads
    embedding = 0.15 * torch.randn(sizes.vocab_size, dim, generator=generator)
    sd = {"w_init": small(dim), "tok_emb.weight": embedding, "lm_head.weight": embedding}
    for i in range(sizes.n_layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = norm(dim)
        sd[p + "norm2.weight"] = norm(dim)
        for name in ("w_q", "w_k", "w_v"):
            sd[p + f"qkv.{name}.weight"] = weight(dim, dim)
        sd[p + "qkv.q_norm.weight"] = norm(head_dim)
        sd[p + "qkv.k_norm.weight"] = norm(head_dim)
        if not sizes.disable_memory:
            sd[p + "gamma_gate.gate.0.weight"] = weight(sizes.gamma_hidden, dim)
            sd[p + "gamma_gate.gate.2.weight"] = weight(1, sizes.gamma_hidden)
            sd[p + "qk_memory.decay_weights"] = torch.tensor(
                [sizes.omega_decay**j for j in range(sizes.omega_window)], dtype=torch.float32
            )
            sd[p + "qk_memory.m_persistent"] = torch.eye(dim) * persistent_scale
            sd[p + "qk_memory.norm_persistent"] = torch.tensor(dim * normalizer_scale)
            memory = {
                "output_scale": 1.0 + 0.5 * torch.rand((), generator=generator),
                "proj_down.weight": weight(sizes.key_dim, dim),
                "poly_norm.weight": norm(sizes.feature_size),
                "poly_norm.bias": small(sizes.feature_size),
                "poly_compress.weight": weight(sizes.poly_rank, sizes.feature_size),
                "w2.weight": weight(sizes.memory_hidden, sizes.poly_rank),
                "w1.weight": weight(sizes.key_dim, sizes.memory_hidden),
                "proj_up.weight": weight(dim, sizes.key_dim),
                "output_norm.weight": norm(dim),
                "output_norm.bias": small(dim),
            }
            for name, value in memory.items():
                sd[p + "memory." + name] = value
                # One momentum buffer per memory parameter, non-zero after training.
                sd[p + "memory.momentum_" + name.replace(".", "_")] = small(*value.shape)
        sd[p + "w_o.weight"] = weight(dim, dim)
        sd[p + "ffn.w1.weight"] = weight(sizes.ffn_hidden, dim)
        sd[p + "ffn.w2.weight"] = weight(sizes.ffn_hidden, dim)
        sd[p + "ffn.w3.weight"] = weight(dim, sizes.ffn_hidden)
    sd["norm_f.weight"] = norm(dim)
    return sd


def training_settings(sizes: ReferenceSizes, window: int, **overrides) -> dict:
    """The `config` dict the original training script saves (`vars(TrainingConfig)`), plus `window_size`."""
    settings = {
        "dim": sizes.dim,
        "n_layers": sizes.n_layers,
        "n_heads": sizes.n_heads,
        "batch_size": 8,
        "seq_len": 2048,
        "learning_rate": 3e-4,
        "poly_degree": sizes.poly_degree,
        "poly_rank": sizes.poly_rank,
        "ttl_eta": 0.01,
        "ttl_adaptive_eta": True,
        "ns_iterations": 10,
        "disable_memory": sizes.disable_memory,
        "tokenizer_path": "data/tokenizer_smollm.json",
        "subsets": ["cosmopedia-v2", "fineweb-edu-dedup"],
        "device": "cuda",
        "window_size": window,
    }
    return {**settings, **overrides}


def reference_checkpoint(
    sizes: ReferenceSizes,
    window: int = 16,
    state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: bool = True,
    **settings_overrides,
) -> dict:
    """A whole training checkpoint: step, epoch, tokens_seen, model_state_dict, optimizer_state_dict and
    config."""
    sd = reference_state_dict(sizes) if state_dict is None else state_dict
    optimizer = {"state": {}, "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": []}]}
    if optimizer_state:
        optimizer["state"] = {
            0: {"step": torch.tensor(8800.0), "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}
        }
        optimizer["param_groups"][0]["params"] = [0]
    return {
        "step": 8800,
        "epoch": 0,
        "tokens_seen": 8800 * 8 * 2048,
        "model_state_dict": sd,
        "optimizer_state_dict": optimizer,
        "config": training_settings(sizes, window, **settings_overrides),
    }
