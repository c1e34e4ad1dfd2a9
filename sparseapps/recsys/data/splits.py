"""From raw rows to a split: implicit positives, k-core filtering, a seeded per-user split, and :func:`load_split`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from sparseapps.core.allocator import release_free_memory
from sparseapps.core.validation import check_bool, check_choice, check_int, check_number
from sparseapps.recsys.data.interactions import Interactions, _factorize, _sorted_unique
from sparseapps.recsys.data.sources import DATASET_NAMES, _check_dataset_name, load_interactions

SplitMethod = Literal["random", "leave_one_out", "temporal"]
Part = Literal["train", "valid", "test"]

SPLIT_METHODS = ("random", "leave_one_out", "temporal")
PARTS = ("train", "valid", "test")


def to_implicit(rows: Interactions, threshold: float | None = None) -> Interactions:
    """Positives only: rows rated ``>= threshold`` (every row when ``None``), one per (user, item) pair.

    A pair seen more than once keeps its earliest row (by timestamp, then by position). Row order is preserved.

    Example:
        >>> rows = Interactions(np.array([1, 1, 2]), np.array([5, 5, 5]), np.array([4.0, 2.0, 1.0]), None)
        >>> to_implicit(rows, threshold=2.0).users.tolist()
        [1]
    """
    if threshold is not None:
        check_number("threshold", threshold)
        if rows.ratings is None:
            raise ValueError(
                f"threshold={threshold} needs explicit ratings, but {rows.source or 'the data'} has none"
            )
        rows = rows.select(np.flatnonzero(rows.ratings >= threshold))
    user_codes = _factorize(rows.users)[1]
    item_ids, item_codes = _factorize(rows.items)
    keys = user_codes * len(item_ids) + item_codes
    del user_codes, item_codes
    if len(keys) < 2 or np.all(np.diff(np.sort(keys)) != 0):
        return rows
    position = np.arange(len(rows))
    columns = [position] if rows.timestamps is None else [position, rows.timestamps]
    order = np.lexsort((*columns, keys))
    sorted_keys = keys[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return rows.select(np.sort(order[first]))


def k_core(rows: Interactions, *, user_k: int = 0, item_k: int = 0) -> Interactions:
    """Removes users with fewer than ``user_k`` and items with fewer than ``item_k`` rows, until none is left.

    Example:
        >>> rows = Interactions(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 0]))
        >>> k_core(rows, user_k=2, item_k=2).users.tolist()
        [0, 0, 1, 1]
    """
    check_int("user_k", user_k, low=0)
    check_int("item_k", item_k, low=0)
    if user_k <= 1 and item_k <= 1:
        return rows
    users = _factorize(rows.users)[1]
    items = _factorize(rows.items)[1]
    index = np.arange(len(rows))
    while len(index):
        user_count = np.bincount(users[index])
        item_count = np.bincount(items[index])
        keep = (user_count[users[index]] >= user_k) & (item_count[items[index]] >= item_k)
        if keep.all():
            break
        index = index[keep]
    return rows.select(index)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def index_dtype(n: int) -> type[np.integer]:
    """The narrower of int32 / int64 that holds the indices ``[0, n)`` (lists of item ids, permutations of pairs).

    Example:
        >>> index_dtype(59_047), index_dtype(2**31 + 1)
        (<class 'numpy.int32'>, <class 'numpy.int64'>)
    """
    return np.int32 if n <= np.iinfo(np.int32).max + 1 else np.int64


@dataclass(frozen=True, eq=False)
class UserItemLists:
    """Each user's items in CSR form: user ``u``'s items are ``indices[indptr[u]:indptr[u + 1]]``, ascending.

    Attributes:
        indptr: ``[U + 1]`` int64 offsets.
        indices: ``[nnz]`` item ids, int32 (int64 beyond 2**31 - 1 items): half the bytes of the largest array a
            sampler keeps (20M train pairs at ML-25M scale).
        n_items: number of items ``I`` (ids are in ``[0, I)``).

    Example:
        >>> lists = UserItemLists.from_pairs(np.array([[1, 4], [0, 2], [1, 3]]), n_users=3, n_items=5)
        >>> lists.items_of(1).tolist(), lists.counts().tolist()
        ([3, 4], [1, 2, 0])
        >>> lists.contains(np.array([1, 1, 2]), np.array([4, 2, 4])).tolist()
        [True, False, False]
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_items: int

    @classmethod
    def from_pairs(cls, pairs: np.ndarray, *, n_users: int, n_items: int) -> UserItemLists:
        """From ``[N, 2]`` (user, item) pairs, in any order. Pairs already sorted by user, then item (a split's
        parts are) are taken as they are: no ``[N]`` sort order and gathered copy (at 20M pairs, ~300 MB less at
        the peak of building the lists)."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        keys = pairs[:, 0] * n_items + pairs[:, 1]
        items = pairs[:, 1] if bool((keys[1:] >= keys[:-1]).all()) else pairs[np.argsort(keys), 1]
        del keys
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs[:, 0], minlength=n_users), out=indptr[1:])
        return cls(indptr, items.astype(index_dtype(n_items)), n_items)

    @property
    def n_users(self) -> int:
        """Number of users ``U``."""
        return len(self.indptr) - 1

    def counts(self) -> np.ndarray:
        """``[U]`` number of items of each user."""
        return np.diff(self.indptr)

    def items_of(self, user: int) -> np.ndarray:
        """The sorted items of one user."""
        return self.indices[self.indptr[user] : self.indptr[user + 1]]

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The items of a batch of users as coordinates: ``(position in users, item)``, each ``[M]`` int64."""
        users = np.asarray(users, dtype=np.int64)
        starts, counts = self.indptr[users], self.indptr[users + 1] - self.indptr[users]
        positions = np.repeat(np.arange(len(users), dtype=np.int64), counts)
        offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return positions, self.indices[np.repeat(starts, counts) + offsets].astype(np.int64)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``[B]`` bool: whether each ``items[b]`` is among the items of ``users[b]``.

        A binary search inside each user's own (sorted, contiguous) list, vectorized over the batch; queries drop
        out as their search ends, so light users cost few steps.
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(f"users and items must have one shape, got {users.shape} and {items.shape}")
        low, end = self.indptr[users], self.indptr[users + 1]
        high = end.copy()
        pending = np.flatnonzero(low < high)
        while len(pending):
            lower, upper = low[pending], high[pending]
            middle = (lower + upper) >> 1
            right = self.indices[middle] < items[pending]
            lower = np.where(right, middle + 1, lower)
            upper = np.where(right, upper, middle)
            low[pending], high[pending] = lower, upper
            pending = pending[lower < upper]
        found = low < end
        found[found] = self.indices[low[found]] == items[found]
        return found

    def keys(self) -> np.ndarray:
        """``[nnz]`` ascending ``user * n_items + item``."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.counts()) * self.n_items + self.indices

    def union(self, other: UserItemLists) -> UserItemLists:
        """Each user's items in either list (for test exclusions: train plus valid)."""
        if other.n_users != self.n_users or other.n_items != self.n_items:
            raise ValueError(
                f"lists must cover the same users and items, got {self.n_users}x{self.n_items} and "
                f"{other.n_users}x{other.n_items}"
            )
        keys = _sorted_unique(np.concatenate([self.keys(), other.keys()]))
        pairs = np.stack([keys // self.n_items, keys % self.n_items], axis=1)
        return UserItemLists.from_pairs(pairs, n_users=self.n_users, n_items=self.n_items)


@dataclass(frozen=True, kw_only=True, eq=False)
class InteractionSplit:
    """Train / valid / test positives over contiguous ids, with per-user item lists.

    Attributes:
        train: ``[N_train, 2]`` int64 (user, item) pairs, sorted by user then item.
        valid: ``[N_valid, 2]`` likewise.
        test: ``[N_test, 2]`` likewise.
        n_users: number of users ``U``; ids are in ``[0, U)``.
        n_items: number of items ``I``; ids are in ``[0, I)``.
        user_ids: ``[U]`` original id of each user.
        item_ids: ``[I]`` original id of each item.
        description: how the split was made (dataset, filters, method, seed).

    Example:
        >>> split = load_split(DataConfig(dataset="synthetic-ml-100k"))
        >>> split.n_users, split.n_items
        (943, 1682)
        >>> targets, exclude = split.targets_and_exclusions("test")
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    n_users: int
    n_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    description: str = ""

    def __post_init__(self) -> None:
        check_int("n_users", self.n_users, low=1)
        check_int("n_items", self.n_items, low=1)
        for name in PARTS:
            pairs = np.asarray(getattr(self, name))
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise ValueError(f"{name} must have shape [N, 2] (user, item), got {pairs.shape}")
            pairs = pairs.astype(np.int64, copy=False)
            if len(pairs) and (
                pairs.min() < 0 or pairs[:, 0].max() >= self.n_users or pairs[:, 1].max() >= self.n_items
            ):
                raise ValueError(f"{name} holds ids outside [0, {self.n_users}) x [0, {self.n_items})")
            object.__setattr__(self, name, pairs)
        for name, size in (("user_ids", self.n_users), ("item_ids", self.n_items)):
            ids = np.asarray(getattr(self, name), dtype=np.int64)
            if ids.shape != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {ids.shape}")
            object.__setattr__(self, name, ids)

    def pairs(self, part: Part) -> np.ndarray:
        """The ``[N, 2]`` pairs of ``"train"``, ``"valid"`` or ``"test"``."""
        check_choice("part", part, PARTS)
        return getattr(self, part)

    @cached_property
    def train_items(self) -> UserItemLists:
        """Each user's train items."""
        return UserItemLists.from_pairs(self.train, n_users=self.n_users, n_items=self.n_items)

    @cached_property
    def valid_items(self) -> UserItemLists:
        """Each user's validation items."""
        return UserItemLists.from_pairs(self.valid, n_users=self.n_users, n_items=self.n_items)

    @cached_property
    def test_items(self) -> UserItemLists:
        """Each user's test items."""
        return UserItemLists.from_pairs(self.test, n_users=self.n_users, n_items=self.n_items)

    def targets_and_exclusions(self, part: Literal["valid", "test"]) -> tuple[UserItemLists, UserItemLists]:
        """The held-out items to find and the items removed from ranking when evaluating ``part``.

        Validation ranks everything but train items; test ranks everything but train and validation items.
        """
        if part == "valid":
            return self.valid_items, self.train_items
        if part == "test":
            return self.test_items, self.train_items.union(self.valid_items)
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")

    def item_popularity(self) -> np.ndarray:
        """``[I]`` number of train interactions of each item."""
        return np.bincount(self.train[:, 1], minlength=self.n_items)

    def user_activity(self) -> np.ndarray:
        """``[U]`` number of train interactions of each user."""
        return np.bincount(self.train[:, 0], minlength=self.n_users)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and results files."""
        total = len(self.train) + len(self.valid) + len(self.test)
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train": len(self.train),
            "n_valid": len(self.valid),
            "n_test": len(self.test),
            "density": total / (self.n_users * self.n_items),
            "description": self.description,
        }


def _ratio_counts(counts: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user valid and test sizes, as RecBole's ``split_by_ratio``: each part floored, a part whose share is
    below one row gets one row while train keeps more than one (test first, then valid)."""
    n = counts.astype(np.float64)
    n_valid = np.floor(ratios[1] * n).astype(np.int64)
    n_test = np.floor(ratios[2] * n).astype(np.int64)
    n_train = counts - n_valid - n_test
    for share, sizes in ((ratios[2], n_test), (ratios[1], n_valid)):
        bump = (n_train > 1) & (share * n > 0) & (share * n < 1)
        sizes += bump
        n_train -= bump
    return n_valid, n_test


def _check_ratios(ratios: object) -> tuple[float, float, float]:
    values = tuple(ratios) if isinstance(ratios, tuple | list) else None
    if (
        values is None
        or len(values) != 3
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        or min(values) < 0
        or values[0] <= 0
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise ValueError(
            f"ratios must be three non-negative numbers (train, valid, test) with train > 0 summing to 1, "
            f"got {ratios!r}"
        )
    return (float(values[0]), float(values[1]), float(values[2]))


def split_interactions(
    rows: Interactions,
    *,
    method: SplitMethod = "random",
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    description: str = "",
) -> InteractionSplit:
    """Re-indexes users and items to ``[0, U)`` / ``[0, I)`` and splits each user's rows.

    Methods:
        random: each user's rows shuffled, then split by ``ratios`` (RecBole's default protocol, 80/10/10).
        temporal: each user's rows in time order, the oldest ``ratios[0]`` to train, the newest to test.
        leave_one_out: each user's newest row to test and the one before to valid (users with two rows: train and
            test; one row: train only); ``ratios`` is ignored.

    Sizes per user follow RecBole: valid and test are floored, and a part whose share is under one row gets one
    row while train keeps at least two. Ties in time are broken by the seeded RNG.

    Raises:
        ValueError: duplicate (user, item) pairs (call :func:`to_implicit` first), bad ``method`` or ``ratios``,
            or a time-based method on rows without timestamps.

    Example:
        >>> rows = Interactions(np.repeat(np.arange(3), 10), np.tile(np.arange(10), 3))
        >>> split = split_interactions(rows, seed=0)
        >>> len(split.train), len(split.valid), len(split.test)
        (24, 3, 3)
    """
    check_choice("method", method, SPLIT_METHODS)
    ratios = _check_ratios(ratios)
    check_int("seed", seed, low=0)
    if len(rows) == 0:
        raise ValueError(f"cannot split an empty set of interactions ({rows.source or 'no source'})")
    if method != "random" and rows.timestamps is None:
        raise ValueError(
            f"method {method!r} orders rows by time, but {rows.source or 'the data'} has no timestamps"
        )
    user_ids, users = _factorize(rows.users)
    item_ids, items = _factorize(rows.items)
    n_users, n_items, n = len(user_ids), len(item_ids), len(rows)
    keys = users * n_items
    keys += items
    keys.sort()
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError("interactions hold duplicate (user, item) pairs; call to_implicit() first")
    del keys
    # rank[row]: the row's place in a seeded random order (random) or in time order with seeded ties (others);
    # sorting by user * n + rank then groups each user's rows in that order without a slow lexsort.
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n).astype(np.int64, copy=False)
    if method != "random":
        bits = max(n - 1, 1).bit_length()
        first, last = int(rows.timestamps.min()), int(rows.timestamps.max())
        if last - first < (1 << (62 - bits)):
            by_time = np.argsort(((rows.timestamps - first) << bits) | rank)
        else:
            by_time = np.lexsort((rank, rows.timestamps))
        rank[by_time] = np.arange(n, dtype=np.int64)
        del by_time
    keys = users * n
    keys += rank
    del rank
    order = np.argsort(keys)
    del keys
    counts = np.bincount(users, minlength=n_users)
    if method == "leave_one_out":
        n_valid, n_test = (counts >= 3).astype(np.int64), (counts >= 2).astype(np.int64)
    else:
        n_valid, n_test = _ratio_counts(counts, ratios)
    n_train = counts - n_valid - n_test
    # `order` holds each user's rows contiguously, users ascending: its first n_train of a user go to train (0), the
    # next n_valid to valid (1), the rest to test (2); repeated per user as int8, with no [N] int64 temporary.
    sizes = np.stack([n_train, n_valid, n_test], axis=1).reshape(-1)
    part = np.repeat(np.tile(np.arange(3, dtype=np.int8), n_users), sizes)
    part_of_row = np.empty(n, dtype=np.int8)
    part_of_row[order] = part
    del order, part
    parts = []
    for code in range(3):
        # The part's pairs sorted by user, then item: their keys user * I + item are distinct, so sorting the keys in
        # place sorts the pairs (no [N] sort order, no gathered copy: ~640 MB less at 20M train pairs).
        index = np.flatnonzero(part_of_row == code)
        keys = users[index]
        keys *= n_items
        keys += items[index]
        del index
        keys.sort()
        pairs = np.empty((len(keys), 2), dtype=np.int64)
        np.floor_divide(keys, n_items, out=pairs[:, 0])
        np.remainder(keys, n_items, out=pairs[:, 1])
        del keys
        parts.append(pairs)
    return InteractionSplit(
        train=parts[0],
        valid=parts[1],
        test=parts[2],
        n_users=n_users,
        n_items=n_items,
        user_ids=user_ids,
        item_ids=item_ids,
        description=description,
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data, how it becomes implicit feedback, and how it is split.

    Example:
        >>> config = DataConfig(dataset="ml-1m", rating_threshold=4.0, user_core=5, item_core=5)
        >>> config.split, config.ratios
        ('random', (0.8, 0.1, 0.1))
    """

    dataset: str = field(
        default="ml-100k",
        metadata={"help": f"one of {', '.join(DATASET_NAMES)}, or a path to a RecBole '.inter' file"},
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "cache directory for archives and atomic files ($SPARSEAPPS_DATA if unset)"},
    )
    download: bool = field(default=True, metadata={"help": "download a missing GroupLens archive"})
    rating_threshold: float | None = field(
        default=None, metadata={"help": "ratings >= this are positives; None: every rating is a positive"}
    )
    user_core: int = field(
        default=0, metadata={"help": "k-core: keep users with at least this many positives"}
    )
    item_core: int = field(
        default=0, metadata={"help": "k-core: keep items with at least this many positives"}
    )
    split: SplitMethod = field(
        default="random", metadata={"help": "random (per user), leave_one_out or temporal"}
    )
    ratios: tuple[float, float, float] = field(
        default=(0.8, 0.1, 0.1),
        metadata={"help": "train / valid / test shares per user (random and temporal)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the split (and of synthetic data)"})

    def __post_init__(self) -> None:
        _check_dataset_name(self.dataset)
        if self.data_root is not None and not isinstance(self.data_root, str | os.PathLike):
            raise ValueError(f"data_root must be a path or None, got {self.data_root!r}")
        check_bool("download", self.download)
        if self.rating_threshold is not None:
            check_number("rating_threshold", self.rating_threshold)
        check_int("user_core", self.user_core, low=0)
        check_int("item_core", self.item_core, low=0)
        check_choice("split", self.split, SPLIT_METHODS)
        object.__setattr__(self, "ratios", _check_ratios(self.ratios))
        check_int("seed", self.seed, low=0)


def load_split(config: DataConfig, *, progress: bool = True) -> InteractionSplit:
    """Loads, converts, filters and splits the data that ``config`` describes.

    Example:
        >>> split = load_split(DataConfig(dataset="ml-100k", download=False))  # doctest: +SKIP
        >>> split.n_users, split.n_items, len(split.train) + len(split.valid) + len(split.test)  # doctest: +SKIP
        (943, 1682, 100000)
    """
    rows = load_interactions(
        config.dataset, config.data_root, download=config.download, seed=config.seed, progress=progress
    )
    rows = to_implicit(rows, config.rating_threshold)
    rows = k_core(rows, user_k=config.user_core, item_k=config.item_core)
    if len(rows) == 0:
        raise ValueError(
            f"no interactions left in {config.dataset} after rating_threshold={config.rating_threshold}, "
            f"user_core={config.user_core}, item_core={config.item_core}"
        )
    description = (
        f"{config.dataset} from {rows.source}; positives: "
        f"{'every rating' if config.rating_threshold is None else f'rating >= {config.rating_threshold}'}; "
        f"core {config.user_core}/{config.item_core}; {config.split} split "
        f"{'/'.join(map(str, config.ratios))}; seed {config.seed}"
    )
    split = split_interactions(
        rows, method=config.split, ratios=config.ratios, seed=config.seed, description=description
    )
    del rows
    release_free_memory()  # the loading's freed temporaries (sparseapps.core.allocator): ~60 MB at ML-25M scale
    return split
