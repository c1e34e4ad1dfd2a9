"""Pruning criteria of the second wave: first-order Taylor, movement and Optimal Brain Damage.

Each criterion is a pure function of tensors; the ones the engine can feed today are registered in the score
registry (:mod:`sparseapps.core.scores`) when this module is imported (``sparseapps.core.config`` imports it, so
every :class:`~sparseapps.core.SparsityConfig` sees them):

- ``taylor`` (drop): ``|w * m|`` with ``m`` the engine's exponential average of dense gradients (decay
  ``config.momentum``), the first-order Taylor estimate of the loss change when ``w`` is removed, averaged over
  recent mini-batches (Molchanov et al. 2017, "Pruning convolutional neural networks for resource efficient
  inference", per weight instead of per feature map). It reads ``"momentum"``, which the engine tracks every step,
  so it also drives the dense-to-sparse schedules (preset ``taylor``: GMP's cubic schedule). The single-batch
  ``|w * g|`` is the built-in ``weight_gradient``; averaging first makes the estimate less noisy, but near a
  minimum ``E[g]`` tends to zero and the first-order term says little (the reason OBD uses the second order).

Two read a trace the engine updates every step from the dense gradient (``scores.TRACES``; masked storage, all
rows), with the pure updates here:

- ``movement`` (drop; preset ``movement``, hard movement pruning on GMP's cubic schedule): movement (Sanh et al. 2020, "Movement pruning"): ``S = -sum_t g_t * w_t`` over the steps so far
  (:func:`accumulate_movement_`); the score is ``S`` itself: weights moving away from zero are kept.
- ``obd`` (drop; preset ``obd``, on GMP's schedule): Optimal Brain Damage (LeCun et al. 1990) with the diagonal
  empirical Fisher as the Hessian:
  ``0.5 * F_ii * w_i**2`` (:func:`obd_scores`), ``F`` averaged from squared gradients
  (:func:`accumulate_squared_gradient_`), or computed from per-example gradients on a batch
  (:func:`empirical_fisher_diagonal`); the exact Hessian diagonal is estimated by :func:`hutchinson_diagonal`.
  Averaged over mini-batches, Molchanov et al. 2019's per-weight Taylor score ``(g * w)**2`` ranks exactly as OBD
  with this Fisher does.

Example:
    >>> import torch
    >>> from sparseapps.core import SparsityConfig
    >>> SparsityConfig.preset("taylor", sparsity=0.9).drop
    'taylor'
    >>> obd_scores(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([4.0, 1.0, 0.0]))
    tensor([2., 2., 0.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sparseapps.core import scores, scoring

__all__ = [
    "DORMANT_TAU",
    "accumulate_magnitude_",
    "accumulate_movement_",
    "accumulate_squared_gradient_",
    "dormant_outputs",
    "empirical_fisher_diagonal",
    "hutchinson_diagonal",
    "obd_scores",
    "record_last_magnitude_",
]


# ---------------------------------------------------------------------------------------------- registered
@scores.register_drop("taylor", needs=("momentum",))
def _taylor(ctx: scores.ScoreContext) -> torch.Tensor:
    """Molchanov et al. 2017, per weight: ``|w * m|``, ``m`` the averaged dense gradient."""
    if ctx.momentum is None:
        raise RuntimeError(f"{ctx.fqn!r}: the taylor criterion needs 'momentum', which was not collected")
    return scoring.weight_gradient(ctx.weight, ctx.momentum)


@scores.register_drop("movement", needs=("movement",))
def _movement(ctx: scores.ScoreContext) -> torch.Tensor:
    """Sanh et al. 2020: ``S = -sum_t g_t * w_t``; weights moving toward zero are dropped first."""
    if ctx.movement is None:
        raise RuntimeError(f"{ctx.fqn!r}: the movement criterion needs 'movement', which was not collected")
    return ctx.movement.float()


@scores.register_drop("obd", needs=("grad_squared",))
def _obd(ctx: scores.ScoreContext) -> torch.Tensor:
    """LeCun et al. 1990 with the diagonal empirical Fisher: ``0.5 * E[g * g] * w * w``."""
    if ctx.grad_squared is None:
        raise RuntimeError(f"{ctx.fqn!r}: the obd criterion needs 'grad_squared', which was not collected")
    return obd_scores(ctx.weight, ctx.grad_squared)


@scores.register_drop("momentum_magnitude", needs=("magnitude_average",))
def _momentum_magnitude(ctx: scores.ScoreContext) -> torch.Tensor:
    """Momentum-based pruning: ``|w|`` averaged over recent steps (decay ``momentum``), so a weight that is small
    only now is not dropped before one that stayed small. The survey's layer-importance factor ``W_l / W_avg``
    multiplies a whole tensor, so it changes nothing under per-tensor budgets (every preset here) and is left out."""
    if ctx.magnitude_average is None:
        raise RuntimeError(
            f"{ctx.fqn!r}: the momentum_magnitude criterion needs 'magnitude_average', which was not collected"
        )
    return ctx.magnitude_average.float()


@scores.register_grow("fisher", needs=("grad_squared",))
def _fisher(ctx: scores.ScoreContext) -> torch.Tensor:
    """Second-order growth: the diagonal empirical Fisher ``E[g * g]`` (decay ``momentum``) of the inactive
    entries, the curvature an entry's loss would have if it were grown (OBD's Hessian estimate, read for growth)."""
    if ctx.grad_squared is None:
        raise RuntimeError(f"{ctx.fqn!r}: the fisher criterion needs 'grad_squared', which was not collected")
    return ctx.grad_squared.float()


@scores.register_grow("last_magnitude", needs=("last_magnitude",))
def _last_magnitude(ctx: scores.ScoreContext) -> torch.Tensor:
    """Magnitude-based regrowth: entries pruned at earlier updates come back in order of the magnitude they had when
    last active. Entries active now (the ones this update may drop) and never-active ones score 0 (ties broken at
    random by the tie noise): otherwise every entry dropped by this update would outscore the rest and be grown back
    at once, undoing the update."""
    if ctx.last_magnitude is None:
        raise RuntimeError(
            f"{ctx.fqn!r}: the last_magnitude criterion needs 'last_magnitude', which was not collected"
        )
    return torch.where(ctx.mask, 0.0, ctx.last_magnitude.float())


#: ReDo's dormancy threshold (Sokar et al. 2023): a neuron whose mean |activation| is at most this share of its
#: layer's mean is dormant (the same value as ``sparseapps.rl.diagnostics.DORMANT_TAU``).
DORMANT_TAU = 0.025


def dormant_outputs(outputs: torch.Tensor, tau: float = DORMANT_TAU) -> torch.Tensor:
    """``[B, out, *spatial] -> [out]`` bool: output neurons whose mean ``|relu(z)|`` (over the batch and spatial
    positions) is at most ``tau`` times the layer's mean, ReDo's test on the activation that follows the layer
    (ReLU assumed: a neuron whose pre-activation stays negative is dead there).

    Example:
        >>> dormant_outputs(torch.tensor([[1.0, -2.0, 3.0], [2.0, -1.0, 1.0]])).tolist()
        [False, True, False]
    """
    activity = outputs.detach().float().clamp(min=0.0).transpose(0, 1).reshape(outputs.shape[1], -1).mean(1)
    return activity / (activity.mean() + 1e-9) <= tau


@scores.register_grow("dormant_gradient", needs=("grad", "activations"))
def _dormant_gradient(ctx: scores.ScoreContext) -> torch.Tensor:
    """Dormant-aware growth (issue 19's criterion, after ReDo): connections into output neurons ReDo would call
    dormant (:func:`dormant_outputs` on the layer's outputs of the step before the update) rank before all others,
    each group by ``|g|``; a dead neuron's row has zero gradient, so its new inputs are drawn by the tie noise."""
    if ctx.activations is None:
        raise RuntimeError(
            f"no activations were captured for {ctx.fqn!r}: dormant_gradient growth needs a forward pass through "
            "the layer in the step before each update"
        )
    if ctx.grad is None:
        raise RuntimeError(
            f"{ctx.fqn!r}: the dormant_gradient criterion needs 'grad', which was not collected"
        )
    scores_ = ctx.grad.abs().float()
    dormant = dormant_outputs(ctx.activations[1]).to(scores_.device)
    if dormant.shape[0] != scores_.shape[0]:
        raise ValueError(
            f"{ctx.fqn!r}: {dormant.shape[0]} output neurons in the activations, {scores_.shape[0]} weight rows"
        )
    bonus = float(scores_.max()) if scores_.numel() and float(scores_.max()) > 0 else 1.0
    return scores_ + bonus * dormant.reshape(-1, *([1] * (scores_.dim() - 1))).float()


# ---------------------------------------------------------------------------------------------- accumulators
def accumulate_movement_(total: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Movement pruning's score after one more step: ``total -= grad * weight`` in place, returned.

    Sanh et al. 2020 keep the weights with the largest ``S = -sum_t (dL/dW)_t * W_t``: weights that training
    pushes away from zero. Call it once per optimizer step, before the step, with the dense gradient (inactive
    entries included: through the straight-through estimator they receive the dense gradient too).

    Args:
        total: ``[*S]`` float, the accumulated score (start from zeros); updated in place.
        weight: ``[*S]`` the weights of the step.
        grad: ``[*S]`` their dense gradient.

    Example:
        >>> total = torch.zeros(3)
        >>> accumulate_movement_(total, torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-0.5, -0.5, 0.0]))
        tensor([ 0.5000, -0.5000,  0.0000])
    """
    return total.addcmul_(grad.detach().to(total.dtype), weight.detach().to(total.dtype), value=-1.0)


def accumulate_magnitude_(average: torch.Tensor, weight: torch.Tensor, decay: float) -> torch.Tensor:
    """The exponential average of weight magnitudes, ``average = decay * average + (1 - decay) * |w|`` (in place).

    Example:
        >>> accumulate_magnitude_(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 3.0]), 0.5)
        tensor([1.5000, 1.5000])
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    return average.mul_(decay).add_(weight.detach().abs().to(average.dtype), alpha=1.0 - decay)


def record_last_magnitude_(last: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``last = |w|`` where ``mask`` (the active entries), unchanged elsewhere (in place).

    Example:
        >>> record_last_magnitude_(torch.tensor([0.5, 0.7]), torch.tensor([-2.0, 0.0]), torch.tensor([True, False]))
        tensor([2.0000, 0.7000])
    """
    return last.copy_(torch.where(mask, weight.detach().abs().to(last.dtype), last))


def accumulate_squared_gradient_(average: torch.Tensor, grad: torch.Tensor, decay: float) -> torch.Tensor:
    """The exponential average of squared gradients, ``average = decay * average + (1 - decay) * grad**2``.

    The diagonal of the empirical Fisher as an optimizer would see it: from mini-batch gradients (which estimate
    ``E[g]**2 + Var[g] / B`` per entry; :func:`empirical_fisher_diagonal` averages per-example gradients instead).

    Args:
        average: ``[*S]`` float, updated in place and returned.
        grad: ``[*S]`` the step's dense gradient.
        decay: in ``[0, 1)``; 0 keeps only the last step.

    Example:
        >>> accumulate_squared_gradient_(torch.tensor([1.0, 0.0]), torch.tensor([2.0, -3.0]), 0.5)
        tensor([2.5000, 4.5000])
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    return average.mul_(decay).addcmul_(grad.detach(), grad.detach(), value=1.0 - decay)


# ---------------------------------------------------------------------------------------------- scores
def obd_scores(weight: torch.Tensor, hessian_diagonal: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage's saliency ``0.5 * H_ii * w_i**2``: the loss increase of removing ``w_i`` alone.

    LeCun et al. 1990 assume a trained network (zero gradient) and a diagonal Hessian; ``hessian_diagonal`` may be
    the exact diagonal (:func:`hutchinson_diagonal`) or the diagonal empirical Fisher
    (:func:`empirical_fisher_diagonal`, :func:`accumulate_squared_gradient_`).

    Args:
        weight: ``[*S]`` the weights.
        hessian_diagonal: ``[*S]`` the Hessian's (or Fisher's) diagonal entries of those weights.

    Returns:
        ``[*S]`` float32 scores, higher means more worth keeping.
    """
    if weight.shape != hessian_diagonal.shape:
        raise ValueError(
            f"hessian_diagonal must have the weight's shape {tuple(weight.shape)}, got {tuple(hessian_diagonal.shape)}"
        )
    w = weight.detach().float()
    return 0.5 * hessian_diagonal.detach().float() * w * w


# ---------------------------------------------------------------------------------------------- estimators
def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal of the empirical Fisher, ``F_ii = 1/N sum_n (dl_n / dw_i)**2``, over one batch.

    ``l_n`` is example ``n``'s loss, ``loss_fn(model(x_n[None]), y_n[None])``; the per-example gradients come
    from one vectorized pass (``torch.func.vmap`` of ``torch.func.grad``), which holds ``N`` (or ``chunk_size``)
    copies of the named parameters' gradients at once. Buffers are read, not updated: put a model with BatchNorm in
    eval mode first (a batch of one has no batch statistics).

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs [1, ...], targets [1, ...]) -> scalar``, e.g. ``F.cross_entropy``.
        inputs: ``[N, ...]`` examples.
        targets: ``[N, ...]`` their targets.
        names: fqns of the parameters to estimate (``model.named_parameters()`` names).
        chunk_size: examples per vectorized chunk (``None``: all at once), to bound the memory.

    Returns:
        ``{name: [*S_name]}`` float32, one tensor per named parameter.
    """
    from torch.func import functional_call, grad, vmap

    parameters = dict(model.named_parameters())
    unknown = [name for name in names if name not in parameters]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; expected names of model.named_parameters()")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"expected as many targets as inputs (at least one), got {len(inputs)} inputs, {len(targets)} targets"
        )
    chosen = {name: parameters[name].detach() for name in names}
    fixed = {name: p.detach() for name, p in parameters.items() if name not in chosen}
    buffers = dict(model.named_buffers())

    def example_loss(values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, ({**fixed, **values}, buffers), (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(
        chosen, inputs, targets
    )
    return {name: g.float().pow(2).mean(0) for name, g in per_example.items()}


def hutchinson_diagonal(
    loss: Callable[[], torch.Tensor],
    parameters: Sequence[torch.Tensor],
    probes: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal, ``diag(H) ~ mean_k z_k * (H z_k)``, ``z_k`` Rademacher.

    Unbiased; each probe costs one Hessian-vector product (a double backward). Off-diagonal entries add variance
    that falls as ``1 / probes``.

    Args:
        loss: a closure returning the scalar loss (evaluated once, its graph kept for the products).
        parameters: the tensors (``requires_grad``) whose diagonal blocks are estimated.
        probes: Rademacher vectors to average (>= 1).
        generator: a CPU generator (reproducible probes).

    Returns:
        one ``[*S]`` float32 tensor per parameter.
    """
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    parameters = list(parameters)
    grads = torch.autograd.grad(loss(), parameters, create_graph=True)
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
    for probe in range(probes):
        z = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device)
            for p in parameters
        ]
        products = torch.autograd.grad(grads, parameters, grad_outputs=z, retain_graph=probe < probes - 1)
        for total, zi, hz in zip(totals, z, products, strict=True):
            total.add_((zi * hz).float())
    return [total / probes for total in totals]
