"""The validators every config and entry point of the package uses: one wording, "expected X, got Y"-style.

Each raises ``ValueError`` (``TypeError`` for a value of the wrong kind where noted) naming the field and quoting
the value, and returns the value converted (``int``, ``float``, ``bool``) so a ``__post_init__`` can store it.

Example:
    >>> check_int("epochs", 3, low=1)
    3
    >>> check_number("sparsity", 0.9, low=0.0, high=1.0, high_open=True)
    0.9
    >>> check_choice("distribution", "erx", ("uniform", "erk", "er"))
    Traceback (most recent call last):
    ...
    ValueError: distribution must be one of 'uniform', 'erk', 'er', got 'erx'
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["check_bool", "check_choice", "check_int", "check_number"]


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be an ``int`` (not a ``bool``) in ``[low, high]`` (either bound optional)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):  # type: ignore[operator]
        ok = False
    if not ok:
        bounds = " and ".join(
            part
            for part in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "")
            if part
        )
        raise ValueError(f"{name} must be an integer{' ' + bounds if bounds else ''}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a finite real number (not a ``bool``) within the bounds (open or closed, optional)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value < high if high_open else value <= high  # type: ignore[operator]
    if not ok:
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            bounds = f" {'<' if high_open else '<='} {high:g}"
        else:
            bounds = ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> bool:
    """``value`` must be ``True`` or ``False`` (not ``0``/``1`` or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
