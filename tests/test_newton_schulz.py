"""Newton–Schulz evaluated directly and in Gram space: both against an fp64 run of the published iteration, at
the published model's matrix shapes and at small ones, in both orientations; the automatic choice, the forced
switch, gradients, and a whole model's logits."""

import functools
import json

import pytest
import torch
from conftest import tiny_config
from reference_forward import newton_schulz as reference_newton_schulz
from torch.utils.flop_counter import FlopCounterMode

from atlas_mag import AtlasMAGConfig, AtlasMAGForCausalLM, AtlasMAGMemory
from atlas_mag.ops_atlas import newton_schulz, newton_schulz_choice, newton_schulz_flops, omega_update

STEPS = 5
# fp32's unit roundoff: the smallest error an fp32 evaluation can be held to.
FP32_UNIT = 2.0**-24


def published_matrix_shapes():
    """The shapes of the published memory's matrices (each is Newton–Schulz'd at every update)."""
    memory = AtlasMAGMemory(AtlasMAGConfig.from_preset("atlas-mag-43m"))
    return sorted({tuple(weight.shape) for weight in memory.weights().tensors() if weight.dim() == 2})


def test_the_published_shapes_are_those_the_tests_name():
    # proj_down, the memory MLP's two layers, the compression matrix and proj_up.
    assert published_matrix_shapes() == [(64, 256), (64, 512), (256, 512), (512, 64), (512, 2144)]


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def fp64_reference(matrix):
    """The published iteration in float64, on the smaller Gram side (the larger one is the same function, only
    slower: NS(X^T) = NS(X)^T)."""
    if matrix.shape[0] > matrix.shape[1]:
        return reference_newton_schulz(matrix.double().T, STEPS).T
    return reference_newton_schulz(matrix.double(), STEPS)


@functools.cache
def random_wide_matrix_and_reference(rows, cols):
    """A random fp32 [rows, cols] matrix and its `fp64_reference`, shared by both orientations (the reference of
    the published shape takes half a second)."""
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    return matrix, fp64_reference(matrix)


SMALL_SHAPES = [(4, 16), (8, 40), (16, 64)]
WIDE_SHAPES = [*SMALL_SHAPES, *published_matrix_shapes()]


@pytest.mark.parametrize("shape", [*SMALL_SHAPES, (6, 6), (10, 14)], ids=str)
@pytest.mark.parametrize("evaluation", ["direct", "gram"])
def test_both_forms_are_the_published_iteration_in_float64(shape, evaluation):
    """The same function: in float64 either form equals the published iteration to far below fp32 rounding, in
    both orientations, square and square-ish matrices included."""
    matrix = torch.randn(*shape, dtype=torch.float64)
    for oriented in (matrix, matrix.T):
        got = newton_schulz(oriented[None], STEPS, evaluation)[0]
        torch.testing.assert_close(got, fp64_reference(oriented), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [*WIDE_SHAPES, *[shape[::-1] for shape in WIDE_SHAPES]], ids=str)
def test_in_float32_the_gram_form_is_as_close_to_float64_as_the_direct_form(shape):
    """On wide random matrices: the Gram form is at most twice as far from the fp64 result as the direct form is
    (both are fp32 rounding, amplified alike by the iteration's slope)."""
    matrix, expected = random_wide_matrix_and_reference(min(shape), max(shape))
    if shape[0] > shape[1]:
        matrix, expected = matrix.T.contiguous(), expected.T
    direct = relative_error(newton_schulz(matrix[None], STEPS, "direct")[0], expected)
    gram = relative_error(newton_schulz(matrix[None], STEPS, "gram")[0], expected)
    assert direct < 1e-4
    assert gram <= 2 * direct + 4 * FP32_UNIT


@pytest.mark.parametrize("decay", ["logspace", "power"])
def test_ill_conditioned_matrices_keep_the_accuracy_a_float32_gram_matrix_holds(decay):
    """Singular values spread over decades, with random singular vectors (as a real momentum has): the Gram
    matrix squares them, and storing it in fp32 moves each eigenvalue by about u ||G||, so a singular value s is
    held to about u / s instead of u, and the error reaches sqrt(u) ~ 2.4e-4 where s ~ sqrt(u) (measured 15-60x
    the direct form's error on such inputs, 1.6e-4 and 4.3e-4 here). Bounded by 4 sqrt(u)."""
    rows, cols = 64, 512
    singular = torch.logspace(0, -4, rows) if decay == "logspace" else torch.arange(1.0, rows + 1) ** -2
    left, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, rows, dtype=torch.float64))
    matrix = ((left * singular.double()) @ right.T).float()
    expected = fp64_reference(matrix)
    for evaluation, bound in (("direct", 1e-4), ("gram", 4 * FP32_UNIT**0.5)):
        assert relative_error(newton_schulz(matrix[None], STEPS, evaluation)[0], expected) < bound


def low_rank(rows, rank, cols, generator):
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)


TINY_SINGULAR_VALUES = {
    "rank 1": lambda g: low_rank(16, 1, 64, g),
    "rank 3 of 24": lambda g: low_rank(24, 3, 96, g),
    "rank 3 of 24, tall": lambda g: low_rank(96, 3, 24, g),
    "decaying singular values": lambda g: torch.randn(32, 128, generator=g) * torch.logspace(0, -8, 32)[:, None],
    "norm far below eps": lambda g: 1e-30 * torch.randn(16, 64, generator=g),
}


@pytest.mark.parametrize("name", TINY_SINGULAR_VALUES)
def test_tiny_singular_values_behave_as_in_the_direct_form(name):
    """A rank-deficient or nearly-zero matrix stays finite and matches the fp64 result as the direct form does,
    to the accuracy a Gram matrix holds (see the ill-conditioned test: the rounding noise of a null space grows by
    a² per step in Gram space and by a in the direct form: 2-4x the direct form's error on rank-1 inputs, 6e-5 on
    this 16 x 64 one, growing with the size, 2.6e-4 at 64 x 512)."""
    matrix = TINY_SINGULAR_VALUES[name](torch.Generator().manual_seed(0))
    expected = fp64_reference(matrix)
    for evaluation in ("direct", "gram"):
        got = newton_schulz(matrix[None], STEPS, evaluation)[0]
        assert torch.isfinite(got).all()
        assert relative_error(got, expected) < FP32_UNIT**0.5


def test_a_zero_matrix_stays_zero():
    zero = torch.zeros(2, 8, 32)
    for evaluation in ("direct", "gram"):
        assert torch.equal(newton_schulz(zero, STEPS, evaluation), zero)


@pytest.mark.parametrize(
    "rows, cols, expected",
    [(512, 2144, "gram"), (2144, 512, "gram"), (64, 512, "gram"), (256, 512, "gram"), (64, 256, "gram"),
     (512, 512, "direct"), (400, 600, "direct"), (400, 640, "gram"), (640, 400, "gram"),
     # Wide but small: the Gram form's 9 more kernels cost more than its FLOP savings.
     (16, 128, "direct"), (64, 128, "direct"), (8, 32, "direct")],
)
def test_auto_picks_the_gram_form_for_wide_matrices_and_direct_for_square_ish_or_small_ones(rows, cols, expected):
    assert newton_schulz_choice(rows, cols, STEPS) == expected
    assert newton_schulz_choice(rows, cols, 1) == "direct"  # one step: the same FLOPs, the direct form
    for forced in ("direct", "gram"):
        assert newton_schulz_choice(rows, cols, STEPS, forced) == forced


def counted_matmul_flops(function, *args):
    with FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [(2, 12, 40), (2, 40, 12), (1, 16, 16)], ids=str)
@pytest.mark.parametrize("evaluation", ["direct", "gram", "auto"])
def test_the_flop_formula_and_the_forced_form_against_torchs_flop_counter(shape, evaluation):
    """The FLOPs torch counts in the call are those of the form asked for (or of the one `auto` picks)."""
    chosen = newton_schulz_choice(shape[1], shape[2], STEPS, evaluation)
    counted = counted_matmul_flops(newton_schulz, torch.randn(*shape), STEPS, evaluation)
    assert counted == shape[0] * newton_schulz_flops(shape[1], shape[2], STEPS, chosen)


@pytest.mark.parametrize("evaluation", ["direct", "gram", "auto"])
def test_the_config_switch_reaches_the_memory_update(evaluation):
    """`ttl_ns_evaluation` decides the form of every matrix of a Muon step: its only matrix products are
    Newton–Schulz's. The memory has [64, 512] matrices (Gram under `auto`) and small ones (direct)."""
    config = tiny_config(
        hidden_size=512, num_attention_heads=4, memory_key_dim=64, memory_expansion=1, poly_rank=16,
        ttl_ns_evaluation=evaluation,
    )
    memory = AtlasMAGMemory(config)
    grads = memory.initial_state(2).map(torch.randn_like)
    counted = counted_matmul_flops(omega_update, memory.initial_state(2), grads, None, config)
    matrices = [weight.shape for weight in memory.weights().tensors() if weight.dim() == 2]
    expected = sum(
        2 * newton_schulz_flops(*shape, STEPS, newton_schulz_choice(*shape, STEPS, evaluation)) for shape in matrices
    )
    assert counted == expected
    if evaluation == "auto":
        assert {newton_schulz_choice(*shape, STEPS) for shape in matrices} == {"direct", "gram"}


def test_the_forced_form_is_saved_with_the_config(tmp_path):
    config = tiny_config(ttl_ns_evaluation="gram")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ttl_ns_evaluation"] == "gram"
    assert AtlasMAGConfig.from_pretrained(tmp_path).ttl_ns_evaluation == "gram"
    assert AtlasMAGConfig().ttl_ns_evaluation == "auto"


@pytest.mark.parametrize("shape", [(2, 6, 20), (2, 20, 6)], ids=str)
def test_the_gram_form_has_the_direct_forms_gradients(shape):
    """Backpropagation through TTL updates (`ttl_backprop_through_updates`) differentiates Newton–Schulz: the two
    forms' gradients agree (fp64)."""
    matrix = torch.randn(*shape, dtype=torch.float64)
    cotangent = torch.randn(*shape, dtype=torch.float64)

    def gradient(evaluation):
        leaf = matrix.clone().requires_grad_(True)
        (newton_schulz(leaf, STEPS, evaluation) * cotangent).sum().backward()
        return leaf.grad

    torch.testing.assert_close(gradient("gram"), gradient("direct"), rtol=1e-9, atol=1e-11)


def test_model_logits_match_the_direct_form():
    """A Muon model over several TTL chunks gives the same logits (fp32 rounding) whichever form runs."""
    ids = torch.randint(0, 97, (2, 18))
    logits = {}
    for evaluation in ("direct", "gram", "auto"):
        torch.manual_seed(0)
        model = AtlasMAGForCausalLM(tiny_config(ttl_ns_evaluation=evaluation)).eval()
        with torch.no_grad():
            logits[evaluation] = model(ids).logits
            if evaluation == "direct":
                ttl_off = model(ids, ttl=False).logits
    assert (logits["direct"] - ttl_off).abs().max() > 1e-2  # the updates show in the logits
    for evaluation in ("gram", "auto"):
        torch.testing.assert_close(logits[evaluation], logits["direct"], rtol=1e-5, atol=1e-5)
