"""Optimal Brain Surgeon with a block-diagonal inverse Fisher (WoodFisher), one shot, through the engine.

OBS (Hassibi & Stork 1993) removes weights by their saliency ``rho_q = w_q**2 / (2 [H^-1]_qq)`` and moves the
surviving weights to compensate: for a removed set ``Q``, ``dw = -H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q``, the exact
minimizer of the local quadratic model subject to ``w_Q = 0``. WoodFisher (Singh & Alistarh 2020) makes it scale
by taking ``H`` as the empirical Fisher ``F = G^T G / N + damp * I`` of ``N`` per-example gradients, restricted to
blocks of ``block_size`` consecutive weights (row-major), each inverted on its own (by Woodbury when ``N`` is
smaller than the block).

:func:`prune` takes one engine tensor set to its budgets in one shot: saliencies over the active entries, the
lowest ``nnz - budget`` removed per tensor, the OBS update applied per block with the removed and the already
inactive entries as constraints (so inactive weights stay exactly zero), then the new masks committed through the
engine (optimizer state of removed entries cleared as for any topology change).

Example:
    >>> import torch
    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])            # the Hessian of 0.5 (w - w*)^T H (w - w*)
    >>> w = torch.tensor([1.0, 1.0])                           # at its minimum w* = (1, 1)
    >>> obs_update(w, torch.linalg.inv(h), torch.tensor([True, False]))   # remove w_0, best w_1 given w_0 = 0
    tensor([0.0000, 1.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from sparseapps.core import rules
from sparseapps.core.selection import SparseTensor

if TYPE_CHECKING:
    from sparseapps.core.engine import DynamicSparsity

__all__ = ["block_inverse_fisher", "obs_saliency", "obs_update", "prune", "prune_from_gradients"]


def block_inverse_fisher(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """``(G^T G / N + damp I)^-1`` for per-example gradients ``G [N, B]`` (Woodbury when ``N < B``).

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> block_inverse_fisher(g, 0.5)                      # F = diag(0.5 + 0.5, 2 + 0.5)
        tensor([[1.0000, 0.0000],
                [0.0000, 0.4000]])
    """
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise ValueError(f"expected per-example gradients [N >= 1, B], got {tuple(grads.shape)}")
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")
    g = grads.double()
    n, b = g.shape
    if n < b:
        # (damp I + G^T G / n)^-1 = (I - G^T (n damp I + G G^T)^-1 G) / damp
        small = torch.linalg.solve(n * damp * torch.eye(n, dtype=g.dtype) + g @ g.T, g)
        inverse = (torch.eye(b, dtype=g.dtype) - g.T @ small) / damp
    else:
        inverse = torch.linalg.inv(g.T @ g / n + damp * torch.eye(b, dtype=g.dtype))
    return inverse.float()


def obs_saliency(weight: torch.Tensor, inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """``w**2 / (2 [H^-1]_qq)``: the loss increase of removing each weight alone, the others re-fitted."""
    return weight.detach().float().pow(2) / (2.0 * inverse_diagonal.float())


def obs_update(weight: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The block's weights after removing ``removed`` (``[B]`` bool) with the OBS correction of the others.

    Args:
        weight: ``[B]`` the block's weights.
        inverse: ``[B, B]`` the block's inverse Hessian (or Fisher).
        removed: ``[B]`` bool, the entries forced to zero.

    Returns:
        ``[B]`` new weights: ``w - H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q``, exactly zero on ``Q``.
    """
    out = weight.detach().clone()
    if not bool(removed.any()):
        return out
    index = removed.nonzero().squeeze(1)
    w = weight.detach().double()
    h_inv = inverse.double()
    correction = h_inv[:, index] @ torch.linalg.solve(h_inv[index][:, index], w[index])
    out = (w - correction).to(weight.dtype)
    out[index] = 0
    return out


def _per_example_gradients(
    engine: DynamicSparsity,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None,
) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    model = engine.model
    parameters = dict(model.named_parameters())
    chosen = {fqn: t.param.detach() for fqn, t in engine.tensors.items()}
    fixed = {name: p.detach() for name, p in parameters.items() if name not in chosen}
    buffers = dict(model.named_buffers())

    def example_loss(values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(
            functional_call(model, ({**fixed, **values}, buffers), (x.unsqueeze(0),)), y.unsqueeze(0)
        )

    return vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(chosen, inputs, targets)


def prune(
    engine: DynamicSparsity,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    block_size: int = 64,
    damp: float = 1e-4,
    chunk_size: int | None = None,
    budgets: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Prunes every sparse tensor of ``engine`` to its budget in one shot by OBS with a block-diagonal Fisher.

    Args:
        engine: a masked-storage engine (its weights are dense tensors: the update moves survivors).
        inputs, targets: the calibration batch ``[N, ...]`` for the per-example gradients.
        loss_fn: ``loss_fn(outputs [1, ...], targets [1, ...]) -> scalar`` per example, e.g. ``F.cross_entropy``.
        block_size: consecutive weights (row-major) per Fisher block; memory ``numel * block_size`` floats.
        damp: the dampening added to the Fisher's diagonal.
        chunk_size: examples per vectorized gradient chunk (``None``: the whole batch at once).
        budgets: ``{fqn: nnz}`` to prune to instead of the engine's budgets.

    Returns:
        ``{fqn: removed}`` entries removed per tensor.

    Raises:
        ValueError: compact storage, a tensor whose budget is above its active entries, bad sizes.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"expected as many targets as inputs (at least one), got {len(inputs)} and {len(targets)}"
        )
    _check_masked(engine)
    grads = _per_example_gradients(engine, loss_fn, inputs, targets, chunk_size)
    return prune_from_gradients(engine, grads, block_size=block_size, damp=damp, budgets=budgets)


def _check_masked(engine: DynamicSparsity) -> None:
    if any(not isinstance(t, SparseTensor) for t in engine.tensors.values()):
        raise ValueError("OBS moves the surviving weights of a dense weight tensor: use storage='masked'")


def prune_from_gradients(
    engine: DynamicSparsity,
    grads: Mapping[str, torch.Tensor],
    *,
    block_size: int = 64,
    damp: float = 1e-4,
    budgets: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """:func:`prune` from given gradients ``{fqn: [N, *shape]}`` (per example, or per mini-batch as the ``obs``
    preset collects them: the Fisher's scale does not change the choice or the update, only its ratio to ``damp``).

    Returns:
        ``{fqn: removed}`` entries removed per tensor.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_masked(engine)
    missing = sorted(set(engine.tensors) - set(grads))
    if missing:
        raise ValueError(f"expected gradients of every sparse tensor, missing {missing}")
    goal = {fqn: t.budget for fqn, t in engine.tensors.items()} if budgets is None else dict(budgets)
    new_masks, removed_counts = {}, {}
    with torch.no_grad():
        for fqn, t in engine.tensors.items():
            mask = t.mask.reshape(-1)
            nnz = int(mask.sum())
            n_remove = nnz - int(goal[fqn])
            if n_remove < 0:
                raise ValueError(f"{fqn!r} has {nnz} active weights, fewer than its budget {goal[fqn]}")
            weight = t.param.detach().reshape(-1).clone()
            g = grads[fqn].reshape(len(grads[fqn]), -1)
            if g.shape[1] != weight.numel():
                raise ValueError(
                    f"gradients of {fqn!r} have {g.shape[1]} entries per row, the weight {weight.numel()}"
                )
            starts = range(0, weight.numel(), block_size)
            inverses = [block_inverse_fisher(g[:, s : s + block_size], damp) for s in starts]
            diagonal = torch.cat([inverse.diagonal() for inverse in inverses])
            saliency = obs_saliency(weight, diagonal)
            removed = rules.select_top(saliency, mask, n_remove, largest=False)
            constrained = removed | ~mask
            for start, inverse in zip(starts, inverses, strict=True):
                block = slice(start, start + block_size)
                if bool(removed[block].any()):
                    weight[block] = obs_update(weight[block], inverse, constrained[block])
            t.param.copy_(weight.view_as(t.param))
            new_masks[fqn] = (mask & ~removed).view_as(t.mask)
            removed_counts[fqn] = n_remove
    engine.commit(new_masks, 0.0)
    engine.apply_masks()
    return removed_counts
