"""Multi-task models for Avalanche: isolated sparse backbones with a head per task, and dense references.

Task-aware models are Avalanche ``MultiTaskModule`` s: ``forward(x, task_labels)`` routes every sample through
its task's subnetwork and head. Task-agnostic inference (no task labels at test time) picks, per sample, the
trained task whose head is most confident (lowest softmax entropy) — reported separately from the task-aware
accuracy, since it is a harder problem.

- :class:`IsolatedMLP` and :class:`IsolatedCNN`: backbones of ``IsolatedLinear`` / ``IsolatedConv2d`` layers for
  :class:`~sparseapps.continual.isolation.TaskIsolation`, per-task biases, per-task heads and (CNN, optional)
  per-task batch normalization, so that nothing is shared that a later task could change.
- :class:`DenseMultiHeadMLP`: one dense backbone shared by all tasks plus a head per task (Naive, EWC, LwF).
- :class:`DensePerTaskMLP`: an independent dense MLP per task (the "one dense model per task" reference).
- :func:`dense_mlp`: a single-head ``nn.Sequential`` (for Avalanche's ``PackNetModel``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import MultiTaskModule
from torch import nn

from sparseapps.continual.layers import (
    MAX_TASKS,
    IsolatedConv2d,
    IsolatedLinear,
    TaskModule,
    set_active_task,
    task_modules,
)
from sparseapps.core.validation import check_bool, check_int


def _check_shape(input_shape: object) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, tuple | list)
        or len(input_shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise ValueError(f"input_shape: expected (C, H, W) of positive integers, got {input_shape!r}")
    return tuple(input_shape)


def _check_hidden(hidden: object) -> tuple[int, ...]:
    if (
        not isinstance(hidden, tuple | list)
        or not hidden
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
    ):
        raise ValueError(f"hidden: expected a non-empty sequence of positive widths, got {hidden!r}")
    return tuple(hidden)


class TaskHeads(TaskModule):
    """A linear head per task: ``[B, in] -> [B, n_outputs]`` with the active task's head.

    Example:
        >>> heads = TaskHeads(8, 2, n_tasks=3)
        >>> heads.active_task = 2
        >>> heads(torch.ones(4, 8)).shape
        torch.Size([4, 2])
    """

    def __init__(self, in_features: int, n_outputs: int, *, n_tasks: int) -> None:
        super().__init__(n_tasks)
        check_int("in_features", in_features, low=1)
        check_int("n_outputs", n_outputs, low=1)
        self.heads = nn.ModuleList(nn.Linear(in_features, n_outputs) for _ in range(n_tasks))

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.current_task()](x)


class TaskBatchNorm2d(TaskModule):
    """Batch normalization with its own affine parameters and running statistics per task.

    A finished (frozen) task always normalizes with its running statistics, even in training mode, so its
    statistics never drift.

    Example:
        >>> norm = TaskBatchNorm2d(4, n_tasks=2)
        >>> norm.active_task = 0
        >>> norm(torch.randn(3, 4, 5, 5)).shape
        torch.Size([3, 4, 5, 5])
    """

    def __init__(self, channels: int, *, n_tasks: int) -> None:
        super().__init__(n_tasks)
        check_int("channels", channels, low=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n_tasks))

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.norms[task].parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.current_task()
        norm = self.norms[task]
        if bool(self.frozen_tasks[task]):
            return F.batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
            )
        return norm(x)


class TaskAwareModule(MultiTaskModule):
    """A ``MultiTaskModule`` with ``n_tasks`` heads of ``n_outputs`` and checked task labels.

    Subclasses implement ``forward_single_task``. ``forward(x, None)`` keeps Avalanche's meaning (a dict of the
    outputs of every task trained so far, used by LwF).
    """

    def __init__(self, *, n_tasks: int, n_outputs: int) -> None:
        super().__init__()
        self.n_tasks = check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
        self.n_outputs = check_int("n_outputs", n_outputs, low=1)
        self.max_class_label = n_outputs

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None) -> torch.Tensor:
        """``[B, C, H, W]`` and task labels ``[B]`` (or one int) -> logits ``[B, n_outputs]``.

        Raises:
            ValueError: task labels of the wrong shape or dtype, or outside ``[0, n_tasks)``.
        """
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int) and not isinstance(task_labels, bool):
            self._check_task(task_labels)
            return self.forward_single_task(x, task_labels)
        if (
            not isinstance(task_labels, torch.Tensor)
            or task_labels.dim() != 1
            or task_labels.dtype.is_floating_point
            or task_labels.dtype == torch.bool
            or len(task_labels) != len(x)
        ):
            got = (
                f"a {task_labels.dtype} tensor of shape {tuple(task_labels.shape)}"
                if isinstance(task_labels, torch.Tensor)
                else repr(task_labels)
            )
            raise ValueError(f"task_labels: expected an integer tensor [B] with B = {len(x)}, got {got}")
        if len(task_labels) == 0:
            return self.forward_single_task(x, 0)
        low, high = int(task_labels.min()), int(task_labels.max())
        self._check_task(low)
        self._check_task(high)
        if low == high:
            return self.forward_single_task(x, low)
        return super().forward(x, task_labels)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.n_tasks:
            raise ValueError(f"task_labels: expected task ids in [0, {self.n_tasks}), got {task}")

    @abstractmethod
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        """``[B, C, H, W] -> [B, n_outputs]`` for one task."""

    def adaptation(self, experience: CLExperience) -> None:
        """Checks that the experience's classes fit a head and its task labels fit the model.

        Raises:
            ValueError: a class label ``>= n_outputs`` or a task label ``>= n_tasks``.
        """
        classes = list(experience.classes_in_this_experience)
        if classes and (min(classes) < 0 or max(classes) >= self.n_outputs):
            raise ValueError(
                f"experience {experience.current_experience}: expected class labels in [0, {self.n_outputs}) "
                f"(one head of {self.n_outputs} outputs per task), got {sorted(classes)}"
            )
        for task in experience.task_labels:
            self._check_task(int(task))
        super().adaptation(experience)

    @torch.no_grad()
    def predict_task_agnostic(
        self, x: torch.Tensor, tasks: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction without task labels: per sample, the task whose head has the lowest softmax entropy.

        Args:
            x: ``[B, C, H, W]`` inputs.
            tasks: the candidate task ids (those trained so far).

        Returns:
            ``(task [B], label [B])``: the inferred task and the label its head predicts.
        """
        if not tasks:
            raise ValueError("tasks: expected at least one candidate task, got none")
        entropies, labels = [], []
        for task in tasks:
            self._check_task(int(task))
            logits = self.forward_single_task(x, int(task))
            log_p = torch.log_softmax(logits, dim=1)
            entropies.append(-(log_p.exp() * log_p).sum(dim=1))
            labels.append(logits.argmax(dim=1))
        best = torch.stack(entropies, dim=1).argmin(dim=1)
        candidates = torch.tensor([int(t) for t in tasks], device=best.device)
        chosen = torch.stack(labels, dim=1).gather(1, best.unsqueeze(1)).squeeze(1)
        return candidates[best], chosen


class IsolatedMultiTaskModule(TaskAwareModule):
    """Base of the isolated models: ``features`` (isolated layers) then the active task's head."""

    heads: TaskHeads

    def __init__(self, *, n_tasks: int, n_outputs: int) -> None:
        super().__init__(n_tasks=n_tasks, n_outputs=n_outputs)
        self._task_modules: list[TaskModule] | None = None

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, F]`` through the isolated layers."""

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        if self._task_modules is None:
            self._task_modules = task_modules(self)
        set_active_task(self, int(task_label), self._task_modules)
        return self.heads(self.features(x))


class IsolatedMLP(IsolatedMultiTaskModule):
    """``[B, C, H, W] -> [B, n_outputs]``: flatten, isolated ReLU layers of widths ``hidden``, a head per task.

    Example:
        >>> model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(32,))
        >>> model(torch.zeros(3, 1, 8, 8), torch.tensor([0, 0, 4])).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_outputs: int,
        n_tasks: int,
        hidden: Sequence[int] = (256, 256),
    ) -> None:
        super().__init__(n_tasks=n_tasks, n_outputs=n_outputs)
        shape, widths = _check_shape(tuple(input_shape)), _check_hidden(tuple(hidden))
        layers: list[nn.Module] = [nn.Flatten()]
        previous = math.prod(shape)
        for width in widths:
            layers += [IsolatedLinear(previous, width, n_tasks=n_tasks), nn.ReLU()]
            previous = width
        self.backbone = nn.Sequential(*layers)
        self.heads = TaskHeads(previous, n_outputs, n_tasks=n_tasks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class IsolatedCNN(IsolatedMultiTaskModule):
    """``[B, C, H, W] -> [B, n_outputs]``: isolated 3x3 convolutions (each followed by optional per-task batch
    normalization, ReLU and 2x2 max pooling while the image is at least 2x2), an isolated hidden layer, a head per
    task.

    Example:
        >>> model = IsolatedCNN(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, channels=(4, 8), hidden=16)
        >>> model(torch.zeros(3, 1, 8, 8), 1).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_outputs: int,
        n_tasks: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(n_tasks=n_tasks, n_outputs=n_outputs)
        (in_channels, height, width), widths = (
            _check_shape(tuple(input_shape)),
            _check_hidden(tuple(channels)),
        )
        check_int("hidden", hidden, low=1)
        check_bool("batch_norm", batch_norm)
        layers: list[nn.Module] = []
        for out_channels in widths:
            layers.append(IsolatedConv2d(in_channels, out_channels, 3, n_tasks=n_tasks, padding=1))
            if batch_norm:
                layers.append(TaskBatchNorm2d(out_channels, n_tasks=n_tasks))
            layers.append(nn.ReLU())
            if height >= 2 and width >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        layers += [
            nn.Flatten(),
            IsolatedLinear(in_channels * height * width, hidden, n_tasks=n_tasks),
            nn.ReLU(),
        ]
        self.backbone = nn.Sequential(*layers)
        self.heads = TaskHeads(hidden, n_outputs, n_tasks=n_tasks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def dense_mlp(
    input_shape: Sequence[int], n_outputs: int, hidden: Sequence[int] = (256, 256)
) -> nn.Sequential:
    """``[B, C, H, W] -> [B, n_outputs]``: a plain single-head MLP (Avalanche's ``PackNetModel`` wraps it)."""
    shape, widths = _check_shape(tuple(input_shape)), _check_hidden(tuple(hidden))
    check_int("n_outputs", n_outputs, low=1)
    layers: list[nn.Module] = [nn.Flatten()]
    previous = math.prod(shape)
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, n_outputs))
    return nn.Sequential(*layers)


class DenseMultiHeadMLP(TaskAwareModule):
    """A dense MLP backbone shared by all tasks and a linear head per task (Naive / EWC / LwF reference).

    Example:
        >>> model = DenseMultiHeadMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=3, hidden=(16,))
        >>> model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).shape
        torch.Size([2, 2])
    """

    def __init__(
        self, *, input_shape: Sequence[int], n_outputs: int, n_tasks: int, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__(n_tasks=n_tasks, n_outputs=n_outputs)
        body = dense_mlp(input_shape, n_outputs, hidden)
        self.backbone = nn.Sequential(*list(body)[:-1])  # without the output layer
        last = _check_hidden(tuple(hidden))[-1]
        self.heads = nn.ModuleList(nn.Linear(last, n_outputs) for _ in range(n_tasks))

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[int(task_label)](self.backbone(x))


class DensePerTaskMLP(TaskAwareModule):
    """An independent dense MLP per task; task ``t`` uses and trains only MLP ``t`` (no sharing, no forgetting).

    Example:
        >>> model = DensePerTaskMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=3, hidden=(16,))
        >>> model(torch.zeros(2, 1, 8, 8), 0).shape
        torch.Size([2, 2])
    """

    def __init__(
        self, *, input_shape: Sequence[int], n_outputs: int, n_tasks: int, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__(n_tasks=n_tasks, n_outputs=n_outputs)
        self.networks = nn.ModuleList(dense_mlp(input_shape, n_outputs, hidden) for _ in range(n_tasks))

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.networks[int(task_label)](x)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (dense storage, every task's slots included)."""
    return sum(p.numel() for p in model.parameters())


def mlp_width_for_parameters(
    budget: int, *, n_inputs: int, n_outputs: int, n_hidden_layers: int, n_networks: int = 1
) -> int:
    """The largest width ``w`` such that ``n_networks`` MLPs ``n_inputs -> w (x n_hidden_layers) -> n_outputs``
    (with biases) hold at most ``budget`` parameters in total.

    Example:
        >>> mlp_width_for_parameters(10 * (64 * 32 + 32 + 32 * 2 + 2), n_inputs=64, n_outputs=2,
        ...                          n_hidden_layers=1, n_networks=10)
        32
    """
    for name, value in (
        ("n_inputs", n_inputs),
        ("n_outputs", n_outputs),
        ("n_hidden_layers", n_hidden_layers),
    ):
        check_int(name, value, low=1)
    check_int("n_networks", n_networks, low=1)

    def size(w: int) -> int:
        per = n_inputs * w + w + (n_hidden_layers - 1) * (w * w + w) + w * n_outputs + n_outputs
        return n_networks * per

    if size(1) > budget:
        raise ValueError(f"budget: expected at least {size(1)} parameters for width 1, got {budget}")
    low, high = 1, 1
    while size(high) <= budget:
        high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if size(middle) <= budget else (low, middle)
    return low
