"""Summaries of finished runs: one row per method (mean and 95% confidence interval over seeds, ratios to dense,
the networks' ITOP rates), a text table, learning curves, and the finished runs an output directory holds.

Example:
    >>> mean, half_width = mean_confidence_interval([1.0, 2.0, 3.0])
    >>> mean, round(half_width, 3)
    (2.0, 2.484)
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparseapps.core.io import CorruptFileError
from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.core.stats import confidence_half_width
from sparseapps.rl.checkpoints import OtherRunError, differences, read_result, remove_run
from sparseapps.rl.presets import RL_PRESETS
from sparseapps.rl.run_config import METHODS, RECYCLERS, RLRun

__all__ = [
    "SHARED_FIELDS",
    "SUMMARY_OUTPUTS",
    "format_table",
    "mean_confidence_interval",
    "plot_curves",
    "results_on_disk",
    "shared_settings",
    "summarize",
]

# Settings every run written into one train_many output directory shares (what makes its rows comparable).
SHARED_FIELDS = (
    "env",
    "algo",
    "steps",
    "n_envs",
    "eval_every",
    "eval_episodes",
    "drift_parameter",
    "drift_shifts",
    "hyperparameters",
)
# What train_many writes into its directory: the summary and one folder per method label.
_LABELS = (*METHODS, *RL_PRESETS, *(f"dense-{r}" for r in RECYCLERS if r != "none"))  # run folders' names
SUMMARY_OUTPUTS = ("results.json", "curves.png", *_LABELS)


def mean_confidence_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t, ``core.stats``; 0 for one value)."""
    if not values:
        raise ValueError("expected at least one value, got none")
    if len(values) == 1:
        return statistics.fmean(values), 0.0
    return statistics.fmean(values), confidence_half_width(values)


def shared_settings(run: RLRun) -> dict[str, Any]:
    """The settings of ``run`` that every run in one :func:`~sparseapps.rl.train.train_many` directory shares
    (:data:`SHARED_FIELDS`)."""
    values = run.to_dict()
    return {name: values[name] for name in SHARED_FIELDS}


def _mean_itop(runs: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Per network, the mean over seeds of the ITOP rate (None where the runs did not track it)."""
    rates = [r.get("itop_rate") for r in runs]
    if not rates or any(not rate for rate in rates):
        return None
    return {name: statistics.fmean(rate[name] for rate in rates) for name in rates[0]}


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: final return mean and 95% CI over seeds, and ratios to dense in the same results.

    Ratios: ``return_vs_dense`` (mean over mean; for negative returns such as Pendulum's, dense / sparse so that
    above 1 is still better), ``seconds_vs_dense`` (median training seconds), ``flops_vs_dense`` (training FLOPs
    per gradient step, from the engines' masks). ``itop_rate``: per network, the mean over seeds of the fraction
    of weights ever active (dynamic methods).
    """
    labels = list(dict.fromkeys(r["label"] for r in results))
    rows = []
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        mean, half = mean_confidence_interval([r["final_return"] for r in runs])
        rows.append(
            {
                "method": label,
                "seeds": len(runs),
                "final_return": mean,
                "ci95": half,
                "per_seed": [r["final_return"] for r in runs],
                "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "flops_ratio": runs[0]["training_flops"]["ratio"] if "training_flops" in runs[0] else 1.0,
                "density": runs[0].get("density"),
                "itop_rate": _mean_itop(runs),
            }
        )
    dense = next((row for row in rows if row["method"] == "dense"), None)
    for row in rows:
        if dense is None:
            continue
        base = dense["final_return"]
        if base > 0:
            row["return_vs_dense"] = row["final_return"] / base
        elif row["final_return"] < 0:
            row["return_vs_dense"] = base / row["final_return"]
        else:
            row["return_vs_dense"] = None
        row["seconds_vs_dense"] = row["train_seconds"] / dense["train_seconds"]
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table of :func:`summarize`'s rows."""
    header = (
        f"{'method':<14} {'final return (95% CI)':>24} {'vs dense':>9} {'time vs dense':>14} {'FLOPs':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row.get("return_vs_dense")
        seconds = row.get("seconds_vs_dense")
        lines.append(
            f"{row['method']:<14} {row['final_return']:>12.1f} ± {row['ci95']:<9.1f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>9} {'' if seconds is None else f'{seconds:.2f}x':>14} "
            f"{row['flops_ratio']:>7.3f}"
        )
    return "\n".join(lines)


def plot_curves(results: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Learning curves: evaluation return (or training episode return for drifting runs) per method, mean over
    seeds with the range of seeds shaded."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label]
        if all(r["curve"] for r in runs):
            length = min(len(r["curve"]) for r in runs)
            steps = np.array([point[0] for point in runs[0]["curve"][:length]])
            values = np.array([[point[1] for point in r["curve"][:length]] for r in runs])
        else:
            steps = np.linspace(0, runs[0]["timesteps"], 41)[1:]
            values = np.array([_binned(r["episodes"], steps) for r in runs])
        mean = np.nanmean(values, axis=0)
        line = ax.plot(steps, mean, label=label, linewidth=2.2 if label == "dense" else 1.5)[0]
        ax.fill_between(
            steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.15, color=line.get_color()
        )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _binned(episodes: Sequence[Sequence[float]], edges: np.ndarray) -> np.ndarray:
    """Mean training-episode return in each window ending at ``edges`` (NaN where no episode ended)."""
    values = np.full(len(edges), np.nan)
    start = 0.0
    for index, end in enumerate(edges):
        inside = [e[1] for e in episodes if start < e[0] <= end]
        if inside:
            values[index] = statistics.fmean(inside)
        start = end
    return values


def results_on_disk(
    out: Path, settings: Mapping[str, Any], skip: set[tuple[str, int]], overwrite: bool
) -> list[dict[str, Any]]:
    """The results of runs that finished in ``out`` earlier (other methods or seeds), except the keys in ``skip``.

    Raises:
        CorruptFileError: a result is damaged or of other settings (with ``overwrite``, it is removed instead).
    """
    found = []
    for path in sorted(out.glob("*/seed*/result.json")):
        run_dir = path.parent
        label, seed = run_dir.parent.name, run_dir.name.removeprefix("seed")
        if label not in _LABELS or not seed.isdigit() or (label, int(seed)) in skip:
            continue
        try:
            result = read_result(run_dir)
            if result is None:  # removed since the glob
                continue
            saved = {name: result["run"].get(name) for name in SHARED_FIELDS}
            differ = differences(saved, settings, SHARED_FIELDS)
            if not differ and (result["label"], result["run"].get("seed")) != (label, int(seed)):
                differ = {"label/seed": ((result["label"], result["run"].get("seed")), (label, int(seed)))}
            if differ:
                raise OtherRunError(
                    f"{path} is not a run of this directory's settings (label {label!r}, seed {seed}); (saved, "
                    f"requested) differ in {differ}"
                )
        except (CorruptFileError, OtherRunError) as error:
            if not overwrite:
                raise CorruptFileError(
                    f"{error}. It is part of the summary of {out}; remove {run_dir}, or pass --overwrite "
                    "(overwrite=True) to drop it"
                ) from error
            warnings.warn(f"removing {run_dir}, which cannot be summarized: {error}", stacklevel=3)
            remove_run(run_dir)
            continue
        found.append(result)
    return found
