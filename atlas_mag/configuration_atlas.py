"""Atlas-MAG configuration.

This file is copied next to the weights of every published model, so it imports nothing from the `atlas_mag`
package: only `transformers` and the standard library.
"""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

MEMORY_OPTIMIZERS = ("muon", "gd")
FEATURE_MAPS = ("polynomial", "taylor")
BLOCK_TYPES = ("mag", "mal")
# How Newton–Schulz is evaluated (`ops_atlas.newton_schulz`): the form with fewer FLOPs for each matrix's shape, or
# one form forced.
NS_EVALUATIONS = ("auto", "direct", "gram")

# Named sizes. "atlas-mag-43m" is the published checkpoint; the others follow the sizes of the `titans_atlas`
# presets (~170M, ~400M, ~760M parameters, embeddings tied, vocab 32000). Parameter counts are in
# `PRESET_PARAMETERS` and checked by the tests.
PRESETS: dict[str, dict[str, Any]] = {
    "atlas-mag-43m": {},
    "atlas-small": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, intermediate_size=2048,
                        poly_rank=768),
    "atlas-medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816,
                         poly_rank=1024),
    "atlas-large": dict(hidden_size=1536, num_hidden_layers=23, num_attention_heads=24, intermediate_size=4096,
                        poly_rank=1024),
}


# Keys that configs saved by Transformers 4.x and 5.x carry besides the installed release's own attributes (read
# off a bare `PretrainedConfig()` below): the base class accepts or drops them, so they are not typos.
SAVED_CONFIG_KEYS = frozenset(
    {
        "_attn_implementation_autoset",
        "_commit_hash",
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "attn_implementation",
        "auto_map",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "experts_implementation",
        "finetuning_task",
        "model_type",
        "name_or_path",
        "num_labels",
        "output_attentions",
        "per_layer_config",
        "prefix",
        "pruned_heads",
        "return_dict",
        "sep_token_id",
        "task_specific_params",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "use_bfloat16",
        "is_decoder",
    }
)


@lru_cache(maxsize=1)
def _base_config_keys() -> frozenset[str]:
    """Every key `PretrainedConfig` itself takes in the installed release, generation defaults included."""
    bare = PretrainedConfig()
    return frozenset(vars(bare)) | frozenset(bare.to_dict()) | frozenset(GenerationConfig().to_dict())


def polynomial_feature_size(key_dim: int, degree: int) -> int:
    """Number of monomials of degree 1..`degree` in `key_dim` variables (no constant term).

    Degree 2 with 64 inputs gives 64 + 2080 = 2144, the published memory's feature size.
    """
    return sum(math.comb(key_dim + d - 1, d) for d in range(1, degree + 1))


class AtlasMAGConfig(PretrainedConfig):
    r"""
    Configuration of an Atlas-MAG model (Behrouz et al., "Atlas: Learning to Optimally Memorize the Context at Test
    Time", arXiv 2505.23735). The defaults are the published 43M-parameter checkpoint (`checkpoint_step008800.pt`).

    Each block gates sliding-window attention with a deep polynomial memory:
    `x = x + attn(x) * sigmoid(Memory(q'))`, and the memory's weights are learned *during the forward pass*
    (test-time learning, TTL) by the Omega rule with Muon (Newton–Schulz) updates. Every sequence starts from the
    memory weights stored in the model and owns its updated copy, which lives in the `AtlasMAGCache`.

    Architecture:
        vocab_size (`int`, defaults to 32000): number of tokens in the vocabulary.
        hidden_size (`int`, defaults to 512): width of the residual stream.
        num_hidden_layers (`int`, defaults to 6): number of Atlas-MAG blocks.
        num_attention_heads (`int`, defaults to 8): attention heads; `hidden_size` must be a multiple of it.
        intermediate_size (`int`, defaults to 1365): hidden width of the SwiGLU feed-forward network
            (`int(hidden_size * 4 * 2 / 3)` in the reference).
        sliding_window (`int`, defaults to 512): attention window, the token itself included: key `j` is visible to
            query `t` iff `t - sliding_window < j <= t`. Decoding keeps `sliding_window - 1` keys per layer.
        rope_theta (`float`, defaults to 10000.0): base of the rotary position embedding (rotate-half, all head dims).
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm (computed in fp32).
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the memory's two LayerNorms.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight initialisation.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the LM head.

    Memory (the gate of every block):
        use_memory (`bool`, defaults to `True`): `False` gives the attention-only ablation (`x = x + attn(x)`,
            no memory, no gamma gate, no Q-K projection).
        block_type (`str`, defaults to `"mag"`): `"mag"` (memory as gate, the published model) or `"mal"`
            (memory as layer: the memory output is added to the attention input).
        memory_key_dim (`int`, defaults to 64): width the memory projects its 512-d query down to before the
            feature map.
        memory_expansion (`int`, defaults to 4): the memory MLP's hidden width is `memory_key_dim *
            memory_expansion` unless `memory_hidden_size` is given.
        memory_hidden_size (`int`, *optional*): explicit hidden width of the memory MLP.
        memory_depth (`int`, defaults to 1): hidden layers of the memory MLP (exact GELU between layers). The
            reference is 1: `poly_rank -> hidden -> memory_key_dim`; 0 makes it linear.
        feature_map (`str`, defaults to `"polynomial"`): `"polynomial"` concatenates every monomial of degree
            1..`poly_degree` of the projected query (degree `d` monomials ordered as
            `itertools.combinations_with_replacement(range(memory_key_dim), d)`, which for `d = 2` is
            `torch.triu_indices` order). `"taylor"` scales the degree-`d` block by a learnable coefficient
            initialised to `1 / d!`, so that the feature inner product approximates `exp(q . k) - 1`.
        poly_degree (`int`, defaults to 2): highest degree of the feature map.
        poly_rank (`int`, defaults to 512): width the features are compressed to (must not exceed the feature size).
        omega_window (`int`, defaults to 256): positions in the Omega rule's loss and in the Q-K projection's key
            history.
        omega_decay (`float`, defaults to 0.95): per-position decay of the Q-K projection's key history.
        qk_persistent_scale (`float`, defaults to 0.1): the Q-K projection's fixed persistent matrix is
            `qk_persistent_scale * I`.
        qk_normalizer_scale (`float`, defaults to 0.01): the Q-K projection's fixed normaliser is
            `qk_normalizer_scale * hidden_size` (5.12 in the reference).
        gamma_gate_hidden_size (`int`, defaults to 64): hidden width of the per-token gate
            `gamma = sigmoid(W2 silu(W1 h))` that weighs keys in the Q-K projection and tokens in the Omega loss.

    Test-time learning (TTL):
        ttl_enabled (`bool`, defaults to `True`): learn the memory during every forward pass, in training and in
            inference alike (override per call with `model(..., ttl=False)` or `generate(..., ttl=False)`).
        ttl_chunk_size (`int`, defaults to 256): the sequence is cut into chunks at absolute positions
            `0, C, 2C, ...`; every token reads the memory as it stood after the previous chunk, and one Omega-rule
            step follows each completed chunk.
        ttl_lr (`float`, defaults to 0.01): inner learning rate eta.
        ttl_adaptive_lr (`bool`, defaults to `True`): divide eta by `1 + ||g||` (per parameter and sequence). With
            `memory_optimizer="gd"` the divisor is at least `(1 - theta) ||S||`, so that no step is longer than
            `eta / (1 - theta)`: after large gradients the momentum can be far longer than the current gradient,
            and the uncapped rule made the memory diverge on long inputs.
        ttl_momentum (`float`, defaults to 0.9): momentum theta, `S = theta S + g`.
        ttl_decay (`float`, defaults to 0.999): weight decay alpha, `W = alpha W - eta * update(S)`.
        ttl_data_dependent_rates (`bool`, defaults to `False`): make eta, theta and alpha functions of the input
            (Titans and Atlas; the published model uses the constants): per token, from the block's normed input
            h, `eta = 2 ttl_lr sigmoid(w_eta h + b_eta)`, `theta = sigmoid(w_theta h + b_theta)` and
            `alpha = sigmoid(w_alpha h + b_alpha)`, learnt by the outer loss; an update takes the rates of the
            token it follows. The weights start at zero and the biases at the constants (`ttl_lr`,
            `ttl_momentum`, `ttl_decay`), so a new model starts as the constant-rate one; `ttl_momentum` must
            then be > 0 and `ttl_decay` < 1.
        memory_optimizer (`str`, defaults to `"muon"`): `"muon"` orthogonalises the momentum of every matrix
            with Newton–Schulz (Atlas); `"gd"` applies the momentum as is (OmegaNet). Vectors and the output scale
            always use the normalised momentum `S / ||S||` with Muon and the raw momentum with plain descent.
        ttl_ns_steps (`int`, defaults to 5): Newton–Schulz iterations (the published demo used 5, training 10).
        ttl_ns_evaluation (`str`, defaults to `"auto"`): how the same Newton–Schulz function is computed:
            `"direct"` iterates on the [m, n] matrix (m <= n), `"gram"` forms the [m, m] Gram matrix once and iterates
            on polynomials of it (fewer FLOPs when n > 1.5 m: 1.85x fewer for the [512, 2144] compression matrix at
            5 steps), `"auto"` picks the cheaper form for each matrix shape (FLOPs plus a fixed cost per kernel,
            which keeps small matrices direct). The results agree to fp32
            rounding (on ill-conditioned matrices the Gram form's is larger: it squares the singular values).
        ttl_backprop_through_updates (`bool`, defaults to `False`): let the outer training loss backpropagate
            through the TTL updates (second-order, memory-hungry). When off, the outer loss still trains the
            memory's initial weights and all projections through the memory reads.
    """

    model_type = "atlas_mag"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        intermediate_size: int = 1365,
        sliding_window: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_memory: bool = True,
        block_type: str = "mag",
        memory_key_dim: int = 64,
        memory_expansion: int = 4,
        memory_hidden_size: int | None = None,
        memory_depth: int = 1,
        feature_map: str = "polynomial",
        poly_degree: int = 2,
        poly_rank: int = 512,
        omega_window: int = 256,
        omega_decay: float = 0.95,
        qk_persistent_scale: float = 0.1,
        qk_normalizer_scale: float = 0.01,
        gamma_gate_hidden_size: int = 64,
        ttl_enabled: bool = True,
        ttl_chunk_size: int = 256,
        ttl_lr: float = 0.01,
        ttl_adaptive_lr: bool = True,
        ttl_momentum: float = 0.9,
        ttl_decay: float = 0.999,
        ttl_data_dependent_rates: bool = False,
        memory_optimizer: str = "muon",
        ttl_ns_steps: int = 5,
        ttl_ns_evaluation: str = "auto",
        ttl_backprop_through_updates: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 2,
        eos_token_id: int | None = 3,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_memory = use_memory
        self.block_type = block_type
        self.memory_key_dim = memory_key_dim
        self.memory_expansion = memory_expansion
        self.memory_hidden_size = memory_hidden_size
        self.memory_depth = memory_depth
        self.feature_map = feature_map
        self.poly_degree = poly_degree
        self.poly_rank = poly_rank
        self.omega_window = omega_window
        self.omega_decay = omega_decay
        self.qk_persistent_scale = qk_persistent_scale
        self.qk_normalizer_scale = qk_normalizer_scale
        self.gamma_gate_hidden_size = gamma_gate_hidden_size
        self.ttl_enabled = ttl_enabled
        self.ttl_chunk_size = ttl_chunk_size
        self.ttl_lr = ttl_lr
        self.ttl_adaptive_lr = ttl_adaptive_lr
        self.ttl_momentum = ttl_momentum
        self.ttl_decay = ttl_decay
        self.ttl_data_dependent_rates = ttl_data_dependent_rates
        self.memory_optimizer = memory_optimizer
        self.ttl_ns_steps = ttl_ns_steps
        self.ttl_ns_evaluation = ttl_ns_evaluation
        self.ttl_backprop_through_updates = ttl_backprop_through_updates
        self.use_cache = use_cache
        self._validate()
        self._reject_unknown_keys(kwargs)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AtlasMAGConfig:
        """A named size (`atlas-mag-43m`, `atlas-small`, `atlas-medium`, `atlas-large`); keyword arguments
        override any field, e.g. `AtlasMAGConfig.from_preset("atlas-small", memory_optimizer="gd")`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def memory_mlp_hidden_size(self) -> int:
        return self.memory_hidden_size or self.memory_key_dim * self.memory_expansion

    @property
    def feature_size(self) -> int:
        return polynomial_feature_size(self.memory_key_dim, self.poly_degree)

    def _reject_unknown_keys(self, kwargs: dict[str, Any]) -> None:
        """A key that is neither an Atlas-MAG field nor one Transformers saves is a typo: refuse it rather than
        store it unused (`hidden_sise=32` would otherwise build the default width)."""
        if not kwargs:
            return
        unknown = sorted(set(kwargs) - _base_config_keys() - SAVED_CONFIG_KEYS)
        if not unknown:
            return
        known = [name for name in vars(self) if not name.startswith("_")]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"`{name}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ValueError(f"AtlasMAGConfig got unknown field(s): {', '.join(hints)}")

    def _validate(self) -> None:
        for name in (
            "use_memory",
            "ttl_enabled",
            "ttl_adaptive_lr",
            "ttl_data_dependent_rates",
            "ttl_backprop_through_updates",
            "use_cache",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        for name in (
            "rope_theta",
            "rms_norm_eps",
            "layer_norm_eps",
            "initializer_range",
            "omega_decay",
            "qk_persistent_scale",
            "qk_normalizer_scale",
            "ttl_lr",
            "ttl_momentum",
            "ttl_decay",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        positive_ints = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "sliding_window",
            "memory_key_dim",
            "memory_expansion",
            "poly_rank",
            "omega_window",
            "gamma_gate_hidden_size",
            "ttl_chunk_size",
            "ttl_ns_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if isinstance(self.memory_depth, bool) or not isinstance(self.memory_depth, int) or self.memory_depth < 0:
            raise ValueError(f"`memory_depth` must be a non-negative integer, got {self.memory_depth!r}")
        if self.memory_hidden_size is not None and (
            not isinstance(self.memory_hidden_size, int) or self.memory_hidden_size < 1
        ):
            raise ValueError(
                f"`memory_hidden_size` must be a positive integer or None, got {self.memory_hidden_size!r}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"`hidden_size / num_attention_heads` must be even for RoPE, got {self.head_dim}")
        if isinstance(self.poly_degree, bool) or not isinstance(self.poly_degree, int) or self.poly_degree < 1:
            raise ValueError(f"`poly_degree` must be an integer >= 1, got {self.poly_degree!r}")
        if self.poly_rank > self.feature_size:
            raise ValueError(
                f"`poly_rank` ({self.poly_rank}) must not exceed the feature size {self.feature_size} of "
                f"`poly_degree`={self.poly_degree} on `memory_key_dim`={self.memory_key_dim}"
            )
        for name, allowed in (
            ("memory_optimizer", MEMORY_OPTIMIZERS),
            ("feature_map", FEATURE_MAPS),
            ("block_type", BLOCK_TYPES),
            ("ttl_ns_evaluation", NS_EVALUATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("ttl_momentum", "omega_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if not 0.0 < self.ttl_decay <= 1.0:
            raise ValueError(f"`ttl_decay` must be in (0, 1], got {self.ttl_decay!r}")
        if self.ttl_data_dependent_rates:
            # The rates' biases start at the constants' logits.
            for name, value in (("ttl_momentum", self.ttl_momentum), ("ttl_decay", self.ttl_decay)):
                if not 0.0 < value < 1.0:
                    raise ValueError(f"`{name}` must be in (0, 1) with `ttl_data_dependent_rates`, got {value!r}")
        for name in ("ttl_lr", "qk_persistent_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        for name in ("rope_theta", "rms_norm_eps", "layer_norm_eps", "qk_normalizer_scale", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}")
