"""Raw interaction rows with original ids, and the array helpers the loading steps share.

Example:
    >>> rows = Interactions(np.array([7, 7, 9]), np.array([1, 2, 1]))
    >>> len(rows), rows.ratings is None
    (3, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values, ascending (a sort and a comparison: much faster than ``np.unique`` on large int arrays)."""
    ordered = np.sort(values)
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return ordered[keep]


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct, codes)``: the sorted distinct int64 values and each value's position among them."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0:
        return values.copy(), values.copy()
    low, high = int(values.min()), int(values.max())
    if high - low <= max(4 * len(values), 1 << 20):
        present = np.zeros(high - low + 1, dtype=bool)
        present[values - low] = True
        code_of = np.cumsum(present, dtype=np.int64) - 1
        return np.flatnonzero(present).astype(np.int64) + low, code_of[values - low]
    order = np.argsort(values)
    ordered = values[order]
    new = np.ones(len(ordered), dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    codes = np.empty(len(values), dtype=np.int64)
    codes[order] = np.cumsum(new, dtype=np.int64) - 1
    return ordered[new], codes


@dataclass(frozen=True, eq=False)
class Interactions:
    """Raw interaction rows with original ids, before re-indexing.

    Attributes:
        users: ``[N]`` int64 original user ids.
        items: ``[N]`` int64 original item ids.
        ratings: ``[N]`` float32 explicit ratings, or ``None`` (implicit data).
        timestamps: ``[N]`` int64 Unix seconds, or ``None`` (no time information).
        source: where the rows came from, for logs and results files.

    Example:
        >>> rows = Interactions(np.array([7, 7, 9]), np.array([1, 2, 1]), np.array([5.0, 3.0, 4.0]), None)
        >>> len(rows), rows.ratings.dtype
        (3, dtype('float32'))
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        columns = {"users": np.int64, "items": np.int64, "ratings": np.float32, "timestamps": np.int64}
        n = None
        for name, dtype in columns.items():
            value = getattr(self, name)
            if value is None:
                if name in ("users", "items"):
                    raise ValueError(f"{name} must be an array, got None")
                continue
            array = np.asarray(value)
            if array.ndim != 1:
                raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
            if n is None:
                n = len(array)
            elif len(array) != n:
                raise ValueError(f"{name} must have {n} rows like users, got {len(array)}")
            integer_column = np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer)
            if integer_column and array.size and not np.all(np.isfinite(array) & (array == np.floor(array))):
                raise ValueError(f"{name} must hold integers, got non-integer values in {array[:5]!r}")
            if array.dtype != dtype:
                array = array.astype(dtype)
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return len(self.users)

    def select(self, index: np.ndarray) -> Interactions:
        """The rows picked by ``index`` (an int array of positions or a bool mask of length N)."""
        return Interactions(
            self.users[index],
            self.items[index],
            None if self.ratings is None else self.ratings[index],
            None if self.timestamps is None else self.timestamps[index],
            self.source,
        )
