"""sparseapps.continual: per-task parameter-isolated sparse subnetworks on Avalanche benchmarks.

One network holds a sparse subnetwork per task, each trained by the core engine (``DynamicSparsity``) in the
capacity earlier tasks left free; earlier tasks' weights are frozen, so nothing is forgotten (strict isolation:
BWT exactly 0). An :class:`IsolationConfig` contains the core's ``SparsityConfig``.

Names are imported on first use, so ``import sparseapps.continual.isolation`` (torch only) does not pay for
Avalanche's import.

Example:
    >>> from sparseapps.continual import ContinualRun, IsolationConfig, run_continual
    >>> from sparseapps.core import SparsityConfig
    >>> sparsity = SparsityConfig(sparsity=0.8, distribution="uniform", grow="random")
    >>> result = run_continual(ContinualRun(benchmark="split-digits", epochs=1, hidden=(32, 32),
    ...                        isolation=IsolationConfig(sparsity=sparsity)), progress=False)
    >>> result["bwt"], result["bwt_exact_zero"]
    (0.0, True)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sparseapps.continual.benchmarks": ("BENCHMARK_NAMES", "Benchmark", "make_benchmark"),
    "sparseapps.continual.capacity": ("plan_capacity",),
    "sparseapps.continual.config": ("ContinualRun", "IsolationConfig", "continual_sparsity"),
    "sparseapps.continual.isolation": ("TaskIsolation",),
    "sparseapps.continual.layers": (
        "FREE",
        "IsolatedConv2d",
        "IsolatedLayer",
        "IsolatedLinear",
        "TaskModule",
        "set_active_task",
    ),
    "sparseapps.continual.loop": ("stream_metrics", "train_and_evaluate"),
    "sparseapps.continual.models": (
        "DenseMultiHeadMLP",
        "DensePerTaskMLP",
        "IsolatedCNN",
        "IsolatedMLP",
        "IsolatedMultiTaskModule",
        "TaskAwareModule",
        "TaskBatchNorm2d",
        "TaskHeads",
        "dense_mlp",
    ),
    "sparseapps.continual.plugin": ("SparseIsolationPlugin", "continual_evaluator"),
    "sparseapps.continual.plots": ("write_results",),
    "sparseapps.continual.train": ("run_continual",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseapps.continual' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
