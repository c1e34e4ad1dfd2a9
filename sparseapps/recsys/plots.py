"""The plots of a training run: validation metric per epoch, and embedding size against popularity."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.recsys.config import TrainConfig


def plot_recall_curve(
    runs: Iterable[dict[str, Any]], path: Path, *, metric: str = "recall@20", title: str | None = None
) -> None:
    """Validation ``metric`` against epoch, one line per run (dashed line: where the topology settles)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = [(h["epoch"], h["valid"][metric]) for h in run["history"] if "valid" in h]
        if not points:
            continue
        config = TrainConfig.from_dict(run["config"])
        (line,) = ax.plot(*zip(*points, strict=True), label=config.label(), linewidth=1.4)
        settle = run.get("selection", {}).get("settle_epoch", 0)
        if settle:
            ax.axvline(settle, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title or f"validation {metric} per epoch (dotted: topology frozen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def plot_row_sizes(
    user_sizes: np.ndarray,
    item_sizes: np.ndarray,
    user_popularity: np.ndarray,
    item_popularity: np.ndarray,
    path: Path,
    *,
    title: str = "",
) -> None:
    """Per-row embedding size (active entries) against train popularity, users and items, with binned means."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, sizes, popularity, name in (
        (axes[0], user_sizes, user_popularity, "users"),
        (axes[1], item_sizes, item_popularity, "items"),
    ):
        x = np.asarray(popularity, dtype=np.float64) + 1.0
        y = np.asarray(sizes, dtype=np.float64)
        ax.scatter(x, y, s=4, alpha=0.35)
        edges = np.unique(np.geomspace(1.0, x.max() + 1.0, 16).round())
        which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        means = [
            (np.sqrt(edges[b] * edges[b + 1]), y[which == b].mean())
            for b in range(len(edges) - 1)
            if (which == b).any()
        ]
        if means:
            ax.plot(*zip(*means, strict=True), color="black", linewidth=1.6, label="mean per bin")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"train interactions + 1 ({name})")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: mean size {y.mean():.1f}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("embedding size (active entries in the row)")
    fig.suptitle(title or "embedding size vs popularity")
    save_figure(fig, path, dpi=110)
