"""Drop and grow as one top-k selection over scores.

Every method of the field reduces to these pure functions: a criterion (``scoring.py``) gives a score per entry,
``drop`` removes the ``n_drop`` lowest-scoring active entries and ``grow`` adds the ``n_grow`` highest-scoring
inactive ones. Row-wise variants serve SRigL's constant fan-in.
"""

from __future__ import annotations

import torch


def select_top(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` highest-scoring entries among ``candidates``.

    Args:
        scores: ``[*S]`` float scores.
        candidates: ``[*S]`` bool; only these may be selected.
        n: how many to select; must not exceed ``candidates.sum()``.

    Example:
        >>> select_top(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, True, False]), 1)
        tensor([ True, False, False])
    """
    if scores.shape != candidates.shape:
        raise ValueError(
            f"scores and candidates must share a shape, got {tuple(scores.shape)} and {tuple(candidates.shape)}"
        )
    selected = torch.zeros_like(candidates, dtype=torch.bool)
    if n <= 0:
        return selected
    flat_scores = scores.detach().reshape(-1)
    flat_candidates = candidates.reshape(-1)
    index = _candidate_index(flat_scores, flat_candidates, n)
    top = torch.topk(flat_scores[index].float(), n, sorted=False).indices
    selected.view(-1)[index[top]] = True
    return selected


_PREFILTER_MIN_SIZE = 1 << 16
_PREFILTER_SAMPLE = 8192


def _candidate_index(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a subset of ``candidates`` that surely holds their top ``n`` (exact, only faster).

    top-k over a million entries costs ~10 ms on a CPU core; most selections take a few percent of them. A
    threshold read off a strided sample keeps every candidate scoring at least that much; when that subset
    holds ``n`` or more entries it contains the top ``n`` (each of them scores at least the n-th best, which is
    at least the threshold). Otherwise all candidates are returned.
    """
    available = int(torch.count_nonzero(candidates))
    if n > available:
        raise ValueError(f"cannot select {n} entries from {available} candidates")
    if scores.numel() >= _PREFILTER_MIN_SIZE and 8 * n < available:
        stride = max(1, scores.numel() // _PREFILTER_SAMPLE)
        sample = scores[::stride][candidates[::stride]].float()
        if sample.numel() > 64:
            # aim for ~3n survivors: the (1 - 3n/available) quantile of the sample
            rank = max(1, min(sample.numel(), round(sample.numel() * (1.0 - 3.0 * n / available))))
            threshold = torch.kthvalue(sample, rank).values
            keep = candidates & (scores >= threshold)
            if int(torch.count_nonzero(keep)) >= n:
                return keep.nonzero().squeeze(1)
    return candidates.nonzero().squeeze(1)


def drop(mask: torch.Tensor, scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """``mask`` without its ``n_drop`` lowest-scoring active entries.

    Example:
        >>> drop(torch.tensor([True, True, False]), torch.tensor([0.5, -2.0, 9.0]), 1)
        tensor([ True, False, False])
    """
    return mask & ~select_top(-scores, mask, n_drop)


def grow(mask: torch.Tensor, scores: torch.Tensor, n_grow: int) -> torch.Tensor:
    """``mask`` plus its ``n_grow`` highest-scoring inactive entries.

    Example:
        >>> grow(torch.tensor([True, False, False]), torch.tensor([0.0, 1.0, 3.0]), 1)
        tensor([ True, False,  True])
    """
    return mask | select_top(scores, ~mask, n_grow)


def select_top_per_row(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise :func:`select_top`: row ``r`` selects its ``counts[r]`` best candidates.

    Args:
        scores: ``[R, C]`` float scores.
        candidates: ``[R, C]`` bool.
        counts: ``[R]`` int, ``0 <= counts[r] <= candidates[r].sum()``.

    Example:
        >>> select_top_per_row(torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]]),
        ...                    torch.ones(2, 3, dtype=torch.bool), torch.tensor([2, 1]))
        tensor([[False,  True,  True],
                [False, False,  True]])
    """
    if scores.dim() != 2 or scores.shape != candidates.shape or counts.shape != scores.shape[:1]:
        raise ValueError(
            f"expected scores/candidates [R, C] and counts [R], got {tuple(scores.shape)}, "
            f"{tuple(candidates.shape)}, {tuple(counts.shape)}"
        )
    available = candidates.sum(dim=1)
    if bool((counts > available).any()) or bool((counts < 0).any()):
        row = int(((counts > available) | (counts < 0)).nonzero()[0])
        raise ValueError(f"row {row}: cannot select {int(counts[row])} of {int(available[row])} candidates")
    masked = scores.detach().float().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < counts.unsqueeze(1)) & candidates
