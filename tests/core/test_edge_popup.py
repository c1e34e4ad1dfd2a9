"""Edge-popup on the engine (preset ``edge_popup``): frozen signed-constant weights, scores trained straight through
the top-k, the mask the top of |scores| per tensor."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.learned_masks import top_magnitude


def _engine(lr: float = 0.1) -> DynamicSparsity:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, weight_decay=1e-3
    )  # no momentum: one step checkable
    return DynamicSparsity(model, optimizer, SparsityConfig.preset("edge_popup", sparsity=0.5, seed=0), 40)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x, y)] * 40


def test_one_step_moves_the_scores_straight_through_and_never_the_weights() -> None:
    engine = _engine()
    model, theta0 = engine.model, {f: t.clone() for f, t in engine.learned.theta.items()}
    for theta in theta0.values():
        assert torch.equal(theta.abs(), torch.full_like(theta, math.sqrt(2.0 / theta.shape[1])))
    scores0 = {f: s.detach().clone() for f, s in engine.learned.scores.items()}
    x, y = _data()[0]
    engine.optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {f: t.param.grad.clone() for f, t in engine.tensors.items()}  # dL/dW at W = theta * mask
    engine.optimizer.step()
    for fqn, t in engine.tensors.items():
        # straight through the top-k of |scores|; the scores' group has no weight decay
        expected = scores0[fqn] - 0.1 * grads[fqn] * theta0[fqn] * scores0[fqn].sign()
        torch.testing.assert_close(engine.learned.scores[fqn].detach(), expected)
        assert torch.equal(engine.learned.theta[fqn], theta0[fqn])
        assert torch.equal(t.mask, top_magnitude(engine.learned.scores[fqn].detach(), t.budget))
        assert torch.equal(t.param.detach(), theta0[fqn] * t.mask)


def test_the_scores_learn_the_task_with_the_weights_frozen() -> None:
    engine = _engine()
    losses = []
    for x, y in _data():
        engine.optimizer.zero_grad()
        loss = F.cross_entropy(engine.model(x), y)
        loss.backward()
        engine.optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert all(int(t.mask.sum()) == t.budget for t in engine.tensors.values())


def test_resume_is_bit_for_bit() -> None:
    data = _data()
    straight = _engine()
    for x, y in data:
        straight.optimizer.zero_grad()
        F.cross_entropy(straight.model(x), y).backward()
        straight.optimizer.step()
    first = _engine()
    for x, y in data[:15]:
        first.optimizer.zero_grad()
        F.cross_entropy(first.model(x), y).backward()
        first.optimizer.step()
    saved = copy.deepcopy((first.model.state_dict(), first.state_dict(), first.optimizer.state_dict()))
    resumed = _engine()
    resumed.model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    resumed.optimizer.load_state_dict(saved[2])
    for x, y in data[15:]:
        resumed.optimizer.zero_grad()
        F.cross_entropy(resumed.model(x), y).backward()
        resumed.optimizer.step()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
