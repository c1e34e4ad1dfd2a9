"""RecBole atomic interaction files (``.inter``), and the ML-100K copy shipped inside the ``recbole`` package."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np

from sparseapps.recsys.data.interactions import Interactions
from sparseapps.recsys.data.parsers import FORMAT_DESCRIPTIONS, _NotNumericError, _parse_table

_RECBOLE_ML100K = ("dataset_example", "ml-100k", "ml-100k.inter")


def _token_codes(values: np.ndarray) -> np.ndarray:
    """int64 ids from a token column: the integers themselves when every token is one, else sorted-token ranks."""
    if np.issubdtype(values.dtype, np.floating):
        if np.all(np.isfinite(values) & (values == np.floor(values))):
            return values.astype(np.int64)
    else:
        try:
            return values.astype(np.int64)
        except (ValueError, OverflowError):
            pass
    return np.unique(values, return_inverse=True)[1].astype(np.int64).reshape(-1)


def read_atomic_inter(path: str | os.PathLike[str]) -> Interactions:
    """Reads a RecBole atomic interaction file (``.inter``).

    The header names each column ``name:type``; ``user_id`` and ``item_id`` are required, ``rating`` and
    ``timestamp`` are used when present. Integer tokens keep their values as ids; other tokens are numbered in
    sorted order.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names the expected format).
        ValueError: the header or a row does not follow the atomic format.

    Example:
        >>> rows = read_atomic_inter(find_recbole_ml100k())  # doctest: +SKIP
        >>> len(rows)  # doctest: +SKIP
        100000
    """
    path = Path(path)
    expected = FORMAT_DESCRIPTIONS["inter"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    with open(path, "rb") as stream:
        header = stream.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        fields = header.split("\t")
        columns: dict[str, int] = {}
        for position, entry in enumerate(fields):
            name, colon, kind = entry.partition(":")
            if not colon or not name or not kind:
                raise ValueError(f"{path}: expected {expected}; header field {entry!r} is not 'name:type'")
            columns[name] = position
        missing = [name for name in ("user_id", "item_id") if name not in columns]
        if missing:
            raise ValueError(f"{path}: expected {expected}; the header {header!r} lacks {', '.join(missing)}")
        body_start = stream.tell()
        parse = {
            "delimiter": "\t",
            "n_columns": len(fields),
            "source": str(path),
            "expected": expected,
            "first_line": 2,
        }
        try:
            table = _parse_table(stream, **parse)
        except _NotNumericError:  # tokens that are not numbers: read every column as text
            stream.seek(body_start)
            table = _parse_table(stream, dtype=str, **parse)
    users = _token_codes(table[:, columns["user_id"]])
    items = _token_codes(table[:, columns["item_id"]])
    extra: dict[str, np.ndarray | None] = {"rating": None, "timestamp": None}
    for name in extra:
        if name in columns:
            try:
                extra[name] = table[:, columns[name]].astype(np.float64)
            except ValueError as error:
                raise ValueError(
                    f"{path}: expected {expected}; column {name!r} is not numeric: {error}"
                ) from error
    timestamps = extra["timestamp"]
    if timestamps is not None:
        if not np.all(np.isfinite(timestamps)):
            raise ValueError(f"{path}: expected {expected}; column 'timestamp' holds non-finite values")
        timestamps = np.floor(timestamps)
    return Interactions(users, items, extra["rating"], timestamps, f"RecBole atomic file {path}")


def find_recbole_ml100k() -> Path | None:
    """The ``ml-100k.inter`` file shipped inside the installed ``recbole`` package, or ``None``.

    The package is located, never imported (importing RecBole is slow and pulls in many dependencies).
    """
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*_RECBOLE_ML100K)
        if candidate.is_file():
            return candidate
    try:
        distribution = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = Path(str(distribution.locate_file(Path("recbole", *_RECBOLE_ML100K))))
    return candidate if candidate.is_file() else None
