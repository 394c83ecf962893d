"""The memory's analytic gradients and the Omega-rule update, against autograd and the reference doc's rule."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from reference_forward import memory as reference_memory
from reference_forward import newton_schulz as reference_newton_schulz

from atlas_mag import AtlasMAGForCausalLM, AtlasMAGMemory
from atlas_mag.ops_atlas import (
    StepRates,
    memory_forward,
    memory_loss_gradients,
    monomial_blocks,
    newton_schulz,
    newton_schulz_steps_grouped,
    omega_update,
)

MEMORY_VARIANTS = {
    "degree1": {"poly_degree": 1, "poly_rank": 8},
    "degree2": {},
    "degree3": {"poly_degree": 3, "memory_key_dim": 4, "poly_rank": 16},
    "taylor": {"feature_map": "taylor", "poly_degree": 3, "memory_key_dim": 4, "poly_rank": 16},
    "shallow": {"memory_depth": 0},
    "deep": {"memory_depth": 3, "memory_hidden_size": 12},
}


def random_state(config, batch=3):
    memory = AtlasMAGForCausalLM(config).model.layers[0].memory
    return memory.initial_state(batch).map(lambda initial: (initial.detach() + 0.3 * torch.randn_like(initial)))


def by_name(config, weights):
    """`weights` keyed by the memory layer's parameter names (those of the reference doc, less its w1/w2)."""
    memory = AtlasMAGMemory(config)
    name_of = {id(param): name for name, param in memory.named_parameters()}
    names = [name_of[id(weight)] for weight in memory.weights().tensors()]
    return dict(zip(names, weights.tensors(), strict=True))


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_the_memory_weights_are_every_parameter_of_the_layer(variant):
    """Test-time learning updates `weights()`: it must hold every parameter of the layer, each once (a
    parameter added or renamed without it would silently never learn)."""
    memory = AtlasMAGMemory(tiny_config(**MEMORY_VARIANTS[variant]))
    weights = memory.weights().tensors()
    assert len(weights) == len(list(memory.parameters()))
    assert {id(weight) for weight in weights} == {id(param) for param in memory.parameters()}


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_analytic_gradients_match_autograd(variant):
    # In float64, so that the two computations agree to far below any error in a formula.
    config = tiny_config(**MEMORY_VARIANTS[variant])
    state = random_state(config).map(torch.Tensor.double)
    queries = torch.randn(3, 11, config.hidden_size, dtype=torch.float64)
    targets = torch.randn(3, 11, config.hidden_size, dtype=torch.float64)
    weights = torch.rand(3, 11, dtype=torch.float64)
    weights[1, :4] = 0  # masked positions contribute nothing

    leaves = state.map(lambda value: value.clone().requires_grad_(True))
    output = memory_forward(leaves, queries, config).output
    losses = (weights * (output - targets).pow(2).sum(-1)).sum(-1)
    # Each sequence's gradient is that of its own loss: the sum over sequences separates them.
    expected = torch.autograd.grad(losses.sum(), leaves.tensors())

    with torch.inference_mode():
        analytic, analytic_losses = memory_loss_gradients(state, queries, targets, weights, config)
    assert torch.allclose(analytic_losses, losses.detach(), rtol=1e-10)
    for (name, got), grad in zip(by_name(config, analytic).items(), expected, strict=True):
        assert torch.allclose(got, grad, rtol=1e-8, atol=1e-10), name


def test_memory_forward_matches_reference_formula():
    config = tiny_config()
    state = random_state(config, batch=1)
    queries = torch.randn(1, 9, config.hidden_size)
    reference_names = {
        "proj_down.weight": "proj_down.weight",
        "poly_norm.weight": "poly_norm.weight",
        "poly_norm.bias": "poly_norm.bias",
        "poly_compress.weight": "poly_compress.weight",
        "w2.weight": "mlp.0.weight",
        "w1.weight": "mlp.1.weight",
        "proj_up.weight": "proj_up.weight",
        "output_norm.weight": "output_norm.weight",
        "output_norm.bias": "output_norm.bias",
        "output_scale": "output_scale",
    }
    named = by_name(config, state)
    sd = {ref: named[ours][0] for ref, ours in reference_names.items()}
    expected = reference_memory(queries[0], sd, "")
    assert torch.allclose(memory_forward(state, queries, config).output[0], expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
def test_newton_schulz_on_the_smaller_gram_side_equals_the_reference(shape):
    matrices = torch.randn(2, *shape, dtype=torch.float64)
    got = newton_schulz(matrices, 5)
    for i in range(2):
        assert torch.allclose(got[i], reference_newton_schulz(matrices[i], 5), atol=1e-10)


# One layer learning one chunk. Its updates are compared with the reference rule computed in fp32 at atol 1e-5: the
# direct Newton–Schulz holds that on the rank-deficient gradients of a 6-token chunk, while the Gram form's fp32
# error is larger there (test_newton_schulz.py bounds it against fp64).
ONE_CHUNK_MODEL = dict(num_hidden_layers=1, ttl_chunk_size=6, omega_window=8, ttl_ns_evaluation="direct")


def run_one_chunk(model, autocast_dtype=None):
    """Forward exactly one TTL chunk; return the learned memory of layer 0 and the inputs its update saw."""
    captured = {}
    memory_module = model.model.layers[0].memory
    original = memory_module.read_and_learn

    def capture(inputs, *args, **kwargs):
        captured.update(queries=inputs.queries, values=inputs.values, weights=inputs.token_weights)
        return original(inputs, *args, **kwargs)

    memory_module.read_and_learn = capture
    ids = torch.randint(0, model.config.vocab_size, (1, model.config.ttl_chunk_size))
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)):
        cache = model(ids, use_cache=True).cache
    return cache.memory_states()[0], captured


def test_one_chunk_applies_the_reference_omega_rule():
    """After exactly one chunk, the cached memory equals one step of the reference rule computed with autograd:
    S = g, W = alpha W - eta / (1 + ||g||) * NS(S) for matrices and S / ||S|| for vectors and the scalar."""
    config = tiny_config(**ONE_CHUNK_MODEL)
    model = AtlasMAGForCausalLM(config).eval()
    memory_module = model.model.layers[0].memory
    learned, captured = run_one_chunk(model)
    learned = by_name(config, learned)

    params = {name: p.detach().clone().requires_grad_(True) for name, p in memory_module.named_parameters()}
    ref_names = {"mlp.0.weight": "w2.weight", "mlp.1.weight": "w1.weight"}
    sd = {ref_names.get(name, name): value for name, value in params.items()}
    prediction = reference_memory(captured["queries"][0], sd, "")
    gamma = captured["weights"][0]
    loss = (gamma * (prediction - captured["values"][0]).pow(2).sum(-1)).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    for name, param in params.items():
        g = grads[name]
        lr = config.ttl_lr / (1 + g.norm())
        direction = reference_newton_schulz(g, config.ttl_ns_steps) if g.dim() == 2 else g / g.norm()
        expected = config.ttl_decay * param.detach() - lr * direction
        assert torch.allclose(learned[name][0], expected, atol=1e-5), name


def test_memory_output_uses_the_gelu_mlp_without_residual():
    config = tiny_config(memory_depth=1)
    state = random_state(config, batch=1)
    queries = torch.randn(1, 5, config.hidden_size)
    activations = memory_forward(state, queries, config, keep_activations=True).activations
    hidden = activations.layer_inputs[1]
    expected = F.gelu(hidden @ state.mlp[0][0].T) @ state.mlp[1][0].T
    assert torch.allclose(activations.memory_output[0], expected, atol=1e-6)


def test_memory_math_stays_fp32_under_autocast():
    """Under bf16 autocast the memory update equals the fp32 computation on the same inputs."""
    config = tiny_config(**ONE_CHUNK_MODEL)
    model = AtlasMAGForCausalLM(config).eval()
    learned, captured = run_one_chunk(model, autocast_dtype=torch.bfloat16)
    assert captured["queries"].dtype == torch.float32
    initial = model.model.layers[0].memory.initial_state(1)
    grads, _ = memory_loss_gradients(
        initial, captured["queries"], captured["values"], captured["weights"] / config.ttl_chunk_size, config
    )
    g = grads.poly_compress[0]
    lr = config.ttl_lr / (1 + g.norm())
    step = lr * reference_newton_schulz(g, config.ttl_ns_steps)
    expected = config.ttl_decay * initial.poly_compress[0] - step
    assert torch.allclose(learned.poly_compress[0], expected, atol=1e-5)


@pytest.mark.parametrize("adaptive_lr", [True, False])
def test_update_steps_follow_the_reference_rule_with_momentum(adaptive_lr):
    """A later step (momentum present) of every parameter, sequence by sequence, against the reference doc's
    rule: S = 0.9 S + g, step = eta / (1 + ||g||) * (NS(S) for matrices, S / ||S|| otherwise)."""
    config = tiny_config(ttl_adaptive_lr=adaptive_lr)
    state = random_state(config, batch=2).map(torch.Tensor.double)
    grads, momentum = state.map(torch.randn_like), state.map(torch.randn_like)
    updated, new_momentum, grad_norms = omega_update(state, grads, momentum, config)
    weights = zip(
        state.tensors(), grads.tensors(), momentum.tensors(), new_momentum.tensors(), updated.tensors(), strict=True
    )
    for index, (weight, grad, old_moment, new_moment, new_weight) in enumerate(weights):
        for row in range(2):
            g = grad[row]
            moment = config.ttl_momentum * old_moment[row] + g
            lr = config.ttl_lr / (1 + g.norm()) if adaptive_lr else config.ttl_lr
            direction = reference_newton_schulz(moment, config.ttl_ns_steps) if g.dim() == 2 else moment / moment.norm()
            torch.testing.assert_close(new_moment[row], moment, rtol=1e-12, atol=1e-12)
            expected = config.ttl_decay * weight[row] - lr * direction
            torch.testing.assert_close(new_weight[row], expected, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(grad_norms[row, index], g.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", ["muon", "gd"])
@pytest.mark.parametrize("adaptive_lr", [True, False])
def test_update_with_rates_per_sequence_is_each_sequence_updated_with_its_constants(optimizer, adaptive_lr):
    """Data-dependent rates (eta, theta, alpha per sequence) against the constant-rate update of each sequence
    alone with its rates as the config's constants."""
    config = tiny_config(memory_optimizer=optimizer, ttl_adaptive_lr=adaptive_lr)
    state = random_state(config, batch=3).map(torch.Tensor.double)
    grads, momentum = state.map(torch.randn_like), state.map(torch.randn_like)
    rates = StepRates(*torch.tensor([[0.02, 0.003, 0.05], [0.95, 0.3, 0.7], [0.999, 0.9, 0.5]], dtype=torch.float64))
    updated, new_momentum, grad_norms = omega_update(state, grads, momentum, config, rates)
    for row in range(3):
        alone = tiny_config(
            memory_optimizer=optimizer,
            ttl_adaptive_lr=adaptive_lr,
            ttl_lr=rates.lr[row].item(),
            ttl_momentum=rates.momentum[row].item(),
            ttl_decay=rates.decay[row].item(),
        )
        rows = slice(row, row + 1)
        expected = omega_update(*(part.map(lambda t, rows=rows: t[rows]) for part in (state, grads, momentum)), alone)
        for got, want in zip((updated, new_momentum), expected[:2], strict=True):
            for got_tensor, want_tensor in zip(got.tensors(), want.tensors(), strict=True):
                torch.testing.assert_close(got_tensor[row : row + 1], want_tensor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_norms[row : row + 1], expected[2], rtol=0, atol=0)


def test_plain_descent_follows_the_reference_rule_and_caps_runaway_steps():
    """Plain descent takes the reference rule's step eta / (1 + ||g||) * S while S is no longer than a steady
    stream of such gradients makes it; a momentum far longer than the current gradient (a gradient that has just
    shrunk after large ones, which made the memory diverge) gives a step of length eta / (1 - theta) at most."""
    config = tiny_config(memory_optimizer="gd")
    state = random_state(config, batch=2).map(torch.Tensor.double)
    grads = state.map(torch.randn_like)
    zeros = state.map(torch.zeros_like)  # weights of zero: the new weights are minus the steps
    updated, new_momentum, _ = omega_update(zeros, grads, grads.map(lambda grad: 0.5 * grad), config)
    steps = updated.map(torch.neg)
    for grad, new_moment, step in zip(grads.tensors(), new_momentum.tensors(), steps.tensors(), strict=True):
        for row in range(2):
            g, moment = grad[row], new_moment[row]
            torch.testing.assert_close(moment, 1.45 * g)
            torch.testing.assert_close(step[row], config.ttl_lr / (1 + g.norm()) * moment)

    grads = state.map(lambda value: 1e-3 * torch.randn_like(value))
    momentum = state.map(lambda value: 1e6 * torch.randn_like(value))
    updated, new_momentum, _ = omega_update(zeros, grads, momentum, config)
    steps = updated.map(torch.neg)
    longest = config.ttl_lr / (1 - config.ttl_momentum)
    for new_moment, step in zip(new_momentum.tensors(), steps.tensors(), strict=True):
        for row in range(2):
            moment = new_moment[row]
            torch.testing.assert_close(step[row], longest * moment / moment.norm())
            assert step[row].norm() <= longest * (1 + 1e-12)


def test_update_steps_are_differentiable():
    """Backpropagation through updates differentiates the whole step (momentum, norms, Newton–Schulz, learning
    rates): autograd against finite differences, for a matrix, a vector and the scalar."""
    config = tiny_config()
    state = random_state(config, batch=2).map(torch.Tensor.double)
    grads, momentum = state.map(torch.randn_like), state.map(torch.randn_like)

    def update_steps(proj_down, output_norm_bias, output_scale):
        changed = replace(grads, proj_down=proj_down, output_norm_bias=output_norm_bias, output_scale=output_scale)
        updated, new_momentum, _ = omega_update(state, changed, momentum, config)
        return updated.proj_down, updated.output_norm_bias, updated.output_scale, new_momentum.proj_down

    varied = (grads.proj_down, grads.output_norm_bias, grads.output_scale)
    assert torch.autograd.gradcheck(update_steps, tuple(grad.clone().requires_grad_(True) for grad in varied))


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_monomial_blocks_are_the_combinations_with_replacement(degree):
    """The feature order the config docstring documents (and degree 2 = the reference's triu order)."""
    u = torch.randn(2, 3, 5, dtype=torch.float64)
    blocks = monomial_blocks(u, degree)
    assert len(blocks) == degree
    for block_degree, block in enumerate(blocks, start=1):
        tuples = torch.combinations(torch.arange(5), r=block_degree, with_replacement=True)
        assert torch.allclose(block, u[..., tuples.reshape(-1, block_degree)].prod(-1), rtol=1e-14, atol=0)
    if degree == 2:
        rows, cols = torch.triu_indices(5, 5)
        assert torch.allclose(blocks[1], u[..., rows] * u[..., cols], rtol=1e-14, atol=0)


@pytest.mark.parametrize("evaluation", ["direct", "gram"])
def test_grouped_newton_schulz_steps_equal_one_call_per_matrix(evaluation):
    """Matrices whose smaller Gram side has the same shape share one batched call; each result is
    decay * weight - rate * newton_schulz(matrix) of its own call (a [8, 4] matrix joins the [4, 8] ones through
    its transpose), with the decay and the rate folded into the last product."""
    torch.manual_seed(0)
    shapes = [(2, 4, 8), (2, 8, 4), (2, 4, 8), (2, 3, 3)]  # down, up, mlp, a square one
    matrices = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    weights = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    rates = [torch.rand(2, dtype=torch.float64) for _ in shapes]
    grouped = newton_schulz_steps_grouped(weights, matrices, rates, 0.9, 5, evaluation)
    assert len(grouped) == len(matrices)
    for got, weight, matrix, rate in zip(grouped, weights, matrices, rates, strict=True):
        assert got.shape == matrix.shape
        expected = 0.9 * weight - rate[:, None, None] * newton_schulz(matrix, 5, evaluation)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


class PlainRecurrentModel(torch.nn.Module):
    """A plain PyTorch model with the Atlas memory as one of its layers (no Transformers model around it)."""

    def __init__(self, config):
        super().__init__()
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.to_query = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.to_value = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.memory = AtlasMAGMemory(config)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, ids, state=None, first_position=0, ttl=True):
        hidden = self.embed(ids)
        read, state = self.memory(self.to_query(hidden), self.to_value(hidden), state, first_position, ttl)
        return self.head(hidden + read), state


def test_the_memory_layer_learns_at_test_time_inside_a_plain_pytorch_model():
    """Under inference_mode, with TTL on: the output differs from TTL off once a chunk has been learned, calls
    chained through the returned state equal one call over the whole input (the same updates at the same
    positions), and the layer's parameters never change."""
    config = tiny_config()
    model = PlainRecurrentModel(config).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, config.vocab_size, (2, 15))
    with torch.inference_mode():
        whole, _ = model(ids)
        off, _ = model(ids, ttl=False)
        first, state = model(ids[:, :6])
        second, state = model(ids[:, 6:], state, first_position=6)
    chunk = config.ttl_chunk_size
    torch.testing.assert_close(whole[:, :chunk], off[:, :chunk], rtol=0, atol=0)  # nothing learned yet
    assert (whole[:, chunk:] - off[:, chunk:]).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    assert state.memory.proj_down.shape[0] == 2  # one learned memory per sequence
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
