"""Confidence intervals of means over seeds (Student's t), shared by the benchmarks and the domain summaries.

Example:
    >>> round(confidence_half_width([0.5, 0.7]), 4)  # t(0.975, 1) = 12.706, s = 0.1414, n = 2
    1.2706
    >>> low, high = paired_interval([0.1, 0.2, 0.3])
    >>> round(low, 4), round(high, 4)
    (-0.0484, 0.4484)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = [
    "confidence_half_width",
    "interval_verdict",
    "paired_interval",
    "paired_p_value",
    "standard_error",
    "t_quantile",
]


def t_quantile(confidence: float, degrees: int) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``degrees`` degrees of freedom."""
    if not 0.0 < confidence < 1.0 or degrees < 1:
        raise ValueError(
            f"expected confidence in (0, 1) and degrees >= 1, got {confidence!r} and {degrees!r}"
        )
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, degrees))


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of ``values`` (sample standard deviation over sqrt(n)); NaN for fewer than
    two values.

    Example:
        >>> round(standard_error([0.5, 0.7]), 4)
        0.1
    """
    if len(values) < 2:
        return math.nan
    return statistics.stdev(values) / math.sqrt(len(values))


def confidence_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the ``confidence`` interval of the mean of ``values`` (``n - 1`` degrees of freedom); NaN
    for fewer than two values."""
    if len(values) < 2:
        return math.nan
    # t * s / sqrt(n) in this order: the intervals already reported keep their last bits
    return t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """``(low, high)``: the ``confidence`` interval of the mean of paired ``differences``; None for fewer than two."""
    if len(differences) < 2:
        return None
    mean, half = statistics.fmean(differences), confidence_half_width(differences, confidence)
    return mean - half, mean + half


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean of ``differences`` is 0; NaN for fewer than two, 1.0
    when every difference is 0, 0.0 when they are all equal and not 0.

    Example:
        >>> round(paired_p_value([0.01, 0.02, 0.03, 0.02]), 4)
        0.0163
    """
    if len(differences) < 2:
        return math.nan
    mean, spread = statistics.fmean(differences), statistics.stdev(differences)
    if spread == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (spread / math.sqrt(len(differences)))
    from scipy.stats import t as student

    return float(2 * student.sf(abs(t), len(differences) - 1))


def interval_verdict(
    interval: tuple[float, float] | None,
    above: str = "better",
    below: str = "worse",
    neither: str = "no difference shown",
    missing: str = "n/a",
) -> str:
    """The verdict on a paired difference from its interval: ``above`` when the interval lies above 0, ``below``
    when it lies below, ``neither`` when it holds 0 and ``missing`` when there is none (fewer than two pairs) or
    it is NaN (a NaN difference).

    Example:
        >>> interval_verdict((0.1, 0.3)), interval_verdict((-0.2, 0.1)), interval_verdict(None)
        ('better', 'no difference shown', 'n/a')
        >>> interval_verdict((-0.3, -0.1), above="obs better", below="magnitude better")
        'magnitude better'
    """
    if interval is None or math.isnan(interval[0]) or math.isnan(interval[1]):
        return missing
    low, high = interval
    return above if low > 0 else below if high < 0 else neither
