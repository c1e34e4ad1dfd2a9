"""Masks learned through the straight-through estimator: Top-KAST, continuous sparsification, SR-STE
(sparseapps.core.learned_masks, run by the engine)."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, nm
from sparseapps.core.learned_masks import (
    exploration_loss,
    gate,
    gate_gradients,
    gate_loss,
    temperature,
    top_magnitude,
    topkast_gradient,
)

PRESETS = ("topkast", "cs", "sr_ste")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    return x, x[:, :4].argmax(1)


def config_of(name: str, **overrides: object) -> SparsityConfig:
    sparsity = {} if name == "sr_ste" else {"sparsity": 0.75}
    return SparsityConfig.preset(name, seed=0, **{**sparsity, **overrides})


def single_layer(weight: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
    return layer


def step_on_sum(model: nn.Module, optimizer: torch.optim.Optimizer, n_in: int) -> None:
    """One step of ``loss = sum(model(ones))``: the gradient at the forward weight is all ones."""
    optimizer.zero_grad()
    model(torch.ones(1, n_in)).sum().backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------- the gradients
class _SoftGate(torch.autograd.Function):
    """``theta * gate(s)`` whose backward is :func:`gate_gradients` (what the engine applies), for gradcheck."""

    @staticmethod
    def forward(ctx, theta, scores, beta, init):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(theta, scores)
        ctx.beta, ctx.init = beta, init
        return theta * gate(scores, beta, init)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        theta, scores = ctx.saved_tensors
        grad_theta, grad_scores = gate_gradients(grad, theta, scores, ctx.beta, ctx.init, 0.0)
        return grad_theta, grad_scores, None, None


@pytest.mark.parametrize(("beta", "init"), [(1.0, 0.0), (7.5, -0.01), (40.0, 0.05)])
def test_gate_gradients_pass_gradcheck_against_finite_differences(beta: float, init: float) -> None:
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    scores = (0.3 * torch.randn(3, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, s: _SoftGate.apply(t, s, beta, init), (theta, scores))


def test_gate_gradients_equal_autograd_of_loss_plus_penalty() -> None:
    generator = torch.Generator().manual_seed(2)
    theta = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    scores = (0.2 * torch.randn(5, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    beta, init, penalty = 3.0, -0.01, 0.7
    loss = (theta * gate(scores, beta, init) * upstream).sum() + gate_loss(scores, beta, penalty)
    expected_theta, expected_scores = torch.autograd.grad(loss, (theta, scores))
    got_theta, got_scores = gate_gradients(upstream, theta.detach(), scores.detach(), beta, init, penalty)
    torch.testing.assert_close(got_theta, expected_theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_scores, expected_scores, rtol=1e-12, atol=1e-12)


def test_exploration_gradient_equals_autograd_of_exploration_loss() -> None:
    generator = torch.Generator().manual_seed(3)
    theta = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    forward = top_magnitude(theta.detach(), 5)
    backward = top_magnitude(theta.detach(), 11)
    (expected,) = torch.autograd.grad(exploration_loss(theta, forward, backward, 0.3, 5 / 24), theta)
    got = topkast_gradient(torch.zeros_like(theta), theta.detach(), forward, backward, 0.3, 5 / 24)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: exploration_loss(t, forward, backward, 0.3, 5 / 24), (theta,))


def test_temperature_rises_exponentially_from_one_to_final() -> None:
    betas = [temperature(t, 5, 200.0) for t in range(5)]
    assert betas[0] == 1.0 and betas[-1] == pytest.approx(200.0)
    ratios = [b / a for a, b in itertools.pairwise(betas)]
    assert ratios == pytest.approx([200.0**0.25] * 4)


# ---------------------------------------------------------------------------------------------- Top-KAST
def test_topkast_forward_top_d_backward_top_d_plus_m_hand_computed() -> None:
    # theta = [4, -3, 0.5, 2, -1, 0.1], density 1/2: A = {0, 1, 3}; M = 1/6: B = A + {4}.
    layer = single_layer([4.0, -3.0, 0.5, 2.0, -1.0, 0.1])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    config = config_of("topkast", sparsity=0.5, backward_extra_density=1 / 6, exploration_penalty=0.5)
    engine = DynamicSparsity(layer, optimizer, config, total_steps=10)
    assert engine.masks["weight"].tolist() == [[True, True, False, True, False, False]]
    assert engine.learned is not None
    assert engine.learned.backward["weight"].tolist() == [[True, True, False, True, True, False]]
    assert layer.weight.tolist() == [[4.0, -3.0, 0.0, 2.0, 0.0, 0.0]]  # the forward uses theta * A
    step_on_sum(layer, optimizer, 6)
    # gradient: ones on B; penalty 0.5 * theta on A, 0.5 * theta / (1/2) on B \ A; nothing outside B:
    # [1 + 2, 1 - 1.5, 0, 1 + 1, 1 - 1, 0] -> theta - 0.1 * gradient
    assert layer.weight.grad is not None  # what the optimizer applied
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[3.0, -0.5, 0.0, 2.0, 0.0, 0.0]]))
    expected = torch.tensor([[3.7, -2.95, 0.5, 1.8, -1.0, 0.1]])
    torch.testing.assert_close(engine.learned.theta["weight"], expected)
    assert engine.masks["weight"].tolist() == [[True, True, False, True, False, False]]
    torch.testing.assert_close(layer.weight.detach(), expected * engine.masks["weight"])


def test_topkast_entries_outside_the_backward_set_never_move() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    engine = DynamicSparsity(model, optimizer, config_of("topkast", sparsity=0.9), total_steps=20)
    assert engine.learned is not None
    x, y = data()
    for _ in range(5):
        before = {fqn: t.clone() for fqn, t in engine.learned.theta.items()}
        backward = {fqn: m.clone() for fqn, m in engine.learned.backward.items()}
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for fqn, theta in engine.learned.theta.items():
            assert torch.equal(theta[~backward[fqn]], before[fqn][~backward[fqn]])
            budget = engine.tensors[fqn].budget
            assert torch.equal(engine.masks[fqn], top_magnitude(theta, budget))
            assert int(engine.masks[fqn].sum()) == budget


# ---------------------------------------------------------------------------------------------- SR-STE
def test_sr_ste_adds_the_sparse_refined_term_hand_computed() -> None:
    layer = single_layer([1.0, -3.0, 0.5, 2.0])  # 2:4 keeps positions 1 and 3
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    engine = DynamicSparsity(layer, optimizer, config_of("sr_ste", refine_decay=0.5), total_steps=10)
    assert engine.masks["weight"].tolist() == [[False, True, False, True]]
    step_on_sum(layer, optimizer, 4)
    # gradient: ones (straight through) + 0.5 * (1 - mask) * theta = [1.5, 1, 1.25, 1]
    assert engine.learned is not None
    torch.testing.assert_close(engine.learned.theta["weight"], torch.tensor([[0.85, -3.1, 0.375, 1.9]]))
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[0.0, -3.1, 0.0, 1.9]]))


def test_sr_ste_mask_follows_the_magnitudes_and_stays_n_m_every_step() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = DynamicSparsity(model, optimizer, config_of("sr_ste"), total_steps=30)
    assert engine.learned is not None
    x, y = data()
    changed = 0
    for _ in range(30):
        before = {fqn: m.clone() for fqn, m in engine.masks.items()}
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for fqn, mask in engine.masks.items():
            assert nm.is_n_m(mask, 2, 4)
            assert torch.equal(mask, nm.top_n_of_m(engine.learned.theta[fqn].abs(), 2, 4))
            changed += int((mask != before[fqn]).sum())
        for param, mask in engine.masked_parameters():
            assert bool((param[~mask] == 0).all())
    assert changed > 0  # masked entries keep learning through the STE and some come back


# ---------------------------------------------------------------------------------------------- continuous sparsification
def test_cs_gate_and_penalty_step_hand_computed() -> None:
    layer = single_layer([2.0, -1.0])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    config = config_of("cs", sparsity=0.5, gate_penalty=0.5, gate_temperature=200.0, gate_rounds=2)
    engine = DynamicSparsity(layer, optimizer, config, total_steps=30)  # rounds of 10 steps
    assert engine.learned is not None
    scores = engine.learned.scores["weight"]
    assert optimizer.param_groups[-1]["params"] == [scores]  # the gates are trained by the user's optimizer
    assert engine.masks["weight"].all()  # the search's forward is dense (soft gates)
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[2.0, -1.0]]))  # gate(s_0) = 1
    step_on_sum(layer, optimizer, 2)
    # beta = 1, sigma = 1/2, 1 / sigmoid(s_0) = 2: grad theta = 1 * 1/2 * 2 = 1;
    # grad s = (1 * theta * 2 + 0.5) * 1 * 1/4 = [1.125, -0.375]
    torch.testing.assert_close(engine.learned.theta["weight"], torch.tensor([[1.9, -1.1]]))
    torch.testing.assert_close(scores.detach(), torch.tensor([[-0.1125, 0.0375]]))
    beta = 200.0 ** (1 / 9)
    expected = torch.tensor([[1.9, -1.1]]) * torch.sigmoid(beta * scores.detach()) * 2
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_cs_rounds_reset_the_scores_then_take_the_ticket_and_rewind() -> None:
    torch.manual_seed(0)
    model = mlp()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = DynamicSparsity(model, optimizer, config_of("cs", gate_rounds=2), total_steps=30)
    assert engine.learned is not None
    x, y = data()

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(9):
        step()
    raw = {fqn: s.detach().clone() for fqn, s in engine.learned.scores.items()}
    step()  # the end of round 1: s <- min(beta * s, s_0) with beta = 200
    for fqn, scores in engine.learned.scores.items():
        s = scores.detach()
        assert float(s.max()) == 0.0  # the positive ones are capped at s_0 = 0
        assert float(raw[fqn].min()) < 0.0
        assert float(s.min()) < 100.0 * float(raw[fqn].min())  # the others scaled by beta = 200
    for _ in range(10):
        step()  # the end of round 2: the ticket, weights rewound
    assert engine.learned.natural_density is not None and 0.0 <= engine.learned.natural_density <= 1.0
    for fqn, t in engine.tensors.items():
        assert int(engine.masks[fqn].sum()) == t.budget
        torch.testing.assert_close(t.param.detach(), initial[fqn] * engine.masks[fqn])
    masks = {fqn: m.clone() for fqn, m in engine.masks.items()}
    for _ in range(10):
        step()
    for fqn, mask in engine.masks.items():
        assert torch.equal(mask, masks[fqn])
    for param, mask in engine.masked_parameters():
        assert bool((param[~mask] == 0).all())


# ---------------------------------------------------------------------------------------------- every preset
@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_a_tiny_mlp_and_its_loss_falls(name: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    total = 90
    engine = DynamicSparsity(model, optimizer, config_of(name), total_steps=total)
    x, y = data()
    losses = []
    for _ in range(total):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    engine.finalize()
    assert engine.density == pytest.approx(engine.config.density, abs=0.01)
    for param, mask in engine.masked_parameters():
        assert bool((param[~mask] == 0).all())
    with torch.no_grad():
        before = model(x)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # after finalize the masks stay and the weights stay masked
    for param, mask in engine.masked_parameters():
        assert bool((param[~mask] == 0).all())
    assert not torch.equal(before, model(x).detach())


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_round_trip_resumes_bit_for_bit(name: str) -> None:
    x, y = data()
    total, saved_at = 30, 8  # CS: rounds of 10 steps, so the resumed run crosses a round end and the ticket

    def build() -> tuple[nn.Module, torch.optim.Optimizer, DynamicSparsity]:
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return model, optimizer, DynamicSparsity(model, optimizer, config_of(name), total_steps=total)

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    torch.manual_seed(0)
    model, optimizer, engine = build()
    train(model, optimizer, saved_at)
    checkpoint = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "engine": engine.state_dict(),
    }
    checkpoint = {k: _deep_clone(v) for k, v in checkpoint.items()}
    train(model, optimizer, total - saved_at)

    torch.manual_seed(123)  # another initialization: everything must come from the checkpoint
    resumed_model, resumed_optimizer, resumed = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["engine"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed_model, resumed_optimizer, total - saved_at)

    for (name_a, a), (name_b, b) in zip(
        model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        assert name_a == name_b and torch.equal(a, b), name_a
    assert engine.learned is not None and resumed.learned is not None
    for fqn in engine.learned.theta:
        assert torch.equal(engine.learned.theta[fqn], resumed.learned.theta[fqn])
    for fqn in engine.learned.scores:
        assert torch.equal(engine.learned.scores[fqn], resumed.learned.scores[fqn])
    assert engine.learned.natural_density == resumed.learned.natural_density
    assert engine.step == resumed.step == total


def _deep_clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deep_clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_clone(v) for v in value]
    return value


def test_model_state_dict_keys_do_not_change() -> None:
    model = mlp()
    keys = set(model.state_dict())
    DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config_of("topkast"), total_steps=5)
    assert set(model.state_dict()) == keys | {"0.weight_mask", "2.weight_mask"}


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sparsity": 1.0}, "sparsity must be a finite number in [0, 1), got 1.0"),
        ({"sparsity": -0.1}, "sparsity must be a finite number in [0, 1), got -0.1"),
        (
            {"backward_extra_density": 1.5},
            "backward_extra_density must be a finite number in [0, 1], got 1.5",
        ),
        ({"exploration_penalty": -1.0}, "exploration_penalty must be a finite number >= 0, got -1.0"),
        ({"storage": "compact"}, "storage='compact' (the active weights only) cannot hold"),
        ({"embedding_rows": "looked_up"}, "got embedding_rows='looked_up'"),
        ({"rescale_initialization": True}, "rescale_initialization=True"),
    ],
)
def test_bad_topkast_configs_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=_escaped(message)):
        SparsityConfig.preset("topkast", **overrides)


def test_bad_cs_and_sr_ste_configs_are_refused() -> None:
    with pytest.raises(ValueError, match=_escaped("gate_temperature must be a finite number >= 1, got 0.5")):
        SparsityConfig.preset("cs", gate_temperature=0.5)
    with pytest.raises(ValueError, match=_escaped("gate_rounds must be an integer >= 1, got 0")):
        SparsityConfig.preset("cs", gate_rounds=0)
    with pytest.raises(ValueError, match=_escaped("sparsity 1 - n/m = 0.5, got sparsity=0.93")):
        SparsityConfig.preset("sr_ste", sparsity=0.93)  # no 1:m reaches it
    with pytest.raises(ValueError, match=_escaped("sparsity 1 - n/m = 0.5, got sparsity=0.9")):
        SparsityConfig.preset("sr_ste", sparsity=0.9, n_m=(2, 4))
    with pytest.raises(ValueError, match=_escaped("method 'sr_ste' keeps an N:M mask and needs n_m")):
        SparsityConfig(method="sr_ste", sparsity=0.5, grow="none")
    with pytest.raises(ValueError, match=_escaped("storage='compact'")):
        SparsityConfig.preset("sr_ste", storage="compact")


def test_sr_ste_preset_at_a_sparsity_runs_one_of_m() -> None:
    assert SparsityConfig.preset("sr_ste").n_m == (2, 4)
    assert SparsityConfig.preset("sr_ste", sparsity=0.5).n_m == (2, 4)
    assert SparsityConfig.preset("sr_ste", sparsity=0.9).n_m == (1, 10)
    assert SparsityConfig.preset("sr_ste", sparsity=0.75, n_m=(3, 12)).n_m == (3, 12)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DynamicSparsity(model, optimizer, config_of("sr_ste", sparsity=0.9), total_steps=5)
    assert all(nm.is_n_m(mask, 1, 10) for mask in engine.masks.values())


def test_engine_refuses_what_the_methods_cannot_run() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))  # fan-in 6: not a multiple of 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        DynamicSparsity(model, optimizer, config_of("sr_ste"), total_steps=5)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = {"0.weight": torch.ones(16, 8, dtype=torch.bool), "2.weight": torch.ones(4, 16, dtype=torch.bool)}
    with pytest.raises(ValueError, match="computes its own masks; got initial_masks"):
        DynamicSparsity(model, optimizer, config_of("topkast"), total_steps=5, initial_masks=masks)
    with pytest.raises(ValueError, match=_escaped("gate_rounds + 1 = 3 rounds, got total_steps=2")):
        DynamicSparsity(model, optimizer, config_of("cs"), total_steps=2)
    with pytest.raises(
        ValueError, match=_escaped("rewinds to a step of its first round (0 .. 9), got rewind_step=10")
    ):
        DynamicSparsity(model, optimizer, config_of("cs", rewind_step=10), total_steps=30)


def test_checkpoint_of_another_method_or_without_dense_weights_is_refused() -> None:
    model = mlp()
    engine = DynamicSparsity(
        model, torch.optim.SGD(model.parameters(), lr=0.1), config_of("topkast"), total_steps=5
    )
    state = engine.state_dict()
    del state["learned"]
    with pytest.raises(ValueError, match="resumes from its dense weights; the checkpoint has none"):
        engine.load_state_dict(state)
    assert engine.learned is not None
    with pytest.raises(ValueError, match="expected the learned-mask state of method 'topkast', got 'cs'"):
        engine.learned.load_state_dict({"method": "cs"}, 0)


def _escaped(text: str) -> str:
    return re.escape(text)


def test_gate_scale_makes_the_first_forward_dense() -> None:
    assert float(gate(torch.tensor(-0.01), 1.0, -0.01)) == pytest.approx(1.0)
    assert math.isclose(float(gate_loss(torch.zeros(3), 200.0, 2.0)), 3.0)
