"""Resuming a continual run bit for bit: the measured record, the batch order, and the checkpoint plugin.

A resumed run is bitwise equal to an uninterrupted one. The design: the training batches of a task are a pure
function of ``(seed, experience, epoch)`` (:class:`TrainingOrder`: the strategy draws each epoch's order from a
generator seeded by them, never from the global one), so a task can start at any step: the epochs before the
saved step yield no batch and the epoch in progress starts at the saved batch. The task starts as usual
(Avalanche adapts the model and optimizer, the plugin allocates the task), then, at its first remaining
iteration, model, optimizer, isolation state (masks, ownership, the task's engine: step, generator, momentum,
history), evaluator state and the random states of torch, numpy and Python are overwritten with the saved ones
(:class:`Checkpoints`). A checkpoint written between tasks is restored before the next task starts.

These are the pieces :func:`~sparseapps.continual.train.run_continual` assembles; the checkpoint's file format is
:mod:`sparseapps.continual.checkpoint`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.utils.data_loader import collate_from_data_or_kwargs
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting
from avalanche.training import Naive
from torch.utils.data import DataLoader, Sampler

from sparseapps.continual.checkpoint import FORMAT, VERSION, rng_state, set_rng_state
from sparseapps.continual.plugin import SparseIsolationPlugin
from sparseapps.core.io import CorruptFileError, save_torch


@dataclass
class Record:
    """What a run has measured so far; every checkpoint holds it (``task_started`` excepted)."""

    accuracy_matrix: list[list[float | None]]
    train_seconds: list[float]
    avalanche: dict[str, float]
    task_elapsed_seconds: float = 0.0  # wall clock: seconds the unfinished task ran before the resume
    task_started: float = 0.0  # time.perf_counter() at the start of the task in training, less the above

    @classmethod
    def empty(cls, n_tasks: int) -> Record:
        return cls([[None] * n_tasks for _ in range(n_tasks)], [], {})

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any], n_tasks: int) -> Record:
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


class TrainingOrder(Sampler[int]):
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


class ResumableNaive(Naive):
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
        order = TrainingOrder(
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


class Checkpoints(SupervisedPlugin):
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
            self.record = Record.empty(n_tasks) if saved is None else Record.from_checkpoint(saved, n_tasks)
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
        if not isinstance(strategy, ResumableNaive):
            raise TypeError(
                f"strategy: expected one that can start a task mid-way (ResumableNaive), got "
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


__all__ = ["Checkpoints", "Record", "ResumableNaive", "TrainingOrder"]
