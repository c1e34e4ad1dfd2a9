"""Implicit-feedback data: MovieLens loaders, a synthetic generator, k-core filtering, splits and a BPR sampler.

The pipeline, each step a function of arrays:

1. raw ratings, :class:`Interactions` (original user/item ids), from one of
   - a GroupLens archive (``ml-100k`` ... ``ml-32m``), downloaded once into ``data_root`` with its published
     MD5 checked and read straight from the zip (nothing is extracted);
   - a RecBole atomic file ``<data_root>/<name>/<name>.inter`` (offline);
   - the extracted ratings file ``<data_root>/<member>`` (offline);
   - for ``ml-100k``, the atomic file shipped inside the installed ``recbole`` package (offline, no import);
   - :func:`synthetic_interactions` (``synthetic-ml-100k`` ... ``synthetic-ml-25m``: Zipf item popularity);
2. :func:`to_implicit`: ratings ``>= threshold`` become positives (default: every rating), duplicates dropped;
3. :func:`k_core`: users and items with too few interactions removed until none is left;
4. :func:`split_interactions`: contiguous ids and a seeded per-user split (random 80/10/10 by default,
   leave-one-out or temporal), an :class:`InteractionSplit` with CSR lists of each user's items;
5. :class:`BPRSampler`: (user, positive, negative) batches with uniform negatives that are never train positives.

:func:`load_split` runs all of it from one :class:`DataConfig`.

GroupLens archives (MD5 as published next to each archive, ``<url>.md5``):

==========  ==========  ==========================
name        ratings     ratings file in the zip
==========  ==========  ==========================
ml-100k     100,000     ``ml-100k/u.data``
ml-1m       1,000,209   ``ml-1m/ratings.dat``
ml-10m      10,000,054  ``ml-10M100K/ratings.dat``
ml-20m      20,000,263  ``ml-20m/ratings.csv``
ml-25m      25,000,095  ``ml-25m/ratings.csv``
ml-32m      32,000,204  ``ml-32m/ratings.csv``
==========  ==========  ==========================
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import math
import os
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sparseapps.core.io import write_atomic

RatingsFormat = Literal["u.data", "dat", "csv"]
SplitMethod = Literal["random", "leave_one_out", "temporal"]
Part = Literal["train", "valid", "test"]

SPLIT_METHODS = ("random", "leave_one_out", "temporal")
PARTS = ("train", "valid", "test")

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "u.data": "tab-separated rows 'user id<TAB>item id<TAB>rating<TAB>timestamp' with no header (MovieLens u.data)",
    "dat": "rows 'UserID::MovieID::Rating::Timestamp' with no header (MovieLens ratings.dat)",
    "csv": "comma-separated rows under the header 'userId,movieId,rating,timestamp' (MovieLens ratings.csv)",
    "inter": "a RecBole atomic file: tab separated, a header of 'name:type' fields including user_id and item_id "
    "(rating and timestamp optional), e.g. 'user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float'",
}
_DELIMITERS = {"u.data": "\t", "dat": "::", "csv": ","}
_CSV_HEADER = "userId,movieId,rating,timestamp"
_BLOCK_BYTES = 16 << 20
_RECBOLE_ML100K = ("dataset_example", "ml-100k", "ml-100k.inter")


@dataclass(frozen=True, kw_only=True)
class MovieLensArchive:
    """Where one GroupLens MovieLens release lives and how its ratings are stored.

    Example:
        >>> MOVIELENS_ARCHIVES["ml-1m"].member
        'ml-1m/ratings.dat'
    """

    name: str = field(metadata={"help": "dataset name, e.g. 'ml-1m'"})
    url: str = field(metadata={"help": "download address of the zip archive"})
    md5: str = field(metadata={"help": "MD5 of the archive as GroupLens publishes it (<url>.md5)"})
    member: str = field(metadata={"help": "path of the ratings file inside the archive"})
    format: RatingsFormat = field(metadata={"help": "layout of the ratings file: u.data, dat or csv"})

    @property
    def filename(self) -> str:
        """The archive's file name in the cache directory, e.g. ``ml-1m.zip``."""
        return f"{self.name}.zip"


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
MOVIELENS_ARCHIVES: dict[str, MovieLensArchive] = {
    spec.name: spec
    for spec in (
        MovieLensArchive(
            name="ml-100k",
            url=f"{_GROUPLENS}/ml-100k.zip",
            md5="0e33842e24a9c977be4e0107933c0723",
            member="ml-100k/u.data",
            format="u.data",
        ),
        MovieLensArchive(
            name="ml-1m",
            url=f"{_GROUPLENS}/ml-1m.zip",
            md5="c4d9eecfca2ab87c1945afe126590906",
            member="ml-1m/ratings.dat",
            format="dat",
        ),
        MovieLensArchive(
            name="ml-10m",
            url=f"{_GROUPLENS}/ml-10m.zip",
            md5="ce571fd55effeba0271552578f2648bd",
            member="ml-10M100K/ratings.dat",
            format="dat",
        ),
        MovieLensArchive(
            name="ml-20m",
            url=f"{_GROUPLENS}/ml-20m.zip",
            md5="cd245b17a1ae2cc31bb14903e1204af3",
            member="ml-20m/ratings.csv",
            format="csv",
        ),
        MovieLensArchive(
            name="ml-25m",
            url=f"{_GROUPLENS}/ml-25m.zip",
            md5="6b51fb2759a8657d3bfcbfc42b592ada",
            member="ml-25m/ratings.csv",
            format="csv",
        ),
        MovieLensArchive(
            name="ml-32m",
            url=f"{_GROUPLENS}/ml-32m.zip",
            md5="d472be332d4daa821edc399621853b57",
            member="ml-32m/ratings.csv",
            format="csv",
        ),
    )
}

# Synthetic stand-ins sized like the real releases: (users, items, interactions).
SYNTHETIC_SIZES: dict[str, tuple[int, int, int]] = {
    "synthetic-ml-100k": (943, 1_682, 100_000),
    "synthetic-ml-1m": (6_040, 3_706, 1_000_209),
    "synthetic-ml-25m": (162_541, 59_047, 25_000_095),
}
DATASET_NAMES: tuple[str, ...] = (*MOVIELENS_ARCHIVES, *SYNTHETIC_SIZES)


def _check_dataset_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a string, got {type(name).__name__} {name!r}")
    if name not in DATASET_NAMES and not name.endswith(".inter"):
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)} or a path to a RecBole "
            "'.inter' file"
        )


def _check_int(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


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


def _pair_order(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Positions that sort contiguous-id pairs by user, then item."""
    return np.argsort(users * n_items + items)


# ----------------------------------------------------------------------------------------------------------------
# Raw interactions


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


def _convert_columns(table: np.ndarray, *, source: str) -> Interactions:
    """``[N, 4]`` float64 (user, item, rating, timestamp), checked by :func:`_rating_problems` -> Interactions."""
    return Interactions(
        table[:, 0].astype(np.int64),
        table[:, 1].astype(np.int64),
        table[:, 2].astype(np.float32),
        table[:, 3].astype(np.int64),
        source,
    )


def _iter_text_blocks(stream: IO[bytes], first_line: int) -> Iterator[tuple[str, int]]:
    """Blocks of whole lines (latin-1 text) of about ``_BLOCK_BYTES``, each with the number of its first line."""
    remainder = b""
    line = first_line
    while True:
        chunk = stream.read(_BLOCK_BYTES)
        if not chunk:
            break
        data = remainder + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            remainder = data
            continue
        block, remainder = data[: cut + 1], data[cut + 1 :]
        yield block.decode("latin-1"), line
        line += block.count(b"\n")
    if remainder.strip():
        yield remainder.decode("latin-1"), line


_RATING_COLUMNS = ("user id", "item id", "rating", "timestamp")


class _NotNumericError(ValueError):
    """A field of a numeric table is not a number (an atomic file then retries its tokens as strings)."""


def _rating_problems(table: np.ndarray) -> tuple[int, int, str] | None:
    """``(row, column, what is wrong)`` of the first bad row of ``[N, 4]`` ratings, or ``None``.

    Ids must be non-negative integers, timestamps integers, ratings finite numbers.
    """
    finite = np.isfinite(table)
    integral = finite & (table == np.floor(table))
    problems = (
        (0, ~integral[:, 0], "is not an integer"),
        (0, table[:, 0] < 0, "is negative (ids are non-negative integers)"),
        (1, ~integral[:, 1], "is not an integer"),
        (1, table[:, 1] < 0, "is negative (ids are non-negative integers)"),
        (2, ~finite[:, 2], "is not a finite number"),
        (3, ~integral[:, 3], "is not an integer (Unix seconds)"),
    )
    bad = np.zeros(len(table), dtype=bool)
    for _, mask, _ in problems:
        bad |= mask
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    column, _, reason = next(problem for problem in problems if problem[1][row])
    return row, column, reason


def _describe_bad_line(
    text: str,
    first_line: int,
    *,
    delimiter: str,
    n_columns: int,
    numeric: bool,
    check: Callable[[np.ndarray], tuple[int, int, str] | None] | None,
    column_names: tuple[str, ...] | None,
) -> tuple[int, str, bool] | None:
    """``(line number, what is wrong, whether a field is not a number)`` for the first bad line of a block.

    Only called once the fast parse of the block failed: reads the block line by line in Python.
    """
    for offset, raw in enumerate(text.split("\n")):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        shown = line.replace("\t", "::") if delimiter == "::" else line
        fields = line.split("\t" if delimiter == "::" else delimiter)
        number = first_line + offset
        if len(fields) != n_columns:
            return (
                number,
                f"{shown!r} has {len(fields)} fields, expected {n_columns} (a line cut short, e.g. by an "
                "interrupted download or copy?)",
                False,
            )
        if not numeric:
            continue
        values = []
        for position, value in enumerate(fields):
            try:
                values.append(float(value))
            except ValueError:
                name = column_names[position] if column_names else f"field {position + 1}"
                if not value.strip():
                    return number, f"{name} is empty in {shown!r} (a line cut short?)", True
                return number, f"{name} {value!r} in {shown!r} is not a number", True
        problem = check(np.array([values])) if check is not None else None
        if problem is not None:
            _, column, reason = problem
            name = column_names[column] if column_names else f"field {column + 1}"
            return number, f"{name} {fields[column].strip()!r} in {shown!r} {reason}", False
    return None


def _parse_table(
    stream: IO[bytes],
    *,
    delimiter: str,
    n_columns: int,
    source: str,
    expected: str,
    first_line: int,
    dtype: type = np.float64,
    check: Callable[[np.ndarray], tuple[int, int, str] | None] | None = None,
    column_names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """Parses delimited text block by block into ``[N, n_columns]``.

    Every row must have ``n_columns`` fields and (numeric ``dtype``) pass ``check`` (``(row, column, reason)`` of
    the first bad row, or ``None``). The first bad line is refused by number, with its text and the bad field.

    Raises:
        ValueError: a bad line (:class:`_NotNumericError` when a field is not a number), or no rows at all.
    """
    numeric = dtype is not str
    parts = []
    for text, line in _iter_text_blocks(stream, first_line):
        if delimiter == "::":
            if "\t" in text:
                raise ValueError(f"{source}: expected {expected}; found a tab near line {line}")
            text = text.replace("::", "\t")
        if not text.strip():
            continue
        failure = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                block = np.loadtxt(
                    io.StringIO(text),
                    delimiter="\t" if delimiter == "::" else delimiter,
                    dtype=dtype,
                    comments=None,
                    ndmin=2,
                    quotechar=None,
                )
        except ValueError as error:
            failure = str(error)
        else:
            if block.shape[0] == 0:
                continue
            if block.shape[1] != n_columns:
                failure = f"found {block.shape[1]} fields per row, expected {n_columns}"
            elif numeric and check is not None and check(block) is not None:
                failure = "a bad value"
        if failure is not None:
            found = _describe_bad_line(
                text,
                line,
                delimiter=delimiter,
                n_columns=n_columns,
                numeric=numeric,
                check=check,
                column_names=column_names,
            )
            if found is None:  # numpy and Python disagree on what parses: report numpy's reason
                raise ValueError(
                    f"{source}: expected {expected}; could not parse the lines from {line}: {failure}"
                )
            number, problem, not_numeric = found
            kind = _NotNumericError if not_numeric else ValueError
            raise kind(f"{source}: line {number}: {problem}; expected {expected}")
        parts.append(block)
    if not parts:
        raise ValueError(f"{source}: expected {expected}; the file holds no rows")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def parse_ratings(stream: IO[bytes], format: RatingsFormat, *, source: str = "<stream>") -> Interactions:
    """Reads a MovieLens ratings file (``u.data``, ``ratings.dat`` or ``ratings.csv``) from a binary stream.

    Args:
        stream: an open binary file or zip member.
        format: ``"u.data"`` (tab separated), ``"dat"`` (``::`` separated) or ``"csv"`` (with header).
        source: the file's name, used in error messages.

    Returns:
        The rows in file order, with ratings and timestamps.

    Raises:
        ValueError: the content does not follow ``format``: a line cut short (a missing rating or timestamp, as
            an interrupted download or copy leaves), a field that is not a number, a negative or non-integer id
            or timestamp. The message names ``source``, the line number, the line and the layout.

    Example:
        >>> rows = parse_ratings(io.BytesIO(b"1::10::5::978300760\\n2::10::3::978302109\\n"), "dat")
        >>> rows.users.tolist(), rows.items.tolist(), rows.ratings.tolist()
        ([1, 2], [10, 10], [5.0, 3.0])
    """
    if format not in _DELIMITERS:
        raise ValueError(f"format must be one of {', '.join(map(repr, _DELIMITERS))}, got {format!r}")
    expected = FORMAT_DESCRIPTIONS[format]
    first_line = 1
    if format == "csv":
        header = stream.readline().decode("latin-1").strip()
        if header != _CSV_HEADER:
            raise ValueError(f"{source}: expected {expected}; got the header {header[:80]!r}")
        first_line = 2
    table = _parse_table(
        stream,
        delimiter=_DELIMITERS[format],
        n_columns=4,
        source=source,
        expected=expected,
        first_line=first_line,
        check=_rating_problems,
        column_names=_RATING_COLUMNS,
    )
    return _convert_columns(table, source=source)


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


# ----------------------------------------------------------------------------------------------------------------
# GroupLens archives: download and read


def default_data_root() -> Path:
    """``$SPARSEAPPS_DATA`` if set, else ``~/.cache/sparseapps/data``."""
    return Path(os.environ.get("SPARSEAPPS_DATA", "~/.cache/sparseapps/data")).expanduser()


def _archive_spec(name: str) -> MovieLensArchive:
    if name not in MOVIELENS_ARCHIVES:
        raise ValueError(
            f"unknown MovieLens archive {name!r}; expected one of {', '.join(MOVIELENS_ARCHIVES)}"
        )
    return MOVIELENS_ARCHIVES[name]


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class DataNotFoundError(FileNotFoundError):
    """A dataset has no local copy and could not be downloaded; the message says which file to place where."""


def _where_to_place(spec: MovieLensArchive, root: Path) -> str:
    """Every local copy :func:`load_interactions` reads, in its order, with the archive's URL and MD5."""
    return (
        f"place one of these (read in this order): {root / spec.name / f'{spec.name}.inter'} "
        f"({FORMAT_DESCRIPTIONS['inter']}); {root / spec.member} ({FORMAT_DESCRIPTIONS[spec.format]}); or "
        f"{root / spec.filename}, the GroupLens archive from {spec.url} (its MD5 {spec.md5} is checked before "
        "use). --data-root (DataConfig.data_root) or $SPARSEAPPS_DATA sets the directory"
    )


def download_movielens(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Downloads a GroupLens archive into ``data_root`` once and returns its path.

    The file is streamed to a temporary file in the same directory (:func:`~sparseapps.core.io.write_atomic`), its
    MD5 compared with the published one, and only then renamed into place, so an interrupted or corrupt download
    never leaves ``<name>.zip`` behind. An archive already present is checked, not downloaded again.

    Raises:
        ValueError: unknown name, or a checksum that does not match (nothing is kept).
        DataNotFoundError: the download failed, e.g. offline (a ``FileNotFoundError``; the message says where to
            place the archive by hand, its URL and MD5).

    Example:
        >>> path = download_movielens("ml-1m", "/tmp/movielens")  # doctest: +SKIP
    """
    spec = _archive_spec(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    target = root / spec.filename
    if target.is_file():
        _check_archive_md5(target, spec)
        return target

    def fetch(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            digest = _stream_to(
                spec.url, out, progress=progress, timeout=timeout, manual_path=target, md5=spec.md5
            )
        if digest != spec.md5:
            raise ValueError(
                f"{spec.url}: downloaded archive has MD5 {digest}, expected {spec.md5} (the published checksum); "
                "nothing was kept"
            )
        try:
            with zipfile.ZipFile(temporary) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise ValueError(
                f"{spec.url}: expected the GroupLens {spec.filename} archive, got a file that is not a readable zip "
                f"({error}); nothing was kept"
            ) from error
        if spec.member not in members:
            raise ValueError(f"{spec.url}: the archive lacks {spec.member}; nothing was kept")

    write_atomic(target, fetch)
    return target


def _stream_to(
    url: str, out: IO[bytes], *, progress: bool, timeout: float, manual_path: Path, md5: str
) -> str:
    """Copies ``url`` into ``out`` and returns the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not progress
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataNotFoundError(
            f"could not download {url}: {reason}; place the archive at {manual_path} by hand (MD5 {md5})"
        ) from error
    return digest.hexdigest()


def _check_archive_md5(path: Path, spec: MovieLensArchive) -> None:
    digest = file_md5(path)
    if digest != spec.md5:
        raise ValueError(
            f"{path}: MD5 {digest} does not match the published {spec.md5} of {spec.url}; the file is corrupt or "
            "another release: delete it to download again"
        )


def read_movielens_archive(path: str | os.PathLike[str], name: str, *, verify: bool = True) -> Interactions:
    """Reads the ratings of a GroupLens archive straight from the zip.

    Args:
        path: the ``.zip`` file.
        name: which release it is (``"ml-1m"`` ...): gives the member and its format.
        verify: compare the archive's MD5 with the published one first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: checksum mismatch, not a zip archive, the ratings member missing, or rows in the wrong layout;
            the message names the file and the expected format.
    """
    spec = _archive_spec(name)
    path = Path(path)
    expected = (
        f"the GroupLens {spec.filename} archive holding {spec.member}: {FORMAT_DESCRIPTIONS[spec.format]}"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    if verify:
        _check_archive_md5(path, spec)
    try:
        with zipfile.ZipFile(path) as archive:
            if spec.member not in archive.namelist():
                raise ValueError(f"{path}: expected {expected}; the archive has no member {spec.member}")
            with archive.open(spec.member) as stream:
                return _with_source(
                    parse_ratings(stream, spec.format, source=f"{path}:{spec.member}"), str(path)
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ValueError(
            f"{path}: expected {expected}; the file is not a readable zip archive ({error})"
        ) from error


def _with_source(rows: Interactions, source: str) -> Interactions:
    return Interactions(rows.users, rows.items, rows.ratings, rows.timestamps, source)


def load_interactions(
    dataset: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> Interactions:
    """Raw interactions of a named dataset, from the first source that has them.

    For a MovieLens name the sources are tried in this order: a RecBole atomic file
    ``<data_root>/<name>/<name>.inter``; the extracted ratings file ``<data_root>/<member>``; the cached archive
    ``<data_root>/<name>.zip``; for ``ml-100k`` the atomic file inside the installed ``recbole`` package; and
    finally a download (when ``download``). A name ending in ``.inter`` is read as a RecBole atomic file;
    ``synthetic-*`` names are generated with ``seed``.

    Raises:
        ValueError: unknown dataset name, or a file in the wrong format.
        DataNotFoundError: no local copy, and ``download=False`` or the download failed (offline): a
            ``FileNotFoundError`` whose message lists each file to place where, the archive's URL and its MD5.

    Example:
        >>> rows = load_interactions("ml-100k", download=False)  # doctest: +SKIP
        >>> len(rows)  # doctest: +SKIP
        100000
    """
    _check_dataset_name(dataset)
    if dataset in SYNTHETIC_SIZES:
        n_users, n_items, n_interactions = SYNTHETIC_SIZES[dataset]
        rows = synthetic_interactions(
            n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=seed
        )
        return _with_source(rows, f"{dataset} (seed {seed})")
    if dataset not in MOVIELENS_ARCHIVES:
        return read_atomic_inter(dataset)
    spec = MOVIELENS_ARCHIVES[dataset]
    root = Path(data_root) if data_root is not None else default_data_root()
    atomic = root / dataset / f"{dataset}.inter"
    extracted = root / spec.member
    archive = root / spec.filename
    if atomic.is_file():
        return read_atomic_inter(atomic)
    if extracted.is_file():
        with open(extracted, "rb") as stream:
            return _with_source(parse_ratings(stream, spec.format, source=str(extracted)), str(extracted))
    if archive.is_file():
        return read_movielens_archive(archive, dataset)
    if dataset == "ml-100k":
        bundled = find_recbole_ml100k()
        if bundled is not None:
            return read_atomic_inter(bundled)
    if not download:
        raise DataNotFoundError(
            f"{dataset}: no local copy, and downloads are off (download=False): pass download=True or "
            f"{_where_to_place(spec, root)}"
        )
    try:
        downloaded = download_movielens(dataset, root, progress=progress)
    except DataNotFoundError as error:
        raise DataNotFoundError(
            f"{dataset}: no local copy, and the download failed ({error.__cause__ or error}); "
            f"{_where_to_place(spec, root)}"
        ) from error
    return read_movielens_archive(downloaded, dataset, verify=False)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data


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
        _check_int(name, value, low=low)
    for name, value in (("item_exponent", item_exponent), ("user_exponent", user_exponent)):
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
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


# ----------------------------------------------------------------------------------------------------------------
# Filtering


def to_implicit(rows: Interactions, threshold: float | None = None) -> Interactions:
    """Positives only: rows rated ``>= threshold`` (every row when ``None``), one per (user, item) pair.

    A pair seen more than once keeps its earliest row (by timestamp, then by position). Row order is preserved.

    Example:
        >>> rows = Interactions(np.array([1, 1, 2]), np.array([5, 5, 5]), np.array([4.0, 2.0, 1.0]), None)
        >>> to_implicit(rows, threshold=2.0).users.tolist()
        [1]
    """
    if threshold is not None:
        if (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
        ):
            raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
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
    _check_int("user_k", user_k, low=0)
    _check_int("item_k", item_k, low=0)
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


@dataclass(frozen=True, eq=False)
class UserItemLists:
    """Each user's items in CSR form: user ``u``'s items are ``indices[indptr[u]:indptr[u + 1]]``, ascending.

    Attributes:
        indptr: ``[U + 1]`` int64 offsets.
        indices: ``[nnz]`` int64 item ids.
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
        """From ``[N, 2]`` (user, item) pairs, in any order."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        order = _pair_order(pairs[:, 0], pairs[:, 1], n_items)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs[:, 0], minlength=n_users), out=indptr[1:])
        return cls(indptr, pairs[order, 1].copy(), n_items)

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
        return positions, self.indices[np.repeat(starts, counts) + offsets]

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
        _check_int("n_users", self.n_users, low=1)
        _check_int("n_items", self.n_items, low=1)
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
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(map(repr, PARTS))}, got {part!r}")
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
    if method not in SPLIT_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, SPLIT_METHODS))}, got {method!r}")
    ratios = _check_ratios(ratios)
    _check_int("seed", seed, low=0)
    if len(rows) == 0:
        raise ValueError(f"cannot split an empty set of interactions ({rows.source or 'no source'})")
    if method != "random" and rows.timestamps is None:
        raise ValueError(
            f"method {method!r} orders rows by time, but {rows.source or 'the data'} has no timestamps"
        )
    user_ids, users = _factorize(rows.users)
    item_ids, items = _factorize(rows.items)
    n_users, n_items, n = len(user_ids), len(item_ids), len(rows)
    keys = np.sort(users * n_items + items)
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError("interactions hold duplicate (user, item) pairs; call to_implicit() first")
    del keys
    # rank[row]: the row's place in a seeded random order (random) or in time order with seeded ties (others);
    # sorting by user * n + rank then groups each user's rows in that order without a slow lexsort.
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n).astype(np.int64)
    if method != "random":
        bits = max(n - 1, 1).bit_length()
        first, last = int(rows.timestamps.min()), int(rows.timestamps.max())
        if last - first < (1 << (62 - bits)):
            by_time = np.argsort(((rows.timestamps - first) << bits) | rank)
        else:
            by_time = np.lexsort((rank, rows.timestamps))
        rank[by_time] = np.arange(n, dtype=np.int64)
        del by_time
    order = np.argsort(users * n + rank)
    del rank
    counts = np.bincount(users, minlength=n_users)
    if method == "leave_one_out":
        n_valid, n_test = (counts >= 3).astype(np.int64), (counts >= 2).astype(np.int64)
    else:
        n_valid, n_test = _ratio_counts(counts, ratios)
    n_train = counts - n_valid - n_test
    sorted_users = users[order]
    rank = np.arange(len(order), dtype=np.int64) - (np.cumsum(counts) - counts)[sorted_users]
    part = (rank >= n_train[sorted_users]).astype(np.int8) + (rank >= (n_train + n_valid)[sorted_users])
    del rank, sorted_users
    parts = []
    for code in range(3):
        index = order[part == code]
        pairs = np.stack([users[index], items[index]], axis=1)
        parts.append(pairs[_pair_order(pairs[:, 0], pairs[:, 1], n_items)])
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
        if not isinstance(self.download, bool):
            raise ValueError(f"download must be a bool, got {self.download!r}")
        threshold = self.rating_threshold
        if threshold is not None and (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
        ):
            raise ValueError(f"rating_threshold must be a finite number or None, got {threshold!r}")
        _check_int("user_core", self.user_core, low=0)
        _check_int("item_core", self.item_core, low=0)
        if self.split not in SPLIT_METHODS:
            raise ValueError(
                f"split must be one of {', '.join(map(repr, SPLIT_METHODS))}, got {self.split!r}"
            )
        object.__setattr__(self, "ratios", _check_ratios(self.ratios))
        _check_int("seed", self.seed, low=0)


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
    return split_interactions(
        rows, method=config.split, ratios=config.ratios, seed=config.seed, description=description
    )


# ----------------------------------------------------------------------------------------------------------------
# BPR sampling


class BPRSampler:
    """Batches of (user, positive item, negative item) for BPR, one pass over the train pairs per epoch.

    Each train pair appears once per epoch in a seeded random order; each gets one negative drawn uniformly from
    all items and redrawn until it is not one of the user's train items. Epoch ``e`` draws from
    ``(seed, e)`` alone, so a resumed run reproduces the same batches.

    Example:
        >>> split = load_split(DataConfig(dataset="synthetic-ml-100k"))
        >>> sampler = BPRSampler(split, batch_size=4096, seed=0)
        >>> users, positives, negatives = next(iter(sampler))
        >>> users.shape, users.dtype
        (torch.Size([4096]), torch.int64)
    """

    def __init__(
        self,
        split: InteractionSplit,
        *,
        batch_size: int = 2048,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        _check_int("batch_size", batch_size, low=1)
        _check_int("seed", seed, low=0)
        if len(split.train) == 0:
            raise ValueError("the split has no train interactions to sample from")
        full = np.flatnonzero(split.train_items.counts() >= split.n_items)
        if len(full):
            raise ValueError(
                f"user {int(full[0])} has every one of the {split.n_items} items as a train positive, so no "
                "negative exists; filter such users out"
            )
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else None
        self._epoch = 0

    def __len__(self) -> int:
        n = len(self.split.train)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(sampler)`` will produce."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next ``iter(sampler)`` produce ``epoch`` (for resuming)."""
        _check_int("epoch", epoch, low=0)
        self._epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The sampler's position, for checkpoints."""
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`; the seed must match."""
        if state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint sampler seed {state.get('seed')!r} differs from this sampler's {self.seed}"
            )
        self.set_epoch(int(state["epoch"]))

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[B]`` uniform items, none of them a train positive of the matching user."""
        train = self.split.train_items
        negatives = rng.integers(0, self.split.n_items, size=len(users), dtype=np.int64)
        redo = np.flatnonzero(train.contains(users, negatives))
        while len(redo):
            negatives[redo] = rng.integers(0, self.split.n_items, size=len(redo), dtype=np.int64)
            redo = redo[train.contains(users[redo], negatives[redo])]
        return negatives

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch: ``(users, positives, negatives)``, each ``[B]`` int64."""
        _check_int("epoch", epoch, low=0)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        train = self.split.train
        order = rng.permutation(len(train))
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            users, positives = train[index, 0], train[index, 1]
            negatives = self.sample_negatives(users, rng)
            tensors = tuple(torch.from_numpy(array) for array in (users, positives, negatives))
            if self.device is not None:
                tensors = tuple(tensor.to(self.device, non_blocking=True) for tensor in tensors)
            yield tensors

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self.iter_epoch(epoch)
