"""Parsers of MovieLens ratings files (``u.data``, ``ratings.dat``, ``ratings.csv``) read block by block.

A bad line (cut short, a field that is not a number, a negative or non-integer id) is refused with the file, the
line number, the line and the expected layout.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Literal

import numpy as np

from sparseapps.core.validation import check_choice
from sparseapps.recsys.data.interactions import Interactions

RatingsFormat = Literal["u.data", "dat", "csv"]

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
    check_choice("format", format, _DELIMITERS)
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
