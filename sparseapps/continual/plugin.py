"""`SparseIsolationPlugin`: per-task sparse subnetworks inside any Avalanche 0.6.0 ``SupervisedTemplate``.

The plugin drives :class:`~sparseapps.continual.isolation.TaskIsolation` from the template's callbacks:

- ``before_training_exp`` (after Avalanche has adapted the model and updated the optimizer): the experience's
  task label starts a task, with ``train_epochs * len(dataloader)`` optimizer steps for its engine's schedule.
  From there the task's :class:`~sparseapps.core.DynamicSparsity` engine works through hooks on the optimizer
  (gradients outside the task's weights zeroed, masks re-applied, topology updated on schedule);
- ``after_training_exp``: the task frozen (engine detached, weights to buffers, optimizer state deleted, own
  parameters frozen);
- ``before_eval_exp``: an evaluated task's classes must be those it was trained on.

Metrics come from Avalanche's ``EvaluationPlugin`` as usual (:func:`continual_evaluator` builds one with
accuracy, forgetting and BWT).

Example:
    >>> import torch
    >>> from avalanche.training import Naive
    >>> from sparseapps.continual.benchmarks import make_benchmark
    >>> from sparseapps.continual.isolation import IsolationConfig
    >>> from sparseapps.continual.models import IsolatedMLP
    >>> from sparseapps.core import SparsityConfig
    >>> benchmark = make_benchmark("split-digits", n_tasks=5)
    >>> model = IsolatedMLP(input_shape=benchmark.input_shape, n_outputs=2, n_tasks=5, hidden=(64, 64))
    >>> sparsity = SparsityConfig(sparsity=0.8, distribution="uniform", grow="random")
    >>> plugin = SparseIsolationPlugin(IsolationConfig(sparsity=sparsity))
    >>> strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
    ...                  train_mb_size=64, train_epochs=1, plugins=[plugin], evaluator=continual_evaluator())
    >>> _ = strategy.train(benchmark.train_stream[0])
    >>> plugin.isolation.capacity()["tasks"][0]["weights"]
    1638
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from torch import nn

from sparseapps.continual.isolation import IsolationConfig, TaskIsolation


def continual_evaluator(loggers: list[Any] | None = None) -> EvaluationPlugin:
    """An ``EvaluationPlugin`` with accuracy, forgetting and BWT per experience and per stream.

    Args:
        loggers: Avalanche loggers; None keeps the metrics in memory only (``strategy.eval`` returns them).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            loggers=loggers if loggers is not None else [],
        )


def experience_task(experience: Any) -> int:
    """The single task label of an experience.

    Raises:
        ValueError: the experience has no task labels, or more than one.
    """
    labels = getattr(experience, "task_labels", None)
    index = getattr(experience, "current_experience", "?")
    if labels is None:
        raise ValueError(
            f"experience {index}: expected task labels (a task-incremental stream, e.g. make_benchmark(..., "
            "task_incremental=True)), got an experience without them"
        )
    labels = sorted({int(label) for label in labels})
    if len(labels) != 1:
        raise ValueError(f"experience {index}: expected exactly one task label, got {labels}")
    return labels[0]


class SparseIsolationPlugin(SupervisedPlugin):
    """Parameter isolation with per-task dynamic sparse training, as an Avalanche plugin.

    Args:
        config: the :class:`IsolationConfig` (default: ERK at 90% sparsity, random growth, strict isolation).
        n_tasks: how many tasks the capacity is planned for; defaults to the model's task slots.

    Attributes:
        isolation: the :class:`TaskIsolation` (built on the first training call, from the strategy's model).
        trained_classes: ``{task: sorted classes}`` seen in training, checked against evaluation experiences.

    Example: see the module docstring.
    """

    def __init__(self, config: IsolationConfig | None = None, *, n_tasks: int | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, IsolationConfig):
            raise TypeError(f"config must be an IsolationConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else IsolationConfig()
        self.n_tasks = n_tasks
        self.isolation: TaskIsolation | None = None
        self.trained_classes: dict[int, list[int]] = {}

    def attach(self, model: nn.Module) -> TaskIsolation:
        """The :class:`TaskIsolation` of ``model``, built on first use.

        Training calls it; call it before training to check the capacity plan (a ``ValueError`` when the tasks do
        not fit) before anything runs.

        Raises:
            ValueError: the plugin has trained tasks on another model, or the capacity plan does not fit.
        """
        if self.isolation is None or self.isolation.model is not model:
            if self.isolation is not None and self.isolation.task_order:
                raise ValueError(
                    "strategy.model must be the model the plugin has trained tasks on, got another model"
                )
            self.isolation = TaskIsolation(model, self.config, n_tasks=self.n_tasks)
        return self.isolation

    def _isolation(self, strategy: Any) -> TaskIsolation:
        return self.attach(strategy.model)

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state beside the model's own: the isolation's state and the classes each task trained on."""
        return {
            "isolation": None if self.isolation is None else self.isolation.state_dict(),
            "trained_classes": {task: list(classes) for task, classes in self.trained_classes.items()},
        }

    def load_state_dict(
        self, state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Restores :meth:`state_dict` for ``model`` (load the model's ``state_dict`` first).

        Args:
            state: a :meth:`state_dict`.
            model: the model the state belongs to.
            optimizer: the optimizer of the task in training, when the state was saved inside a task.

        Raises:
            ValueError: not a state of this plugin, or one of another configuration or number of tasks.
        """
        if not isinstance(state, Mapping) or not {"isolation", "trained_classes"} <= set(state):
            raise ValueError(
                f"state: expected a SparseIsolationPlugin state_dict (isolation, trained_classes), got {state!r:.80}"
            )
        if state["isolation"] is not None:
            self.attach(model).load_state_dict(state["isolation"], optimizer)
        self.trained_classes = {
            int(task): [int(c) for c in classes] for task, classes in state["trained_classes"].items()
        }

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._isolation(strategy)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        isolation = self._isolation(strategy)
        task = experience_task(strategy.experience)
        total_steps = max(1, int(strategy.train_epochs) * len(strategy.dataloader))
        isolation.begin_task(task, strategy.optimizer, total_steps)
        self.trained_classes[task] = sorted(int(c) for c in strategy.experience.classes_in_this_experience)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.isolation is not None and self.isolation.current is not None:
            self.isolation.end_task()

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        task = experience_task(strategy.experience)
        classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        trained = self.trained_classes.get(task)
        if trained is not None and classes != trained:
            raise ValueError(
                f"experience {strategy.experience.current_experience} (task {task}): expected the classes task "
                f"{task} was trained on, {trained}, got {classes} (inconsistent class sets between train and test)"
            )


__all__ = ["SparseIsolationPlugin", "continual_evaluator", "experience_task"]
