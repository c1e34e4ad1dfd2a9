"""A continual run from start to finish: benchmark, isolated model, Avalanche ``Naive`` + plugin, results.

``run_continual(ContinualRun(...))`` trains the tasks one after the other, evaluates every task seen so far after
each one (the accuracy matrix ``R[i][j]``: accuracy on task ``j`` after training task ``i``;
:mod:`sparseapps.continual.loop`), and returns a plain dict that :func:`write_results` stores as ``results.json``
with two plots (:mod:`sparseapps.continual.plots`).

Output directory, checkpoints and resume (``run_continual(run, out=...)``, ``sparseapps continual run --out``):
the directory is claimed with :func:`sparseapps.core.io.claim_output` (``sparseapps-run.json`` records the
tool and :meth:`ContinualRun.settings`), so a run never writes over another run's files, nor over its own
results unless asked (``resume``: continue it, or reuse its results when it finished; ``overwrite``: start
afresh). ``checkpoint.pt`` (:mod:`sparseapps.continual.checkpoint`) is written after every task and every
``checkpoint_every`` optimizer steps within one; ``results.json`` is written last, so it marks a finished run. A
resumed run is bitwise equal to an uninterrupted one (:mod:`sparseapps.continual.resume` says how).

Example:
    >>> run = ContinualRun(benchmark="split-digits", epochs=1, hidden=(32, 32),
    ...                    isolation=IsolationConfig(sparsity=SparsityConfig(sparsity=0.8, distribution="uniform",
    ...                                                                      grow="random")))
    >>> result = run_continual(run, progress=False)
    >>> len(result["accuracy_matrix"]), result["bwt"], 0.2 <= result["itop"]["overall"] <= 1.0
    (5, 0.0, True)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparseapps.continual.benchmarks import Benchmark, make_benchmark
from sparseapps.continual.checkpoint import (
    CHECKPOINT,
    DEFAULT_CHECKPOINT_EVERY,
    OUTPUTS,
    RESULTS,
    TOOL,
    read_checkpoint,
)
from sparseapps.continual.config import ContinualRun, IsolationConfig
from sparseapps.continual.loop import (
    check_streams,
    evaluate_task_agnostic,
    stream_metrics,
    train_and_evaluate,
)
from sparseapps.continual.models import IsolatedCNN, IsolatedMLP, IsolatedMultiTaskModule, count_parameters
from sparseapps.continual.plots import plot_accuracy_matrix, plot_capacity, write_results
from sparseapps.continual.plugin import SparseIsolationPlugin, continual_evaluator
from sparseapps.continual.resume import Checkpoints, ResumableNaive
from sparseapps.core.config import SparsityConfig
from sparseapps.core.io import (
    OWNER_FILE,
    CorruptFileError,
    OutputConflictError,
    claim_output,
    load_json,
)
from sparseapps.core.validation import check_bool, check_int


def build_model(run: ContinualRun, benchmark: Benchmark) -> IsolatedMultiTaskModule:
    """The isolated MLP or CNN for ``benchmark`` (a head of ``n_outputs`` per task)."""
    if not benchmark.task_incremental:
        raise ValueError(
            "benchmark: expected a task-incremental benchmark (a task label per experience), got a "
            "class-incremental one; build it with task_incremental=True"
        )
    if run.model == "mlp":
        return IsolatedMLP(
            input_shape=benchmark.input_shape,
            n_outputs=benchmark.n_outputs,
            n_tasks=benchmark.n_tasks,
            hidden=run.hidden,
        )
    return IsolatedCNN(
        input_shape=benchmark.input_shape,
        n_outputs=benchmark.n_outputs,
        n_tasks=benchmark.n_tasks,
        channels=run.channels,
        hidden=run.cnn_hidden,
        batch_norm=run.batch_norm,
    )


def run_continual(
    run: ContinualRun,
    *,
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> dict[str, Any]:
    """Trains and evaluates one :class:`ContinualRun` with Avalanche's ``Naive`` and the isolation plugin.

    Args:
        run: the run.
        progress: show a tqdm bar over tasks.
        out: the output directory: claimed for this run (``sparseapps-run.json``), checkpointed
            (``checkpoint.pt``), and given ``results.json``, ``accuracy_matrix.png`` and ``capacity.png`` at the
            end. None: nothing is written (and nothing can be resumed).
        resume: continue the run of the same settings in ``out`` from its checkpoint, or return its results when
            it finished; an empty or missing ``out`` starts the run.
        overwrite: replace what ``out`` holds (another run, or this one) and start afresh.
        checkpoint_every: optimizer steps between checkpoints within a task (a checkpoint follows every task as
            well); 0: after every task only.

    Returns:
        The results (see the module docstring and :func:`train_and_evaluate`), plus ``run``, ``benchmark``,
        ``model``, ``capacity``, ``itop`` (:meth:`TaskIsolation.itop
        <sparseapps.continual.isolation.TaskIsolation.itop>`: the fraction of the isolated weights ever active,
        overall and per task), ``task_agnostic``, ``topology_updates`` and ``versions``.

    Raises:
        OutputConflictError: ``out`` holds another tool's or other settings' run, or foreign outputs (without
            ``overwrite``), or this run's results or checkpoint (without ``resume`` or ``overwrite``).
        CorruptFileError: the checkpoint or results in ``out`` are damaged (truncated, not this format).
        OutputConflictError: ``out`` holds a run of a sparseapps version before this configuration layout (its
            checkpoint cannot be resumed), without ``overwrite``.
    """
    if not isinstance(run, ContinualRun):
        raise TypeError(f"run must be a ContinualRun, got {type(run).__name__}")
    for name, value in (("progress", progress), ("resume", resume), ("overwrite", overwrite)):
        check_bool(name, value)
    check_int("checkpoint_every", checkpoint_every, low=0)
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite must not both be set, got both; --resume (resume=True) continues the run in the "
            "output directory, --overwrite (overwrite=True) starts it afresh"
        )
    if out is None and (resume or overwrite):
        raise ValueError("out must be an output directory with resume or overwrite, got None")
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    np.random.seed(run.seed)
    random.seed(run.seed)
    benchmark = make_benchmark(
        run.benchmark,
        n_tasks=run.n_tasks,
        seed=run.seed,
        dataset_root=run.dataset_root,
        task_incremental=True,
    )
    model = build_model(run, benchmark)
    isolation = run.isolation
    if isolation.sparsity.seed is None:
        isolation = isolation.replace(sparsity=isolation.sparsity.replace(seed=run.seed))
    plugin = SparseIsolationPlugin(isolation, n_tasks=benchmark.n_tasks)
    plugin.attach(model)  # a capacity plan that does not fit fails here, before anything is written

    checkpoints = None
    if out is not None:
        out = Path(out)
        settings = run.settings()
        if not overwrite:
            _refuse_an_earlier_version(out)
        held = claim_output(out, tool=TOOL, settings=settings, outputs=OUTPUTS, overwrite=overwrite)
        present = [name for name in (RESULTS, CHECKPOINT) if (out / name).exists()]
        saved = None
        if held and present:
            if overwrite:
                for name in OUTPUTS:
                    (out / name).unlink(missing_ok=True)
            elif not resume:
                raise OutputConflictError(
                    f"{out} already holds this run ({out / present[0]}). Nothing was changed. Pass --resume "
                    "(resume=True) to continue it or reuse its results, --overwrite (overwrite=True) to start it "
                    "afresh, or choose another output directory"
                )
            elif RESULTS in present:
                return _finished_results(out)
            else:
                saved = read_checkpoint(out / CHECKPOINT, settings)
        checkpoints = Checkpoints(
            out / CHECKPOINT,
            settings=settings,
            every=checkpoint_every,
            isolation=plugin,
            n_tasks=benchmark.n_tasks,
            saved=saved,
        )
    strategy = ResumableNaive(
        order_seed=run.seed,
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=run.lr),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=run.batch_size,
        train_epochs=run.epochs,
        eval_mb_size=256,
        device=run.device,
        plugins=[plugin] if checkpoints is None else [checkpoints, plugin],
        evaluator=continual_evaluator(),
    )
    result = train_and_evaluate(
        strategy, benchmark, progress=progress, description=run.benchmark, checkpoints=checkpoints
    )
    isolation_state = plugin.attach(model)
    capacity = isolation_state.capacity()
    result.update(
        run=run.to_dict(),
        benchmark={
            "name": benchmark.name,
            "n_tasks": benchmark.n_tasks,
            "classes_per_task": [list(c) for c in benchmark.classes_per_task],
            "input_shape": list(benchmark.input_shape),
            "train_samples": [len(e.dataset) for e in benchmark.train_stream],
            "test_samples": [len(e.dataset) for e in benchmark.test_stream],
        },
        model={
            "kind": run.model,
            "parameters": count_parameters(model),
            "isolated_weights": capacity["total"],
        },
        capacity=capacity,
        itop=isolation_state.itop(),
        topology_updates=len(isolation_state.history),
        versions=_versions(),
    )
    if run.task_agnostic:
        result["task_agnostic"] = evaluate_task_agnostic(
            model, benchmark, isolation_state.task_order, device=run.device
        )
    if out is not None:
        write_results(result, out)
    return result


def _finished_results(out: Path) -> dict[str, Any]:
    """The results of the finished run in ``out`` (its plots written again when one is missing)."""
    path = out / RESULTS
    result = load_json(path, "the results of a finished continual run")
    if not isinstance(result, dict) or not {"accuracy_matrix", "acc", "bwt"} <= set(result):
        raise CorruptFileError(
            f"{path}: expected the results of a continual run (accuracy_matrix, acc, bwt), got another JSON "
            "value; remove it or pass --overwrite (overwrite=True) to run afresh"
        )
    if not all((out / name).exists() for name in OUTPUTS if name.endswith(".png")):
        write_results(result, out)
    return result


def _refuse_an_earlier_version(out: Path) -> None:
    """Refuses a directory holding a run of a version whose IsolationConfig copied the core's fields.

    Its settings (``isolation.growth``, ``isolation.sparsity`` a number) can never equal this version's, and its
    checkpoint holds the state of the isolation's own copy of the engine's loop: it cannot be resumed.
    """
    record = out / OWNER_FILE
    if not record.is_file():
        return
    try:
        saved = load_json(record, "the record of which sparseapps tool and settings wrote this directory")
    except CorruptFileError:
        return  # claim_output names the damaged record
    settings = saved.get("settings") if isinstance(saved, dict) else None
    isolation = settings.get("isolation") if isinstance(settings, dict) else None
    if saved.get("tool") == TOOL and isinstance(isolation, dict) and "growth" in isolation:
        raise OutputConflictError(
            f"{out} holds a run of an earlier sparseapps version ({record} names isolation.growth, now "
            f"isolation.sparsity.grow): this version cannot resume {out / CHECKPOINT} or reuse its results. "
            "Nothing was changed. Choose another output directory, or pass --overwrite (overwrite=True) to start "
            "the run afresh"
        )


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "avalanche-lib", "sparseapps"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


__all__ = [
    "ContinualRun",
    "IsolationConfig",
    "SparsityConfig",
    "build_model",
    "check_streams",
    "evaluate_task_agnostic",
    "plot_accuracy_matrix",
    "plot_capacity",
    "run_continual",
    "stream_metrics",
    "train_and_evaluate",
    "write_results",
]
