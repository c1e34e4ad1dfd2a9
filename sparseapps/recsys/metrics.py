"""Full-ranking evaluation: every item is scored, seen items are excluded, top-K metrics are averaged over users.

For each evaluated user the items are ranked by score after removing the excluded ones (train items for
validation; train and validation items for test). With ``hit_r = 1`` when the item at rank ``r`` is held out,
``T`` the user's held-out items and ``K`` the cut-off:

- ``recall@K = sum_{r<=K} hit_r / |T|``
- ``precision@K = sum_{r<=K} hit_r / K``
- ``hit@K = 1`` if any ``hit_r`` for ``r <= K``
- ``mrr@K = 1 / (first r <= K with hit_r)``, 0 when none
- ``ndcg@K = DCG / IDCG`` with ``DCG = sum_{r<=K} hit_r / log2(r + 1)`` and ``IDCG = sum_{r<=min(|T|, K)} 1 / log2(r + 1)``

These are RecBole's definitions. Users without held-out items are skipped; the reported value is the mean over
the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from sparseapps.core.validation import check_int
from sparseapps.recsys.data import InteractionSplit, UserItemLists

METRICS = ("recall", "ndcg", "hit", "precision", "mrr")
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]


def _check_ks(ks: Sequence[int], limit: int, limit_name: str = "the number of items") -> tuple[int, ...]:
    if isinstance(ks, int) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    for k in ks:
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise ValueError(f"each K must be a positive integer, got {k!r}")
        if k > limit:
            raise ValueError(f"K must be at most {limit_name} ({limit}), got {k}")
    return tuple(int(k) for k in ks)


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str) or len(metrics) == 0:
        raise ValueError(
            f"metrics must be a non-empty sequence drawn from {', '.join(METRICS)}, got {metrics!r}"
        )
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(METRICS)}")
    return tuple(metrics)


def ranking_metrics(
    hits: torch.Tensor,
    n_targets: torch.Tensor,
    ks: Sequence[int],
    metrics: Sequence[str] = METRICS,
) -> dict[str, torch.Tensor]:
    """Per-user metrics from the hit pattern of each user's top list.

    Args:
        hits: ``[U, K_max]`` bool, ``hits[u, r]`` whether the item ranked ``r + 1`` for user ``u`` is held out.
        n_targets: ``[U]`` number of held-out items of each user (``>= 1``).
        ks: cut-offs, each ``<= K_max``.
        metrics: names from :data:`METRICS`.

    Returns:
        ``{"recall@10": [U] float64, ...}`` for every metric and K.

    Example:
        >>> hits = torch.tensor([[False, True, True]])
        >>> values = ranking_metrics(hits, torch.tensor([4]), ks=[2])
        >>> values["recall@2"].item(), values["mrr@2"].item(), values["precision@2"].item()
        (0.25, 0.5, 0.5)
    """
    if hits.dim() != 2 or hits.dtype != torch.bool:
        raise ValueError(f"hits must be a [U, K] bool tensor, got {hits.dtype} of shape {tuple(hits.shape)}")
    if n_targets.shape != hits.shape[:1]:
        raise ValueError(f"n_targets must have shape [{hits.shape[0]}], got {tuple(n_targets.shape)}")
    if bool((n_targets < 1).any()):
        raise ValueError("every user passed to ranking_metrics needs at least one held-out item")
    ks = _check_ks(ks, hits.shape[1], "the length of the top lists")
    metrics = _check_metrics(metrics)
    hit = hits.to(torch.float64)
    n_targets = n_targets.to(device=hits.device, dtype=torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    discount = 1.0 / torch.log2(ranks + 1.0)
    cumulative_hits = hit.cumsum(dim=1)
    dcg = (hit * discount).cumsum(dim=1)
    ideal = discount.cumsum(dim=0)
    first = torch.where(hits.any(dim=1), hits.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0, torch.inf)
    values: dict[str, torch.Tensor] = {}
    for k in ks:
        found = cumulative_hits[:, k - 1]
        for name in metrics:
            if name == "recall":
                value = found / n_targets
            elif name == "precision":
                value = found / k
            elif name == "hit":
                value = (found > 0).to(torch.float64)
            elif name == "mrr":
                value = torch.where(first <= k, 1.0 / first, torch.zeros_like(first))
            else:
                best = torch.clamp(n_targets, max=k).to(torch.long) - 1
                value = dcg[:, k - 1] / ideal[best]
            values[f"{name}@{k}"] = value
    return values


def evaluate_ranking(
    score_fn: ScoreFunction,
    targets: UserItemLists,
    exclude: UserItemLists | None = None,
    *,
    ks: Sequence[int] = (10, 20),
    metrics: Sequence[str] = METRICS,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean top-K metrics over all users with held-out items, ranking all items.

    Ties in scores are ordered as ``torch.topk`` orders them.

    Args:
        score_fn: ``users [B] int64 -> scores [B, I]``; higher is better. Called under ``torch.no_grad()``; its
            output is not modified.
        targets: each user's held-out items.
        exclude: each user's items never ranked (seen items), or ``None``.
        ks: cut-offs (default 10 and 20); each must be at most ``I``.
        metrics: names from :data:`METRICS` (default all).
        batch_size: users scored per call of ``score_fn``.
        device: where the user ids are sent (the scores' device is used for the rest).

    Returns:
        ``{"recall@10": value, ...}``, plus ``"n_users"``: how many users were evaluated.

    Raises:
        ValueError: a K above the number of items or below 1, unknown metric, scores of the wrong shape or with
            NaN, ``targets`` and ``exclude`` of different sizes, or no user with held-out items.

    Example:
        >>> targets = UserItemLists.from_pairs(np.array([[0, 2]]), n_users=1, n_items=3)
        >>> evaluate_ranking(lambda users: torch.tensor([[0.1, 0.2, 0.9]]), targets, ks=[1], metrics=["hit"])
        {'hit@1': 1.0, 'n_users': 1.0}
    """
    n_users, n_items = targets.n_users, targets.n_items
    ks = _check_ks(ks, n_items)
    metrics = _check_metrics(metrics)
    check_int("batch_size", batch_size, low=1)
    if exclude is not None and (exclude.n_users, exclude.n_items) != (n_users, n_items):
        raise ValueError(
            f"exclude covers {exclude.n_users} users x {exclude.n_items} items, targets {n_users} x {n_items}"
        )
    users = np.flatnonzero(targets.counts() > 0)
    if len(users) == 0:
        raise ValueError("no user has held-out items to evaluate")
    totals = {f"{name}@{k}": 0.0 for k in ks for name in metrics}
    k_max = max(ks)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        user_tensor = torch.from_numpy(batch)
        if device is not None:
            user_tensor = user_tensor.to(device)
        with torch.no_grad():
            scores = score_fn(user_tensor)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(batch), n_items):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"score_fn must return scores of shape [{len(batch)}, {n_items}], got {shape}")
        if not scores.is_floating_point():
            raise ValueError(f"score_fn must return floating-point scores, got {scores.dtype}")
        if bool(torch.isnan(scores).any()):
            raise ValueError(f"score_fn returned NaN scores for some of the users {batch[:5].tolist()}...")
        scores = scores.detach().clone()
        if exclude is not None:
            rows, items = exclude.rows(batch)
            scores[
                torch.from_numpy(rows).to(scores.device), torch.from_numpy(items).to(scores.device)
            ] = -torch.inf
        top_scores, top_items = torch.topk(scores, k_max, dim=1)
        held_out = torch.zeros_like(scores, dtype=torch.bool)
        rows, items = targets.rows(batch)
        held_out[torch.from_numpy(rows).to(scores.device), torch.from_numpy(items).to(scores.device)] = True
        hits = held_out.gather(1, top_items) & (top_scores > -torch.inf)
        n_targets = torch.from_numpy(targets.counts()[batch]).to(scores.device)
        for name, value in ranking_metrics(hits, n_targets, ks, metrics).items():
            totals[name] += float(value.sum())
    result = {name: total / len(users) for name, total in totals.items()}
    result["n_users"] = float(len(users))
    return result


def evaluate_split(
    score_fn: ScoreFunction,
    split: InteractionSplit,
    part: Literal["valid", "test"] = "valid",
    *,
    ks: Sequence[int] = (10, 20),
    metrics: Sequence[str] = METRICS,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """:func:`evaluate_ranking` on a split's ``"valid"`` part (train excluded) or ``"test"`` part (train and
    valid excluded). Select models on ``"valid"`` only.

    Example:
        >>> split = load_split(DataConfig(dataset="synthetic-ml-100k"))  # doctest: +SKIP
        >>> evaluate_split(model.score_users, split, "valid")["recall@20"]  # doctest: +SKIP
    """
    targets, exclude = split.targets_and_exclusions(part)
    return evaluate_ranking(
        score_fn, targets, exclude, ks=ks, metrics=metrics, batch_size=batch_size, device=device
    )
