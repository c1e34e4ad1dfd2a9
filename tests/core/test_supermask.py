"""edge-popup supermasks and the single-shared-weight evaluation (sparseapps.core.supermask)."""

from __future__ import annotations

import doctest
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import CondenseConfig, condense, supermask
from sparseapps.core.distributions import target_nnz
from sparseapps.core.supermask import (
    SupermaskLayer,
    edge_popup_optimizer,
    export,
    masks,
    shared_weight_accuracy,
    to_supermask,
    top_k_mask,
)


def mlp(n_in: int = 8, hidden: int = 16, n_out: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


def conv_net() -> nn.Sequential:
    """``[B, 2, 6, 6] -> [B, 3]`` through a Conv2d, a Conv1d (over the flattened rows) and a Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(2),  # [B, 4, 36]
        nn.Conv1d(4, 5, 3, stride=2, groups=1),
        nn.ReLU(),
        nn.Flatten(1),  # [B, 5 * 17]
        nn.Linear(5 * 17, 3),
    )


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> None:
    optimizer, scheduler = edge_popup_optimizer(model, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        scheduler.step()


def test_docstring_examples() -> None:
    result = doctest.testmod(supermask, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------ the STE gradient
# Finite differences cannot check this gradient: the top-k mask is piecewise constant in the scores, so a small
# perturbation of a score changes the loss by exactly 0 (or jumps when it crosses the k-th score). The
# straight-through estimator is a definition, dL/ds := dL/dmask = dL/dW_eff * W, so the tests compare it with
# that formula, with dL/dW_eff computed by hand (Linear) and by autograd through the exported dense layer (Conv).


def test_linear_scores_gradient_equals_hand_formula() -> None:
    layer = to_supermask(nn.Linear(5, 3), 0.4, seed=1)
    x, r = torch.randn(7, 5), torch.randn(7, 3)
    (layer(x) * r).sum().backward()  # L = sum(r * (x W_eff^T + b)), so dL/dW_eff = r^T x
    expected = (r.T @ x) * layer.weight
    torch.testing.assert_close(layer.scores.grad, expected)
    inactive = ~layer.mask()
    assert bool(inactive.any()) and bool(
        (layer.scores.grad[inactive] != 0).all()
    )  # dead weights get a signal


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_scores_gradient_equals_masked_weight_gradient_times_weight(kind: str) -> None:
    layer, x = {
        "conv1d": (nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(5, 3, 11)),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1, dilation=1), torch.randn(5, 3, 6, 6)),
        "linear": (nn.Linear(6, 4), torch.randn(5, 6)),
    }[kind]
    layer = to_supermask(layer, 0.3, seed=2)
    dense = layer.to_dense()  # its weight is W_eff = W * mask, a leaf: autograd gives dL/dW_eff
    target = torch.randn_like(dense(x))
    F.mse_loss(layer(x), target).backward()
    F.mse_loss(dense(x), target).backward()
    torch.testing.assert_close(layer.scores.grad, dense.weight.grad * layer.weight, rtol=1e-6, atol=1e-7)


def test_top_k_mask_passes_the_gradient_straight_through() -> None:
    scores = torch.tensor([0.5, -2.0, 1.0], requires_grad=True)
    (top_k_mask(scores, 1) * torch.tensor([3.0, 4.0, 5.0])).sum().backward()
    assert torch.equal(scores.grad, torch.tensor([3.0, 4.0, 5.0]))


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.3, 0.1])
def test_exactly_k_weights_active_per_layer(distribution: str, density: float) -> None:
    model = mlp()
    shapes = {
        f"{fqn}.weight": tuple(m.weight.shape) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    expected = target_nnz(shapes, density, distribution)
    model = to_supermask(model, density, distribution, seed=0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for _ in range(2):
        assert {fqn: int(mask.sum()) for fqn, mask in masks(model).items()} == expected
        train_steps(model, x, y, steps=5)  # the count holds after the scores move


def test_ties_go_to_the_lower_flat_position() -> None:
    layer = to_supermask(nn.Linear(4, 3), 0.5, seed=0)
    with torch.no_grad():
        layer.scores.fill_(0.25)  # every score tied
    expected = torch.arange(12).reshape(3, 4) < 6
    assert torch.equal(layer.mask(), expected)
    assert torch.equal(layer.mask(), expected)  # and again: deterministic
    with torch.no_grad():
        layer.scores[2, 3] = 1.0  # one score above the ties takes one of their places
    assert torch.equal(
        layer.mask(), (torch.arange(12).reshape(3, 4) < 5) | (torch.arange(12).reshape(3, 4) == 11)
    )


# ------------------------------------------------------------------------------------------ frozen weights
def test_weights_never_change_during_training() -> None:
    model = to_supermask(conv_net(), 0.5, seed=3)
    assert sorted(name for name, _ in model.named_parameters()) == ["0.scores", "3.scores", "6.scores"]
    frozen = {name: b.clone() for name, b in model.named_buffers()}
    scores = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = masks(model)
    x, y = torch.randn(64, 2, 6, 6), torch.randint(0, 3, (64,))
    train_steps(model, x, y, steps=30)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, frozen[name]), name  # bit for bit, weight decay and momentum included
    assert all(not torch.equal(p, scores[name]) for name, p in model.named_parameters())
    assert any(not torch.equal(mask, before[fqn]) for fqn, mask in masks(model).items())


# ------------------------------------------------------------------------------------------ it learns
def separable_task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 Gaussian features, the class is the largest of the first four (linearly separable, 4 classes)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1536, 8, generator=generator)
    y = x[:, :4].argmax(1)
    return x[:1024], y[:1024], x[1024:], y[1024:]


def test_edge_popup_learns_with_frozen_random_weights() -> None:
    x_train, y_train, x_test, y_test = separable_task()
    accuracy = lambda model: float((model(x_test).argmax(1) == y_test).float().mean())  # noqa: E731
    untrained = to_supermask(mlp(hidden=64), 0.5, seed=0)
    model = to_supermask(mlp(hidden=64), 0.5, seed=0)
    train_steps(model, x_train, y_train, steps=300)
    # Observed (seeds 0-3): trained 0.92-0.93, untrained (a random mask) 0.18-0.27; the threshold sits between.
    assert accuracy(untrained) < 0.5
    assert accuracy(model) > 0.75
    assert all(torch.equal(a, b) for a, b in zip(untrained.buffers(), model.buffers(), strict=True))


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("build", [mlp, conv_net])
def test_export_equals_the_supermask_model(build: type) -> None:
    model = to_supermask(build(), 0.3, "erk", seed=4)
    x = torch.randn(16, 8) if build is mlp else torch.randn(16, 2, 6, 6)
    train_steps(model, x, torch.randint(0, 3, (16,)), steps=10)
    dense = export(model)
    assert not any(isinstance(m, SupermaskLayer) for m in dense.modules())
    assert torch.equal(dense(x), model(x))
    for fqn, mask in masks(model).items():
        layer = dense.get_submodule(fqn.removesuffix(".weight"))
        assert torch.equal(
            layer.weight != 0, mask
        )  # masked entries exact zeros, active ones the frozen values
        assert torch.equal(layer.weight_mask, mask)  # the package's masked-layer form
    assert isinstance(model[0], SupermaskLayer)  # the original is untouched


def test_exported_model_condenses_to_the_same_outputs() -> None:
    model = to_supermask(mlp(), 0.2, seed=5)
    fast = condense(export(model), CondenseConfig(planner="cost_model"))
    x = torch.randn(9, 8)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_of_a_single_layer() -> None:
    layer = to_supermask(nn.Conv1d(2, 3, 3), 0.5, seed=0)
    assert isinstance(layer, SupermaskLayer)
    dense = export(layer)
    x = torch.randn(4, 2, 9)
    assert type(dense) is nn.Conv1d and torch.equal(dense(x), layer(x))


# ------------------------------------------------------------------------------------------ init and state
def test_inits_and_seeds() -> None:
    signed = to_supermask(nn.Linear(50, 40), 0.5, init="signed_constant", seed=0)
    assert torch.equal(signed.weight.abs().unique(), torch.tensor([math.sqrt(2 / 50)]))
    assert 0.4 < float((signed.weight > 0).float().mean()) < 0.6
    normal = to_supermask(nn.Linear(50, 40), 0.5, init="kaiming_normal", seed=0)
    assert abs(float(normal.weight.std()) - math.sqrt(2 / 50)) < 0.02
    scaled = to_supermask(nn.Linear(50, 40), 0.25, init="signed_constant", seed=0, scale_fan=True)
    torch.testing.assert_close(scaled.weight.abs().unique(), torch.tensor([math.sqrt(2 / (50 * 0.25))]))
    bound = 1 / math.sqrt(50)  # kaiming uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(signed.scores.detach().abs().max()) <= bound
    again = to_supermask(nn.Linear(50, 40), 0.5, init="signed_constant", seed=0)
    other = to_supermask(nn.Linear(50, 40), 0.5, init="signed_constant", seed=1)
    assert torch.equal(again.weight, signed.weight) and torch.equal(again.scores, signed.scores)
    assert not torch.equal(other.weight, signed.weight)
    biased = to_supermask(nn.Linear(3, 2), 1.0)
    assert torch.equal(biased.bias, torch.zeros(2)) and not biased.bias.requires_grad


def test_state_dict_round_trip() -> None:
    model = to_supermask(mlp(), 0.5, seed=0)
    x = torch.randn(32, 8)
    train_steps(model, x, torch.randint(0, 4, (32,)), steps=5)
    restored = to_supermask(mlp(), 0.5, seed=9)
    restored.load_state_dict(model.state_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(restored(x), model(x))


# ------------------------------------------------------------------------------------------ shared weight
def test_shared_weight_accuracy_sets_every_active_weight_to_w() -> None:
    model = to_supermask(mlp(), 0.5, seed=0)
    x, y = torch.randn(200, 8), torch.randint(0, 4, (200,))
    model.train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    result = shared_weight_accuracy(model, (x, y), weights=(-1.5, 0.5, 2.0), batch_size=64)
    for w, accuracy in zip(result.weights, result.accuracies, strict=True):
        by_hand = export(model)
        with torch.no_grad():
            for fqn, mask in masks(model).items():
                by_hand.get_parameter(fqn).copy_(w * mask.float())
        assert accuracy == int((by_hand(x).argmax(1) == y).sum()) / len(y)
    assert result.mean == pytest.approx(sum(result.accuracies) / 3)
    assert model.training and all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    # ReLU and zero biases: positively homogeneous, so only the sign of w matters
    assert result.accuracies[1] == result.accuracies[2]


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_density_outside_the_range_is_refused(density: float) -> None:
    with pytest.raises(ValueError, match=r"density must be a finite number in \(0, 1\]"):
        to_supermask(mlp(), density)


def test_unknown_names_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(
        ValueError, match="init must be one of 'signed_constant', 'kaiming_normal', got 'xavier'"
    ):
        to_supermask(mlp(), 0.5, init="xavier")
    with pytest.raises(ValueError, match="distribution must be one of 'uniform', 'erk', 'er', got 'erx'"):
        to_supermask(mlp(), 0.5, distribution="erx")


def test_models_without_supported_layers_are_refused() -> None:
    with pytest.raises(
        ValueError, match=re.escape("at least one nn.Linear, nn.Conv1d or nn.Conv2d, got none in Sequential")
    ):
        to_supermask(nn.Sequential(nn.ReLU(), nn.Embedding(4, 2)), 0.5)
    with pytest.raises(ValueError, match="padding_mode 'zeros', got 'reflect'"):
        to_supermask(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), 0.5)
    with pytest.raises(
        TypeError, match=re.escape("expected an nn.Linear, nn.Conv1d or nn.Conv2d, got Bilinear")
    ):
        SupermaskLayer(nn.Bilinear(2, 2, 2), 1, init="signed_constant", generator=torch.Generator())
    for function in (masks, export):
        with pytest.raises(ValueError, match="expected a model with supermask layers"):
            function(mlp())
    with pytest.raises(ValueError, match="expected a model with supermask layers"):
        shared_weight_accuracy(mlp(), (torch.randn(2, 8), torch.zeros(2, dtype=torch.long)))


def test_shared_weight_accuracy_refuses_bad_inputs() -> None:
    model = to_supermask(mlp(), 0.5)
    with pytest.raises(ValueError, match="as many targets as inputs"):
        shared_weight_accuracy(model, (torch.randn(3, 8), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="at least one shared weight"):
        shared_weight_accuracy(model, (torch.randn(3, 8), torch.zeros(3, dtype=torch.long)), weights=())
