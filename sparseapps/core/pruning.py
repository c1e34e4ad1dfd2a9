"""Dense-to-sparse baselines on the engine's public commit path: GMP, one-shot, lottery ticket, SNIP/GraSP/SynFlow.

These methods start dense (or score once at initialization) and only ever remove entries; each computes new masks
and hands them to :meth:`DynamicSparsity.commit`, which zeroes the dropped weights, fixes the optimizer state and
records the step, exactly as a drop/grow update does. The engine calls :func:`prune_by_schedule` on the pruning
steps of GMP and one-shot; :func:`next_lottery_round` and :func:`prune_at_initialization` are the engine's
methods of the same names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparseapps.core import rules, schedules, scoring
from sparseapps.core.config import FORESIGHT_METHODS

if TYPE_CHECKING:
    from sparseapps.core.engine import DynamicSparsity


def _prune_to(
    engine: DynamicSparsity, targets: Mapping[str, int], keep_scores: Mapping[str, torch.Tensor]
) -> None:
    new_masks = {}
    for fqn, t in engine.tensors.items():
        nnz = int(torch.count_nonzero(t.mask))
        n_drop = max(nnz - targets[fqn], 0)
        new_masks[fqn] = rules.drop(t.mask, keep_scores[fqn], n_drop) if n_drop else t.mask.clone()
    engine.commit(new_masks, 0.0)


def prune_by_schedule(engine: DynamicSparsity) -> None:
    if engine.calibration is not None:  # obs / sparsegpt: their own one-shot step (calibration.py)
        engine.calibration.prune(engine)
        return
    targets = {}
    for fqn, t in engine.tensors.items():
        final_sparsity = 1.0 - t.budget / t.numel
        if engine.config.method == "one_shot":
            targets[fqn] = t.budget
        else:
            sparsity = schedules.gmp_sparsity(engine.step, final_sparsity, engine.config, engine.total_steps)
            targets[fqn] = max(t.budget, round((1.0 - sparsity) * t.numel))
    _prune_to(engine, targets, engine.drop_scores())


def next_lottery_round(engine: DynamicSparsity) -> float:
    """:meth:`DynamicSparsity.next_lottery_round <sparseapps.core.DynamicSparsity.next_lottery_round>`."""
    if engine.config.method != "lottery":
        raise RuntimeError(f"next_lottery_round needs method 'lottery', got {engine.config.method!r}")
    if engine.lottery_round >= engine.config.lottery_rounds:
        raise RuntimeError(f"all {engine.config.lottery_rounds} lottery rounds are done")
    if engine.lottery_snapshot is None:
        raise RuntimeError(
            f"no weights to rewind to: training stopped before rewind_step={engine.config.rewind_step}"
        )
    engine.lottery_round += 1
    progress = engine.lottery_round / engine.config.lottery_rounds
    targets = {
        fqn: max(t.budget, round(t.numel * (t.budget / t.numel) ** progress))
        for fqn, t in engine.tensors.items()
    }
    _prune_to(engine, targets, {fqn: scoring.magnitude(t.param) for fqn, t in engine.tensors.items()})
    with torch.no_grad():
        for name, param in engine.model.named_parameters():
            if name in engine.lottery_snapshot:
                param.copy_(engine.lottery_snapshot[name])
    engine.apply_masks()
    engine.optimizer.state.clear()
    engine.step = 0
    return engine.density


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name (the lottery ticket's rewind point)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def prune_at_initialization(
    engine: DynamicSparsity,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """:meth:`DynamicSparsity.prune_at_initialization <sparseapps.core.DynamicSparsity.prune_at_initialization>`."""
    method = engine.config.method
    if method not in FORESIGHT_METHODS:
        raise RuntimeError(f"prune_at_initialization needs one of {FORESIGHT_METHODS}, got {method!r}")
    if method in ("snip", "grasp") and (targets is None or loss_fn is None):
        raise ValueError(f"{method} needs targets and loss_fn, got targets={targets!r}, loss_fn={loss_fn!r}")
    budget = sum(t.budget for t in engine.tensors.values())
    params = [t.param for t in engine.tensors.values()]
    was_training = engine.model.training
    if method == "snip":
        grads = torch.autograd.grad(loss_fn(engine.model(inputs), targets), params)  # type: ignore[misc]
        keep = {
            fqn: scoring.weight_gradient(t.param, g)
            for (fqn, t), g in zip(engine.tensors.items(), grads, strict=True)
        }
        _keep_global_top(engine, keep, budget)
    elif method == "grasp":
        loss = loss_fn(engine.model(inputs), targets)  # type: ignore[misc]
        detached = torch.autograd.grad(loss, params)
        loss = loss_fn(engine.model(inputs), targets)  # type: ignore[misc]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        z = sum((g * d).sum() for g, d in zip(grads, detached, strict=True))
        hessian_grad = torch.autograd.grad(z, params)
        # GraSP removes the largest -w * Hg; keeping the largest w * Hg is the same choice.
        keep = {
            fqn: (t.param.detach() * hg).float()
            for (fqn, t), hg in zip(engine.tensors.items(), hessian_grad, strict=True)
        }
        _keep_global_top(engine, keep, budget)
    else:
        _synflow(engine, inputs, budget)
    engine.model.train(was_training)
    engine.foresight_done = True


def _keep_global_top(engine: DynamicSparsity, keep_scores: Mapping[str, torch.Tensor], budget: int) -> None:
    flat = torch.cat([s.reshape(-1).cpu() for s in keep_scores.values()])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("non-finite scores at initialization (check the loss and the inputs)")
    flat = scoring.add_tie_noise(flat, engine.config.tie_noise, engine.generator)
    chosen = rules.select_top(flat, torch.ones_like(flat, dtype=torch.bool), budget)
    new_masks, offset = {}, 0
    for fqn, t in engine.tensors.items():
        new_masks[fqn] = chosen[offset : offset + t.numel].reshape(t.mask.shape).to(t.mask.device)
        offset += t.numel
    collapsed = [fqn for fqn, m in new_masks.items() if not bool(m.any())]
    if collapsed:
        warnings.warn(
            f"{engine.config.method}: layers left empty (layer collapse): {collapsed}", stacklevel=3
        )
    engine.commit(new_masks, 0.0)


def _synflow(engine: DynamicSparsity, inputs: torch.Tensor, budget: int) -> None:
    engine.model.eval()
    signs = {}
    with torch.no_grad():
        for name, p in engine.model.state_dict().items():
            if p.is_floating_point():
                signs[name] = torch.sign(p)
                p.abs_()
    ones = torch.ones(
        (1, *inputs.shape[1:]),
        dtype=inputs.dtype if inputs.is_floating_point() else torch.float32,
        device=inputs.device,
    )
    total = sum(t.numel for t in engine.tensors.values())
    n = engine.config.foresight_iterations
    for iteration in range(1, n + 1):
        params = [t.param for t in engine.tensors.values()]
        score = torch.autograd.grad(engine.model(ones).sum(), params)
        keep = {
            fqn: scoring.weight_gradient(t.param, g).masked_fill(~t.mask, -1.0)
            for (fqn, t), g in zip(engine.tensors.items(), score, strict=True)
        }
        step_budget = round(total * (budget / total) ** (iteration / n))
        _keep_global_top(engine, keep, max(step_budget, budget))
    with torch.no_grad():
        for name, p in engine.model.state_dict().items():
            if name in signs:
                p.mul_(signs[name])
    engine.apply_masks()
