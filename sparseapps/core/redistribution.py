"""Budgets moved across tensors at a topology update: SNFS's momentum shares and DSR's global threshold.

Pure functions of masks, scores and counts. Both keep the total nnz over all tensors fixed and let each tensor's
own nnz change; the engine passes their counts to :func:`~sparseapps.core.rules.update_masks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparseapps.core import rules


def momentum_shares(total: int, weights: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """SNFS: ``total`` grown entries split in proportion to ``weights`` (mean momentum magnitudes), none above
    a tensor's ``capacity``; what a full tensor cannot take is split again among the others.

    Example:
        >>> momentum_shares(10, {"a": 3.0, "b": 1.0}, {"a": 5, "b": 100})
        {'a': 5, 'b': 5}
    """
    shares = {fqn: 0 for fqn in weights}
    remaining, open_fqns = total, {fqn for fqn in weights if capacity[fqn] > 0}
    while remaining > 0 and open_fqns:
        mass = sum(weights[f] for f in open_fqns) or float(len(open_fqns))
        ideal = {f: remaining * ((weights[f] / mass) if mass else 1.0 / len(open_fqns)) for f in open_fqns}
        if sum(weights[f] for f in open_fqns) == 0:
            ideal = {f: remaining / len(open_fqns) for f in open_fqns}
        placed = 0
        for fqn in sorted(open_fqns, key=lambda f: -(ideal[f] % 1)):
            amount = min(capacity[fqn] - shares[fqn], math.floor(ideal[fqn]))
            shares[fqn] += amount
            placed += amount
        leftover = remaining - placed
        for fqn in sorted(open_fqns, key=lambda f: -(ideal[f] % 1)):
            if leftover == 0:
                break
            if shares[fqn] < capacity[fqn]:
                shares[fqn] += 1
                leftover -= 1
        remaining = leftover
        open_fqns = {f for f in open_fqns if shares[f] < capacity[f]}
    return shares


def dsr_drop(
    masks: Mapping[str, torch.Tensor], magnitudes: Mapping[str, torch.Tensor], threshold: float
) -> dict[str, torch.Tensor]:
    """DSR's drop: every active entry with ``|w| <= threshold`` (one threshold for all tensors); a tensor keeps
    at least its largest weight.

    Example:
        >>> dsr_drop({"w": torch.tensor([True, True, True])}, {"w": torch.tensor([0.1, 0.5, 0.2])}, 0.3)
        {'w': tensor([False,  True, False])}
    """
    after_drop = {}
    for fqn, mask in masks.items():
        pruned = mask & (magnitudes[fqn] <= threshold)
        if not bool((mask & ~pruned).any()):  # never empty a tensor: keep its largest weight
            pruned &= ~rules.select_top(magnitudes[fqn].float(), mask, 1)
        after_drop[fqn] = mask & ~pruned
    return after_drop


def dsr_initial_threshold(
    masks: Mapping[str, torch.Tensor], magnitudes: Mapping[str, torch.Tensor], n: int
) -> float:
    """The magnitude of the ``n``-th smallest active weight over all tensors (0 when ``n`` is 0)."""
    if n == 0:
        return 0.0
    active = torch.cat([magnitudes[fqn][mask].float().cpu() for fqn, mask in masks.items()])
    return float(torch.kthvalue(active, max(n, 1)).values)


def dsr_next_threshold(threshold: float, n_pruned: int, target: int) -> float:
    """DSR's adaptation: double the threshold when under 90% of the target was pruned, halve it above 110%."""
    if n_pruned < 0.9 * target:
        return threshold * 2.0 if threshold > 0 else 1e-8
    if n_pruned > 1.1 * target:
        return threshold / 2.0
    return threshold


def proportional_shares(
    total: int, survivors: Mapping[str, int], capacity: Mapping[str, int]
) -> dict[str, int]:
    """DSR's regrowth: ``total`` split in proportion to each tensor's surviving nnz (largest remainders first),
    none above its ``capacity``.

    Example:
        >>> proportional_shares(5, {"a": 30, "b": 10}, {"a": 100, "b": 100})
        {'a': 4, 'b': 1}
    """
    all_survivors = sum(survivors.values())
    ideal = {fqn: total * survivors[fqn] / all_survivors for fqn in survivors}
    shares = {fqn: min(capacity[fqn], math.floor(v)) for fqn, v in ideal.items()}
    leftover = total - sum(shares.values())
    for fqn in sorted(ideal, key=lambda f: -(ideal[f] % 1)) * 2:
        while leftover > 0 and shares[fqn] < capacity[fqn]:
            shares[fqn] += 1
            leftover -= 1
    return shares
