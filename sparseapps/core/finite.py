"""The finite-gradient check of every optimizer step: a NaN or Inf is named at the step where it appears."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NonFiniteGradientError", "check_finite", "raise_if_non_finite"]


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds NaN or Inf at an optimizer step; the step was not taken (a ``ValueError`` too)."""


def check_finite(named_grads: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
    """Raises :class:`NonFiniteGradientError` naming the first gradient that holds NaN or Inf.

    A float32 sum per gradient is non-finite whenever the gradient is (NaN and Inf propagate; an overflow of
    finite values only triggers the exact check, which then finds nothing): measured at 0.6% of an MLP step
    (784-1024-1024-10, batch 256), against 19% for a max-abs ``_foreach_norm``. One synchronization per step; the
    exact per-entry check runs only when something is wrong.

    Example:
        >>> check_finite([("w", torch.ones(3))], step=1)
        >>> check_finite([("w", torch.tensor([1.0, float("nan")]))], step=2)
        Traceback (most recent call last):
        ...
        sparseapps.core.finite.NonFiniteGradientError: the gradient of 'w' holds 1 NaN and 0 Inf entries at step 2; ...
    """
    grads = [g.coalesce().values() if g.is_sparse else g for _, g in named_grads]
    if not grads:
        return
    sums = torch.stack(
        [(torch.view_as_real(g) if g.is_complex() else g).sum(dtype=torch.float32) for g in grads]
    )
    if bool(torch.isfinite(sums).all()):
        return
    for (name, _), grad in zip(named_grads, grads, strict=True):
        raise_if_non_finite(name, grad, step)


def raise_if_non_finite(name: str, grad: torch.Tensor, step: int) -> None:
    """Raises :class:`NonFiniteGradientError` if ``grad`` holds NaN or Inf, with their counts."""
    finite = torch.isfinite(grad)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(grad).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise NonFiniteGradientError(
        f"the gradient of {name!r} holds {n_nan} NaN and {n_inf} Inf entries at step {step}; the optimizer "
        "step was not taken, so the weights are still finite. Check the loss and the inputs for NaN/Inf, "
        "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_); "
        "DynamicSparsity(..., check_finite=False) turns this check off"
    )
