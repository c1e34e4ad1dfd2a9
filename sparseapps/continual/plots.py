"""The outputs of a continual run: ``results.json`` and its two plots, the accuracy matrix and the capacity.

Example:
    >>> import tempfile
    >>> paths = write_results({"accuracy_matrix": [[1.0]], "acc": 1.0, "bwt": 0.0}, tempfile.mkdtemp())
    >>> sorted(paths)
    ['accuracy_matrix', 'results']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseapps.continual.checkpoint import RESULTS
from sparseapps.core.io import write_json
from sparseapps.core.plotting import pyplot, save_figure


def plot_accuracy_matrix(matrix: Sequence[Sequence[float | None]], path: str | Path, title: str = "") -> Path:
    """Heat map of ``R[i][j]`` (row: after training task i; column: task j evaluated), values printed."""
    plt = pyplot()
    n = len(matrix)
    values = torch.full((n, n), float("nan"))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                values[i, j] = value
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    image = ax.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if matrix[i][j] is not None:
                color = "black" if matrix[i][j] > 0.6 else "white"
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("task evaluated (j)")
    ax.set_ylabel("after training task (i)")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_title(title or "accuracy matrix R[i][j]", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_capacity(capacity: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Stacked bars per isolated layer: the share each task owns, and what is free."""
    plt = pyplot()
    layers = list(capacity["free_per_layer"])
    totals = {
        fqn: capacity["free_per_layer"][fqn] + sum(t["per_layer"][fqn] for t in capacity["tasks"])
        for fqn in layers
    }
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(len(layers), len(capacity["tasks"]) // 3)))
    left = [0.0] * len(layers)
    colors = plt.get_cmap("tab20")
    for index, task in enumerate(capacity["tasks"]):
        shares = [task["per_layer"][fqn] / totals[fqn] for fqn in layers]
        ax.barh(layers, shares, left=left, color=colors(index % 20), label=f"task {task['task']}")
        left = [a + b for a, b in zip(left, shares, strict=True)]
    free = [capacity["free_per_layer"][fqn] / totals[fqn] for fqn in layers]
    ax.barh(layers, free, left=left, color="lightgrey", label="free")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's weights")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or "capacity per task and layer", fontsize=9)
    return save_figure(fig, path)


def write_results(result: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """``results.json``, ``accuracy_matrix.png`` and ``capacity.png`` in ``out`` (created), each atomically.

    The plots are written first: ``results.json`` marks a finished run.
    """
    out = Path(out)
    name = result.get("benchmark", {}).get("name", "")
    paths = {"results": out / RESULTS}
    paths["accuracy_matrix"] = plot_accuracy_matrix(
        result["accuracy_matrix"],
        out / "accuracy_matrix.png",
        title=f"{name}: ACC {result['acc']:.3f}, BWT {result['bwt']:.3f}",
    )
    if "capacity" in result:
        paths["capacity"] = plot_capacity(result["capacity"], out / "capacity.png", title=f"{name}: capacity")
    write_json(paths["results"], result)
    return paths


__all__ = ["plot_accuracy_matrix", "plot_capacity", "write_results"]
