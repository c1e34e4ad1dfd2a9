"""Soft movement pruning (preset ``soft_movement``): straight-through score gradients, one global threshold on the
scores following GMP's cubic schedule, masked weights kept and revived, bitwise resume."""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, schedules
from sparseapps.core.learned_masks import soft_movement_gradients

STEPS = 60


def _run(
    steps: int = STEPS, engine_state: dict | None = None
) -> tuple[DynamicSparsity, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    config = SparsityConfig.preset("soft_movement", sparsity=0.8, seed=0)
    engine = DynamicSparsity(model, optimizer, config, total_steps=STEPS)
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(STEPS)
    ]
    masks = []
    for x, y in data[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        masks.append({fqn: m.clone() for fqn, m in engine.masks.items()})
    return engine, masks


def test_score_gradient_is_the_straight_through_one_plus_the_penalty() -> None:
    torch.manual_seed(0)
    theta, scores = torch.randn(4, 5), torch.randn(4, 5).requires_grad_()
    mask, x = scores.detach() > 0, torch.randn(3, 5)
    # autograd: the forward uses theta * mask, the mask passes the gradient straight through to the scores
    straight = mask.float() + scores - scores.detach()
    weight = (theta * straight).requires_grad_()
    loss = (x @ weight.T).pow(2).sum() + 0.5 * torch.sigmoid(scores).sum()
    loss.backward()
    out = (x @ (theta * mask).T).requires_grad_()
    grad_at_weight = torch.autograd.grad(out.pow(2).sum(), out)[0].T @ x  # dL/dW at W = theta * mask
    grad_theta, grad_scores = soft_movement_gradients(grad_at_weight, theta, mask, scores.detach(), 0.5)
    torch.testing.assert_close(grad_scores, scores.grad)
    torch.testing.assert_close(grad_theta, grad_at_weight * mask)


def test_density_follows_the_cubic_schedule_with_learned_per_tensor_sparsity() -> None:
    engine, masks = _run()
    config, total = engine.config, sum(t.numel for t in engine.tensors.values())
    for step in (1, 6, 20, 35, 45, 60):
        kept = sum(int(m.sum()) for m in masks[step - 1].values())
        expected = max(
            round(total * (1 - schedules.gmp_sparsity(step, 0.8, config, STEPS))), round(0.2 * total)
        )
        assert abs(kept - expected) <= 1, (step, kept, expected)  # budgets round per tensor
    final = {fqn: float(m.float().mean()) for fqn, m in masks[-1].items()}
    assert (
        len({round(d, 3) for d in final.values()}) > 1
    )  # one global threshold: the tensors' densities differ
    assert abs(sum(int(m.sum()) for m in masks[-1].values()) - 0.2 * total) <= 1


def test_masked_weights_keep_their_values_and_can_come_back() -> None:
    engine, masks = _run()
    revived = 0
    for before, after in itertools.pairwise(masks):
        revived += sum(int((~before[f] & after[f]).sum()) for f in before)
    assert revived > 0  # the threshold moves: scores that rise again bring their weights back
    for fqn, t in engine.tensors.items():
        theta = engine.learned.theta[fqn]
        assert bool((theta[~t.mask] != 0).any())  # kept behind the mask
        assert torch.equal(t.param.detach(), theta * t.mask)  # the forward weight


def test_resume_in_the_middle_of_the_schedule_is_bit_for_bit() -> None:
    straight, _ = _run()
    half, _ = _run(steps=30)
    saved = copy.deepcopy((half.model.state_dict(), half.state_dict(), half.optimizer.state_dict()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = DynamicSparsity(
        model, optimizer, SparsityConfig.preset("soft_movement", sparsity=0.8, seed=0), STEPS
    )
    model.load_state_dict(saved[0])
    engine.load_state_dict(saved[1])
    optimizer.load_state_dict(saved[2])
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(STEPS)
    ]
    for x, y in data[30:]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for a, b in zip(straight.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for fqn in engine.tensors:
        assert torch.equal(engine.learned.scores[fqn], straight.learned.scores[fqn])
