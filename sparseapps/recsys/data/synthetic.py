"""Synthetic interactions with Zipf item popularity, at any scale up to MovieLens-25M and beyond."""

from __future__ import annotations

import numpy as np

from sparseapps.core.validation import check_int, check_number
from sparseapps.recsys.data.interactions import Interactions, _sorted_unique


def _user_degrees(
    rng: np.random.Generator, n_users: int, n_items: int, n_interactions: int, exponent: float, minimum: int
) -> np.ndarray:
    """Interactions per user: ``minimum`` each plus a Zipf(exponent) share of the rest, capped at ``n_items``."""
    weights = np.arange(1, n_users + 1, dtype=np.float64) ** -exponent
    weights = weights[rng.permutation(n_users)]
    extra = np.zeros(n_users, dtype=np.int64)
    capacity = np.full(n_users, n_items - minimum, dtype=np.int64)
    remaining = n_interactions - minimum * n_users
    for _ in range(64):
        if remaining == 0:
            break
        open_weights = np.where(extra < capacity, weights, 0.0)
        extra += rng.multinomial(remaining, open_weights / open_weights.sum())
        overflow = np.maximum(extra - capacity, 0)
        remaining = int(overflow.sum())
        extra -= overflow
    if remaining:
        free = capacity - extra
        take = np.minimum(free, np.maximum(remaining - (np.cumsum(free) - free), 0))
        extra += take
    return extra + minimum


def _sample_items(
    rng: np.random.Generator, degrees: np.ndarray, cdf: np.ndarray, weights: np.ndarray, n_items: int
) -> np.ndarray:
    """Sorted keys ``user * n_items + rank``: ``degrees[u]`` distinct popularity ranks per user, Zipf weighted.

    Draws with replacement and tops up each user's deficit for a few rounds (cheap when a user takes a small share
    of the catalogue); the few users still short are finished exactly by exponential races over the items they
    lack (weighted sampling without replacement).
    """
    n_users = len(degrees)
    deficit = degrees.astype(np.int64)
    keys = np.empty(0, dtype=np.int64)
    for _ in range(12):
        total = int(deficit.sum())
        if total == 0:
            return keys
        owners = np.repeat(np.arange(n_users, dtype=np.int64), deficit)
        ranks = np.minimum(np.searchsorted(cdf, rng.random(total), side="right"), n_items - 1)
        fresh = _sorted_unique(owners * n_items + ranks)
        if len(keys):
            position = np.minimum(np.searchsorted(keys, fresh), len(keys) - 1)
            fresh = fresh[keys[position] != fresh]
        keys = np.sort(np.concatenate([keys, fresh]), kind="stable")
        deficit = degrees - np.bincount(keys // n_items, minlength=n_users)
    extra = []
    for user in np.flatnonzero(deficit):
        low, high = np.searchsorted(keys, [user * n_items, (user + 1) * n_items])
        taken = np.zeros(n_items, dtype=bool)
        taken[keys[low:high] % n_items] = True
        lacking = np.flatnonzero(~taken)
        race = rng.exponential(size=len(lacking)) / weights[lacking]
        chosen = lacking[np.argpartition(race, deficit[user] - 1)[: deficit[user]]]
        extra.append(user * n_items + chosen)
    return np.sort(np.concatenate([keys, *extra]), kind="stable")


def synthetic_interactions(
    *,
    n_users: int,
    n_items: int,
    n_interactions: int,
    item_exponent: float = 1.0,
    user_exponent: float = 0.5,
    min_per_user: int = 20,
    timestamps: bool = True,
    seed: int = 0,
    chunk_interactions: int = 4_000_000,
) -> Interactions:
    """Distinct (user, item) pairs with Zipf item popularity, at any scale up to MovieLens-25M and beyond.

    Item ``i`` of popularity rank ``r`` (ranks shuffled over item ids) is drawn with probability ``∝ r^-a``
    (``a = item_exponent``); user activity is ``min_per_user`` plus a Zipf(``user_exponent``) share of the
    remaining interactions, so the count is exact. Users are generated in chunks of about ``chunk_interactions``
    rows with vectorized numpy, so peak memory stays near the size of the output (25M rows: about 0.6 GB).

    Args:
        n_users: number of users ``U``; every user gets at least ``min_per_user`` interactions.
        n_items: number of items ``I``.
        n_interactions: exact number of distinct pairs ``N`` (at most ``U * I``).
        item_exponent: Zipf exponent of item popularity (0 is uniform).
        user_exponent: Zipf exponent of user activity (0 is uniform).
        min_per_user: lower bound on each user's interactions (MovieLens guarantees 20).
        timestamps: also draw Unix-second timestamps (needed by temporal and leave-one-out splits).
        seed: seed of the generator; the same arguments give the same rows.
        chunk_interactions: rows generated per chunk (memory knob).

    Returns:
        ``N`` rows sorted by user, ratings ``None``.

    Example:
        >>> rows = synthetic_interactions(n_users=100, n_items=50, n_interactions=2_000, min_per_user=5)
        >>> len(rows), len(set(zip(rows.users.tolist(), rows.items.tolist())))
        (2000, 2000)
    """
    for name, value, low in (
        ("n_users", n_users, 1),
        ("n_items", n_items, 1),
        ("n_interactions", n_interactions, 1),
        ("min_per_user", min_per_user, 0),
        ("seed", seed, 0),
        ("chunk_interactions", chunk_interactions, 1),
    ):
        check_int(name, value, low=low)
    check_number("item_exponent", item_exponent, low=0.0)
    check_number("user_exponent", user_exponent, low=0.0)
    if n_interactions > n_users * n_items:
        raise ValueError(
            f"n_interactions must be at most n_users * n_items = {n_users * n_items}, got {n_interactions}"
        )
    if min_per_user > n_items:
        raise ValueError(f"min_per_user must be at most n_items = {n_items}, got {min_per_user}")
    if min_per_user * n_users > n_interactions:
        raise ValueError(
            f"n_interactions must be at least min_per_user * n_users = {min_per_user * n_users}, got {n_interactions}"
        )
    rng = np.random.default_rng(seed)
    degrees = _user_degrees(rng, n_users, n_items, n_interactions, float(user_exponent), min_per_user)
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -float(item_exponent)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    item_of_rank = rng.permutation(n_items).astype(np.int64)
    users = np.empty(n_interactions, dtype=np.int64)
    items = np.empty(n_interactions, dtype=np.int64)
    ends = np.cumsum(degrees)
    start_user, start_row = 0, 0
    while start_user < n_users:
        stop_user = int(
            np.searchsorted(ends, ends[start_user] - degrees[start_user] + chunk_interactions, "right")
        )
        stop_user = max(stop_user, start_user + 1)
        keys = _sample_items(rng, degrees[start_user:stop_user], cdf, weights, n_items)
        stop_row = start_row + len(keys)
        users[start_row:stop_row] = keys // n_items + start_user
        items[start_row:stop_row] = item_of_rank[keys % n_items]
        start_user, start_row = stop_user, stop_row
    times = (
        rng.integers(946_684_800, 1_704_067_200, size=n_interactions, dtype=np.int64) if timestamps else None
    )
    return Interactions(users, items, None, times, f"synthetic (Zipf a={item_exponent}, seed {seed})")
