"""A continual run from start to finish: benchmark, isolated model, Avalanche ``Naive`` + plugin, results.

``run_continual(ContinualRun(...))`` trains the tasks one after the other, evaluates every task seen so far after
each one (the accuracy matrix ``R[i][j]``: accuracy on task ``j`` after training task ``i``), and returns a plain
dict that :func:`write_results` stores as ``results.json`` with two plots (the accuracy matrix and the capacity
per task and layer). :func:`train_and_evaluate` is the loop any ``SupervisedTemplate`` can share (the benchmark
script runs Avalanche's Naive, EWC, LwF and PackNet through it).

Metrics (REFERENCES.md): ``ACC = mean_j R[T-1][j]``; ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])``; Avalanche's
forgetting is ``-BWT``. Task-agnostic accuracy (no task labels at test time, task inferred per sample by the
lowest-entropy head) is reported separately.

Output directory, checkpoints and resume (``run_continual(run, out=...)``, ``sparseapps continual run --out``):
the directory is claimed with :func:`sparseapps.core.io.claim_output` (``sparseapps-run.json`` records the
tool and :meth:`ContinualRun.settings`), so a run never writes over another run's files, nor over its own
results unless asked (``resume``: continue it, or reuse its results when it finished; ``overwrite``: start
afresh). ``checkpoint.pt`` (:mod:`sparseapps.continual.checkpoint`) is written after every task and every
``checkpoint_every`` optimizer steps within one; ``results.json`` is written last, so it marks a finished run.

A resumed run is bitwise equal to an uninterrupted one. The design: the training batches of a task are a pure
function of ``(seed, experience, epoch)`` (the strategy draws each epoch's order from a generator seeded by
them, never from the global one), so a task can start at any step: the epochs before the saved step yield
no batch and the epoch in progress starts at the saved batch. The task starts as usual (Avalanche adapts the
model and optimizer, the plugin allocates the task), then, at its first remaining iteration, model, optimizer,
isolation state (masks, ownership, step, generator, momentum), evaluator state and the random states of torch,
numpy and Python are overwritten with the saved ones. A checkpoint written between tasks is restored before the
next task starts.

Example:
    >>> run = ContinualRun(benchmark="split-digits", epochs=1, hidden=(32, 32),
    ...                    isolation=IsolationConfig(sparsity=0.8, distribution="uniform"))
    >>> result = run_continual(run, progress=False)
    >>> len(result["accuracy_matrix"]), result["bwt"]
    (5, 0.0)
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from avalanche.benchmarks.utils.data_loader import collate_from_data_or_kwargs
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting
from avalanche.training import Naive
from torch import nn
from torch.utils.data import DataLoader, Sampler

from sparseapps.continual.benchmarks import BENCHMARK_NAMES, Benchmark, make_benchmark
from sparseapps.continual.checkpoint import (
    CHECKPOINT,
    DEFAULT_CHECKPOINT_EVERY,
    FORMAT,
    OUTPUTS,
    RESULTS,
    TOOL,
    VERSION,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from sparseapps.continual.isolation import IsolationConfig, _check_float, _check_int
from sparseapps.continual.models import (
    IsolatedCNN,
    IsolatedMLP,
    IsolatedMultiTaskModule,
    TaskAwareModule,
    count_parameters,
)
from sparseapps.continual.plugin import SparseIsolationPlugin, continual_evaluator, experience_task
from sparseapps.core.io import (
    CorruptFileError,
    OutputConflictError,
    claim_output,
    load_json,
    save_torch,
    write_atomic,
)
from sparseapps.core.io import write_json as _write_json

_ACCURACY_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task(\d+)/Exp(\d+)$")


@dataclass(frozen=True, kw_only=True)
class ContinualRun:
    """One continual-learning run with per-task isolated sparse subnetworks.

    Example:
        >>> ContinualRun(benchmark="permuted-digits", model="cnn").model
        'cnn'
    """

    benchmark: str = field(default="split-digits", metadata={"help": f"one of {', '.join(BENCHMARK_NAMES)}"})
    n_tasks: int | None = field(
        default=None, metadata={"help": "number of tasks (None: the benchmark's default)"}
    )
    dataset_root: str | None = field(
        default=None, metadata={"help": "folder of the MNIST / CIFAR-100 files (split-mnist, ...)"}
    )
    model: Literal["mlp", "cnn"] = field(default="mlp", metadata={"help": "isolated backbone: mlp or cnn"})
    hidden: tuple[int, ...] = field(default=(256, 256), metadata={"help": "MLP hidden widths"})
    channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "CNN convolution channels"})
    cnn_hidden: int = field(default=128, metadata={"help": "CNN hidden layer width"})
    batch_norm: bool = field(default=False, metadata={"help": "CNN: per-task batch normalization"})
    epochs: int = field(default=10, metadata={"help": "training epochs per task"})
    batch_size: int = field(default=32, metadata={"help": "training mini-batch size"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    seed: int = field(default=0, metadata={"help": "seed of data split, model and masks"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: leave as is)"})
    task_agnostic: bool = field(
        default=True, metadata={"help": "also evaluate without task labels (task inferred per sample)"}
    )
    isolation: IsolationConfig = field(
        default_factory=lambda: IsolationConfig(update_interval=20),
        metadata={"help": "the per-task sparsity, distribution, growth and capacity policy"},
    )

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARK_NAMES:
            raise ValueError(
                f"benchmark: expected one of {', '.join(BENCHMARK_NAMES)}, got {self.benchmark!r}"
            )
        if self.n_tasks is not None:
            _check_int("n_tasks", self.n_tasks, low=1)
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model: expected 'mlp' or 'cnn', got {self.model!r}")
        for name in ("hidden", "channels"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple | list)
                or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            ):
                raise ValueError(f"{name}: expected a non-empty tuple of positive integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check_int("cnn_hidden", self.cnn_hidden, low=1)
        _check_int("epochs", self.epochs, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_float("lr", self.lr, low=0.0, high=math.inf)
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        _check_int("seed", self.seed, low=0, high=2**32 - 1)
        if self.threads is not None:
            _check_int("threads", self.threads, low=1)
        for name in ("batch_norm", "task_agnostic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.isolation, IsolationConfig):
            raise TypeError(f"isolation: expected an IsolationConfig, got {type(self.isolation).__name__}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device: expected a torch device such as 'cpu' or 'cuda', got {self.device!r}"
            ) from error

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (results.json)."""
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """What decides the results, as JSON values: :meth:`to_dict` without ``threads`` and ``device``.

        ``sparseapps-run.json`` and every checkpoint record it; a resume must match it.

        Example:
            >>> sorted(set(ContinualRun().to_dict()) - set(ContinualRun().settings()))
            ['device', 'threads']
        """
        settings = json.loads(json.dumps(self.to_dict()))
        del settings["threads"], settings["device"]
        return settings


def check_streams(benchmark: Benchmark) -> None:
    """Checks that train and test experience ``j`` share one task label and one class set.

    Raises:
        ValueError: different lengths, missing or differing task labels, or different class sets.
    """
    train, test = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(train) != len(test):
        raise ValueError(
            f"streams: expected as many test as train experiences, got {len(test)} and {len(train)}"
        )
    for index, (train_exp, test_exp) in enumerate(zip(train, test, strict=True)):
        train_task, test_task = experience_task(train_exp), experience_task(test_exp)
        if train_task != test_task:
            raise ValueError(
                f"experience {index}: expected one task label in train and test, got {train_task} and {test_task}"
            )
        train_classes = sorted(int(c) for c in train_exp.classes_in_this_experience)
        test_classes = sorted(int(c) for c in test_exp.classes_in_this_experience)
        if train_classes != test_classes:
            raise ValueError(
                f"experience {index} (task {train_task}): expected the same classes in train and test, got "
                f"{train_classes} and {test_classes}"
            )


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


def stream_metrics(matrix: Sequence[Sequence[float | None]]) -> dict[str, float]:
    """ACC, BWT and forgetting of a lower-triangular accuracy matrix ``R[i][j]`` (``j <= i``).

    Example:
        >>> stream_metrics([[0.9, None], [0.8, 0.7]])
        {'acc': 0.75, 'bwt': -0.09999999999999998, 'forgetting': 0.09999999999999998}
    """
    n = len(matrix)
    if n == 0 or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix: expected a square T x T matrix with T >= 1, got {len(matrix)} rows")
    last = [matrix[n - 1][j] for j in range(n)]
    if any(value is None for value in last) or any(matrix[j][j] is None for j in range(n)):
        raise ValueError("matrix: expected R[T-1][j] and R[j][j] for every task j")
    acc = statistics.fmean(float(v) for v in last)  # type: ignore[arg-type]
    bwt = statistics.fmean(last[j] - matrix[j][j] for j in range(n - 1)) if n > 1 else 0.0  # type: ignore[operator]
    return {"acc": acc, "bwt": bwt, "forgetting": -bwt if bwt else 0.0}


def train_and_evaluate(
    strategy: Any,
    benchmark: Benchmark,
    *,
    progress: bool = True,
    description: str = "tasks",
) -> dict[str, Any]:
    """Trains ``strategy`` on each experience and evaluates every seen task after each one.

    Args:
        strategy: an Avalanche ``SupervisedTemplate`` whose evaluator holds experience accuracy (e.g.
            :func:`~sparseapps.continual.plugin.continual_evaluator`).
        benchmark: the benchmark (task-incremental).
        progress: show a tqdm bar over tasks.
        description: the bar's label.

    Returns:
        ``{"accuracy_matrix": R (None above the diagonal), "acc", "bwt", "forgetting", "bwt_exact_zero",
        "train_seconds": [per task], "avalanche": {final stream metrics}}``.
    """
    return _train_and_evaluate(
        strategy, benchmark, progress=progress, description=description, checkpoints=None
    )


def _train_and_evaluate(
    strategy: Any,
    benchmark: Benchmark,
    *,
    progress: bool,
    description: str,
    checkpoints: _Checkpoints | None,
) -> dict[str, Any]:
    """:func:`train_and_evaluate`, starting where ``checkpoints`` left off and checkpointing after every task."""
    from tqdm import tqdm

    check_streams(benchmark)
    n = benchmark.n_tasks
    record = checkpoints.record if checkpoints is not None else _Record.empty(n)
    matrix = record.accuracy_matrix
    start = len(record.train_seconds)
    if checkpoints is not None:
        checkpoints.resume(strategy)
    bar = tqdm(total=n, initial=start, desc=description, unit="task", disable=not progress, leave=False)
    for i in range(start, n):
        record.task_started = time.perf_counter() - record.task_elapsed_seconds
        record.task_elapsed_seconds = 0.0
        strategy.train(benchmark.train_stream[i], eval_streams=[])
        record.train_seconds.append(time.perf_counter() - record.task_started)
        final = strategy.eval(benchmark.test_stream[: i + 1])
        found = {}
        for key, value in final.items():
            match = _ACCURACY_KEY.match(key)
            if match:
                found[int(match.group(2))] = float(value)
        missing = [j for j in range(i + 1) if j not in found]
        if missing:
            raise ValueError(
                f"strategy evaluator: expected experience accuracy (accuracy_metrics(experience=True)) for "
                f"experiences {missing}, got keys {sorted(final)[:5]}"
            )
        for j in range(i + 1):
            matrix[i][j] = found[j]
        record.avalanche = {
            name: float(final[key])
            for name, key in (
                ("stream_forgetting", "StreamForgetting/eval_phase/test_stream"),
                ("stream_bwt", "StreamBWT/eval_phase/test_stream"),
            )
            if key in final
        }
        if checkpoints is not None:
            checkpoints.save(strategy)
        bar.update()
        bar.set_postfix(acc=f"{statistics.fmean(found[j] for j in range(i + 1)):.3f}")
    bar.close()
    metrics = stream_metrics(matrix)
    return {
        "accuracy_matrix": matrix,
        **metrics,
        "bwt_exact_zero": all(matrix[n - 1][j] == matrix[j][j] for j in range(n)),
        "train_seconds": list(record.train_seconds),
        "avalanche": dict(record.avalanche),
    }


# ----------------------------------------------------------------------------------------------- resume


@dataclass
class _Record:
    """What a run has measured so far; every checkpoint holds it (``task_started`` excepted)."""

    accuracy_matrix: list[list[float | None]]
    train_seconds: list[float]
    avalanche: dict[str, float]
    task_elapsed_seconds: float = 0.0  # wall clock: seconds the unfinished task ran before the resume
    task_started: float = 0.0  # time.perf_counter() at the start of the task in training, less the above

    @classmethod
    def empty(cls, n_tasks: int) -> _Record:
        return cls([[None] * n_tasks for _ in range(n_tasks)], [], {})

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any], n_tasks: int) -> _Record:
        record = saved["record"]
        matrix = [list(row) for row in record["accuracy_matrix"]]
        seconds = [float(s) for s in record["train_seconds"]]
        completed, steps = saved["completed"], saved["steps"]
        if (
            len(matrix) != n_tasks
            or any(len(row) != n_tasks for row in matrix)
            or not isinstance(completed, int)
            or not isinstance(steps, int)
            or len(seconds) != completed
            or not 0 <= completed <= n_tasks
            or steps < 0
            or (steps > 0 and completed == n_tasks)
        ):
            raise ValueError(
                f"expected {n_tasks} tasks, a {n_tasks} x {n_tasks} accuracy matrix and a position inside the "
                f"run, got {len(matrix)} rows, {completed} tasks done and {steps} steps into the next"
            )
        return cls(matrix, seconds, dict(record["avalanche"]), float(record["task_elapsed_seconds"]))

    def to_dict(self, *, in_task: bool) -> dict[str, Any]:
        return {
            "accuracy_matrix": [list(row) for row in self.accuracy_matrix],
            "avalanche": dict(self.avalanche),
            "train_seconds": list(self.train_seconds),
            "task_elapsed_seconds": time.perf_counter() - self.task_started if in_task else 0.0,
        }


class _TrainingOrder(Sampler[int]):
    """The sample order of one experience, epoch after epoch, starting at any step.

    Epoch ``e``'s order is ``torch.randperm(n)`` from a generator seeded by ``(seed, experience, e)``; the global
    generators are not used. ``start_steps`` (of ``ceil(n / batch_size)`` batches per epoch) makes the epochs
    before it yield nothing and the epoch it falls in start at its batch, so the remaining batches are exactly
    those an uninterrupted run trains on.
    """

    def __init__(self, n: int, *, seed: int, experience: int, batch_size: int, start_steps: int = 0) -> None:
        self.n, self.seed, self.experience = n, seed, experience
        self.epoch = 0
        self.start_epoch, start_batch = divmod(start_steps, max(1, math.ceil(n / batch_size)))
        self.start_index = start_batch * batch_size

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if epoch < self.start_epoch:
            return iter(())
        seed = int(np.random.SeedSequence([self.seed, self.experience, epoch]).generate_state(1)[0])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        return iter(order[self.start_index :] if epoch == self.start_epoch else order)


class _ResumableNaive(Naive):
    """Avalanche's ``Naive`` whose training batches are a pure function of ``(order_seed, experience, epoch)``.

    ``start_steps`` (set before ``train``) makes the next experience start after that many optimizer steps; it
    applies once. Training data is read in the main process (Avalanche's ``num_workers`` and ``shuffle`` arguments
    of ``train`` are not used).
    """

    def __init__(self, *, order_seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.order_seed = order_seed
        self.start_steps = 0

    def make_train_dataloader(self, **kwargs: Any) -> None:
        dataset = self.adapted_dataset
        order = _TrainingOrder(
            len(dataset),
            seed=self.order_seed,
            experience=int(self.experience.current_experience),
            batch_size=self.train_mb_size,
            start_steps=self.start_steps,
        )
        self.start_steps = 0
        arguments: dict[str, Any] = {}
        collate_from_data_or_kwargs(dataset, arguments)
        self.dataloader = DataLoader(
            dataset,
            batch_size=self.train_mb_size,
            sampler=order,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.order_seed),  # feeds worker seeds only (no workers)
            **arguments,
        )


def _forgetting_metrics(evaluator: Any) -> list[GenericExperienceForgetting]:
    return [m for m in evaluator.metrics if isinstance(m, GenericExperienceForgetting)]


class _Checkpoints(SupervisedPlugin):
    """Writes ``checkpoint.pt`` after every task and every ``every`` optimizer steps within one; resumes from one.

    Put it first in the strategy's plugins (its ``before_training_iteration`` restores a state saved inside a task
    before anything else runs). See the module docstring for why the resume is exact.

    Args:
        path: the checkpoint file.
        settings: the run's settings, saved with every checkpoint.
        every: optimizer steps between checkpoints within a task; 0: after every task only.
        isolation: the strategy's isolation plugin.
        n_tasks: the number of tasks.
        saved: a checkpoint read by :func:`~sparseapps.continual.checkpoint.read_checkpoint`, or None.
    """

    def __init__(
        self,
        path: Path,
        *,
        settings: Mapping[str, Any],
        every: int,
        isolation: SparseIsolationPlugin,
        n_tasks: int,
        saved: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.path, self.settings, self.every, self.isolation = path, dict(settings), every, isolation
        self.steps = 0
        self._saved = saved
        self._pending: Mapping[str, Any] | None = None
        self._start_steps = 0
        try:
            self.record = _Record.empty(n_tasks) if saved is None else _Record.from_checkpoint(saved, n_tasks)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise self._unfit(error) from error

    def _unfit(self, error: Exception) -> CorruptFileError:
        return CorruptFileError(
            f"{self.path} does not fit this run ({type(error).__name__}: {(str(error).splitlines() or [''])[0]:.300}); it "
            "is damaged or was written by another sparseapps version: remove it or pass --overwrite "
            "(overwrite=True) to start the run afresh"
        )

    def resume(self, strategy: Any) -> None:
        """Restores the saved checkpoint now (between tasks), or arranges it for the next task (inside one)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        if saved["steps"] == 0:
            self._restore(strategy, saved, in_task=False)
            return
        if not isinstance(strategy, _ResumableNaive):
            raise TypeError(
                f"strategy: expected one that can start a task mid-way (_ResumableNaive), got "
                f"{type(strategy).__name__}"
            )
        strategy.start_steps = self._start_steps = saved["steps"]
        self._pending = saved

    def _restore(self, strategy: Any, saved: Mapping[str, Any], *, in_task: bool) -> None:
        model, optimizer = strategy.model, strategy.optimizer
        try:
            model.load_state_dict(saved["model"])
            if hasattr(model, "known_train_tasks_labels"):
                model.known_train_tasks_labels = {int(task) for task in saved["known_tasks"]}
            optimizer.load_state_dict(saved["optimizer"])
            self.isolation.load_state_dict(saved["plugin"], model, optimizer if in_task else None)
            metrics = _forgetting_metrics(strategy.evaluator)
            states = saved["evaluator"]
            kinds = [type(m).__name__ for m in metrics]
            if kinds != [state["metric"] for state in states]:
                raise ValueError(f"expected evaluator metrics {kinds}, got {[s['metric'] for s in states]}")
            for metric, state in zip(metrics, states, strict=True):
                metric.forgetting.initial = dict(state["initial"])
                metric.train_exp_id = state["train_exp_id"]
            set_rng_state(saved["rng"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as error:
            raise self._unfit(error) from error

    def save(self, strategy: Any, steps: int = 0) -> None:
        """Writes the checkpoint: after a task (``steps == 0``) or ``steps`` optimizer steps into the next one."""
        model = strategy.model
        state = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "completed": len(self.record.train_seconds),
            "steps": steps,
            "model": model.state_dict(),
            "known_tasks": sorted(int(t) for t in getattr(model, "known_train_tasks_labels", ())),
            "optimizer": strategy.optimizer.state_dict(),
            "plugin": self.isolation.state_dict(),
            "evaluator": [
                {
                    "metric": type(m).__name__,
                    "initial": dict(m.forgetting.initial),
                    "train_exp_id": m.train_exp_id,
                }
                for m in _forgetting_metrics(strategy.evaluator)
            ],
            "record": self.record.to_dict(in_task=steps > 0),
            "rng": rng_state(),
        }
        save_torch(self.path, state)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.steps, self._start_steps = self._start_steps, 0

    def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            saved, self._pending = self._pending, None
            self._restore(strategy, saved, in_task=True)

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.steps += 1
        total = strategy.train_epochs * len(strategy.dataloader)
        if self.every and self.steps % self.every == 0 and self.steps < total:
            self.save(strategy, self.steps)


@torch.no_grad()
def evaluate_task_agnostic(
    model: TaskAwareModule,
    benchmark: Benchmark,
    tasks: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy without task labels: per sample, the task is inferred (lowest-entropy head) among ``tasks``.

    Returns:
        ``{"accuracy": right task and right label, "task_inference_accuracy": right task}`` over all test
        samples of the experiences whose task is in ``tasks``.
    """
    was_training = model.training
    model.eval()
    correct = inferred = total = 0
    for experience in benchmark.test_stream:
        task = experience_task(experience)
        if task not in tasks:
            continue
        loader = DataLoader(experience.dataset.eval(), batch_size=batch_size, shuffle=False)
        for x, y, t in loader:
            x, y, t = x.to(device), y.to(device), t.to(device)
            predicted_task, predicted_label = model.predict_task_agnostic(x, list(tasks))
            right_task = predicted_task == t
            inferred += int(right_task.sum())
            correct += int((right_task & (predicted_label == y)).sum())
            total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError(f"tasks: expected test experiences of tasks {list(tasks)}, found none")
    return {"accuracy": correct / total, "task_inference_accuracy": inferred / total}


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
        ``model``, ``capacity``, ``task_agnostic``, ``topology_updates`` and ``versions``.

    Raises:
        OutputConflictError: ``out`` holds another tool's or other settings' run, or foreign outputs (without
            ``overwrite``), or this run's results or checkpoint (without ``resume`` or ``overwrite``).
        CorruptFileError: the checkpoint or results in ``out`` are damaged (truncated, not this format).
    """
    if not isinstance(run, ContinualRun):
        raise TypeError(f"run: expected a ContinualRun, got {type(run).__name__}")
    for name, value in (("progress", progress), ("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {value!r}")
    _check_int("checkpoint_every", checkpoint_every, low=0)
    if resume and overwrite:
        raise ValueError(
            "resume, overwrite: expected at most one of them, got both; --resume (resume=True) continues the run in "
            "the output directory, --overwrite (overwrite=True) starts it afresh"
        )
    if out is None and (resume or overwrite):
        raise ValueError("out: expected an output directory with resume or overwrite, got None")
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
    isolation = run.isolation if run.isolation.seed is not None else replace(run.isolation, seed=run.seed)
    plugin = SparseIsolationPlugin(isolation, n_tasks=benchmark.n_tasks)
    plugin.attach(model)  # a capacity plan that does not fit fails here, before anything is written

    checkpoints = None
    if out is not None:
        out = Path(out)
        settings = run.settings()
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
        checkpoints = _Checkpoints(
            out / CHECKPOINT,
            settings=settings,
            every=checkpoint_every,
            isolation=plugin,
            n_tasks=benchmark.n_tasks,
            saved=saved,
        )
    strategy = _ResumableNaive(
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
    result = _train_and_evaluate(
        strategy, benchmark, progress=progress, description=f"{run.benchmark}", checkpoints=checkpoints
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


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "avalanche-lib", "sparseapps"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ----------------------------------------------------------------------------------------------- output


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``data`` as indented JSON, atomically (:func:`sparseapps.core.io.write_json`); returns ``path``."""
    path = Path(path)
    _write_json(path, data)
    return path


def plot_accuracy_matrix(matrix: Sequence[Sequence[float | None]], path: str | Path, title: str = "") -> Path:
    """Heat map of ``R[i][j]`` (row: after training task i; column: task j evaluated), values printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_capacity(capacity: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Stacked bars per isolated layer: the share each task owns, and what is free."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


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
    write_json(result, paths["results"])
    return paths
