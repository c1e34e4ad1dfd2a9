"""Optimal Brain Surgeon with a block-diagonal Fisher: the exact answer on a quadratic, the inverse, the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, obs, rules


def test_obs_update_is_the_exact_constrained_minimizer_of_a_quadratic() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    hessian = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    optimum = torch.randn(6, generator=g, dtype=torch.float64)
    removed = torch.tensor([True, False, False, True, False, False])
    got = obs.obs_update(optimum, torch.linalg.inv(hessian), removed)
    # minimize 0.5 (w - w*)^T H (w - w*) with w_Q = 0: w_F = w*_F + H_FF^-1 H_FQ w*_Q
    free = ~removed
    expected = torch.zeros(6, dtype=torch.float64)
    h_ff, h_fq = hessian[free][:, free], hessian[free][:, removed]
    expected[free] = optimum[free] + torch.linalg.solve(h_ff, h_fq @ optimum[removed])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # and the saliency of removing one weight alone is the loss increase OBS predicts
    h_inv = torch.linalg.inv(hessian)
    single = torch.tensor([False, False, True, False, False, False])
    w = obs.obs_update(optimum, h_inv, single)
    loss = 0.5 * (w - optimum) @ hessian @ (w - optimum)
    torch.testing.assert_close(
        loss.float(), obs.obs_saliency(optimum, h_inv.diagonal())[2], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("examples", [3, 40])
def test_block_inverse_fisher_by_woodbury_and_directly(examples: int) -> None:
    grads = torch.randn(examples, 12, generator=torch.Generator().manual_seed(examples))
    got = obs.block_inverse_fisher(grads, 1e-2)
    fisher = grads.double().T @ grads.double() / examples + 1e-2 * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(got.double(), torch.linalg.inv(fisher), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="damp"):
        obs.block_inverse_fisher(grads, 0.0)


def _trained_engine() -> tuple[DynamicSparsity, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    config = SparsityConfig.preset("one_shot", sparsity=0.8, seed=0)
    return DynamicSparsity(model, optimizer, config, total_steps=1000), x, y


def test_engine_prune_reaches_the_budgets_and_beats_magnitude_on_the_calibration_loss() -> None:
    engine, x, y = _trained_engine()
    magnitude = copy.deepcopy(engine)
    removed = obs.prune(engine, x, y, F.cross_entropy, block_size=16, damp=1e-3)
    for fqn, t in engine.tensors.items():
        assert int(t.mask.sum()) == t.budget and removed[fqn] > 0
        assert bool((t.param[~t.mask] == 0).all())
    assert len(engine.history) == 1
    masks = {fqn: t.mask for fqn, t in magnitude.tensors.items()}
    counts = {fqn: int(m.sum()) - magnitude.tensors[fqn].budget for fqn, m in masks.items()}
    new, _ = rules.update_masks(
        masks,
        {f: t.param.abs() for f, t in magnitude.tensors.items()},
        {f: torch.zeros_like(m, dtype=torch.float32) for f, m in masks.items()},
        counts,
        n_grow={f: 0 for f in masks},
    )
    magnitude.commit(new, 0.0)
    magnitude.apply_masks()
    with torch.no_grad():
        loss_obs = float(F.cross_entropy(engine.model(x), y))
        loss_magnitude = float(F.cross_entropy(magnitude.model(x), y))
    assert loss_obs < loss_magnitude


def test_engine_prune_refuses_what_it_cannot_do() -> None:
    engine, x, y = _trained_engine()
    with pytest.raises(ValueError, match="targets"):
        obs.prune(engine, x, y[:3], F.cross_entropy)
    with pytest.raises(ValueError, match="fewer than its budget"):
        obs.prune(
            engine, x, y, F.cross_entropy, budgets={fqn: t.numel + 1 for fqn, t in engine.tensors.items()}
        )
