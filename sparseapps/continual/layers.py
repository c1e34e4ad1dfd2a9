"""Task modules: the isolated layers whose weights tasks share through an ownership map, and per-task state.

Every isolated weight has an owner in a ``uint8`` ownership map: a task id, or ``FREE`` (255). While task ``t``
trains, its weights live in the layer's ``weight`` parameter (exact zeros elsewhere; its mask is the
``weight_mask`` buffer, the project's mask convention). When the task ends its weights move into the layer's
``frozen_weight`` buffer, which no optimizer holds. An earlier task's forward pass reads only buffers and frozen
parameters, so nothing it computes can change afterwards.

Forward pass of task ``j`` through an isolated layer:

- the task in training: ``weight`` (strict) or ``weight + frozen_weight`` (forward transfer: every finished
  task's frozen weights are reused, read-only, as in WSN / SpaceNet);
- any other task: ``frozen_weight * (owner == j)`` (strict) or ``frozen_weight * (owner <= j)`` (transfer).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core.validation import check_int

FREE: Final = 255
"""Owner id of a weight no task holds."""
MAX_TASKS: Final = 255
"""Task ids are ``0 .. MAX_TASKS - 1`` so that they fit the ``uint8`` ownership map beside ``FREE``."""


class TaskModule(nn.Module, ABC):
    """A module with state per task; ``active_task`` says which task the next forward pass serves.

    ``frozen_tasks`` (a bool buffer, one entry per task) marks finished tasks: their parameters no longer require
    gradients and modules with running statistics stop updating them.

    Args:
        n_tasks: number of task slots, ``1 .. MAX_TASKS``.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
        self.active_task: int | None = None
        self.register_buffer("frozen_tasks", torch.zeros(n_tasks, dtype=torch.bool))

    @abstractmethod
    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters only ``task`` uses (its bias, its head, its normalization)."""

    def current_task(self) -> int:
        """The active task, checked against the number of slots."""
        task = self.active_task
        if task is None:
            raise RuntimeError(
                f"{type(self).__name__}: no active task; the model's forward must call set_active_task(model, t) "
                "(models built on TaskIsolatedModule do)"
            )
        if not 0 <= task < self.n_tasks:
            raise ValueError(f"task id: expected one in [0, {self.n_tasks}), got {task}")
        return task

    def freeze_task(self, task: int) -> None:
        """Marks ``task`` finished and stops gradients to its own parameters.

        Their ``.grad`` is dropped too: an optimizer still updates a parameter whose gradient is a zero tensor
        (``zero_grad(set_to_none=False)``), by weight decay and by its moments.
        """
        self.frozen_tasks[task] = True
        for param in self.task_parameters(task):
            param.requires_grad_(False)
            param.grad = None


def set_active_task(model: nn.Module, task: int, modules: Sequence[TaskModule] | None = None) -> None:
    """Sets the task every ``TaskModule`` of ``model`` serves in the next forward pass.

    Args:
        model: any module containing task modules.
        task: the task id.
        modules: the task modules of ``model`` when already known (saves walking the module tree).
    """
    for module in modules if modules is not None else task_modules(model):
        module.active_task = task


def task_modules(model: nn.Module) -> list[TaskModule]:
    """Every ``TaskModule`` inside ``model``, in registration order."""
    return [module for module in model.modules() if isinstance(module, TaskModule)]


class IsolatedLayer(TaskModule):
    """Shared weight storage split among tasks by an ownership map, plus a bias per task.

    Buffers: ``owner`` (uint8, ``FREE`` or a task id per weight), ``weight_mask`` (bool, the entries of the task
    in training; the project's mask convention), ``frozen_weight`` (finished tasks' values). The parameter
    ``weight`` holds only the task in training (exact zeros elsewhere).
    """

    weight: nn.Parameter
    biases: nn.ParameterList | None

    def _init_storage(self, shape: tuple[int, ...], out_features: int, fan_in: int, bias: bool) -> None:
        self.fan_in = fan_in
        self.weight = nn.Parameter(torch.zeros(shape))
        self.register_buffer("weight_mask", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("owner", torch.full(shape, FREE, dtype=torch.uint8))
        self.register_buffer("frozen_weight", torch.zeros(shape))
        bound = 1.0 / math.sqrt(fan_in)
        self.biases = (
            nn.ParameterList(
                [nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) for _ in range(self.n_tasks)]
            )
            if bias
            else None
        )
        self.training_task: int | None = None
        self.forward_transfer = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"training_task": self.training_task, "forward_transfer": self.forward_transfer}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.training_task = state["training_task"]
        self.forward_transfer = bool(state["forward_transfer"])

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.biases[task]] if self.biases is not None else []

    def initial_values(self, generator: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fresh weights for a new task, zero outside ``mask``: ``U(-b, b)``, PyTorch's default bound
        ``b = 1/sqrt(fan_in)``, or with ``mask`` the fan-in each output unit has in it, ``b_r = 1/sqrt(nnz_r)``
        (a sparse row then starts at the activation scale of a dense one).

        Args:
            generator: CPU generator of the draw.
            mask: ``[*W]`` bool, the task's weights; None for the dense bound (and no zeros).

        Returns:
            ``[*W]`` values in ``weight``'s dtype and device.
        """
        values = torch.rand(self.weight.shape, generator=generator) * 2.0 - 1.0
        values = values.to(device=self.weight.device, dtype=self.weight.dtype)
        if mask is None:
            return values / math.sqrt(self.fan_in)
        fan_in = mask.reshape(mask.shape[0], -1).sum(dim=1).clamp(min=1).to(values.dtype)
        bound = fan_in.rsqrt().reshape(-1, *([1] * (values.dim() - 1)))
        return values * bound * mask

    def task_weight(self, task: int) -> torch.Tensor:
        """The weight ``task`` computes with: ``[*W]``, same shape as ``weight``."""
        if task == self.training_task:
            return self.weight + self.frozen_weight if self.forward_transfer else self.weight
        visible = self.owner <= task if self.forward_transfer else self.owner == task
        return self.frozen_weight * visible

    def task_bias(self, task: int) -> torch.Tensor | None:
        """The bias of ``task``, ``[out]``, or None."""
        return self.biases[task] if self.biases is not None else None

    @abstractmethod
    def engine_view(self) -> nn.Module:
        """The layer as the core engine selects it: an ``nn.Linear`` / ``nn.Conv2d`` (on the meta device, so no
        storage and no random draw) whose ``weight`` is this layer's parameter and whose ``weight_mask`` is this
        layer's buffer; every change the engine makes is a change of this layer."""

    def _view_of(self, view: nn.Module) -> nn.Module:
        view.weight = self.weight
        view.register_buffer("weight_mask", self.weight_mask)
        return view


class IsolatedLinear(IsolatedLayer):
    """``[*, in] -> [*, out]`` with the weight of the active task (see :class:`IsolatedLayer`).

    Example:
        >>> layer = IsolatedLinear(4, 3, n_tasks=2)
        >>> layer.active_task = 0
        >>> layer(torch.ones(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(self, in_features: int, out_features: int, *, n_tasks: int, bias: bool = True) -> None:
        super().__init__(n_tasks)
        check_int("in_features", in_features, low=1)
        check_int("out_features", out_features, low=1)
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), out_features, in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.current_task()
        return F.linear(x, self.task_weight(task), self.task_bias(task))

    def engine_view(self) -> nn.Module:
        return self._view_of(nn.Linear(self.in_features, self.out_features, bias=False, device="meta"))

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, n_tasks={self.n_tasks}, bias={self.biases is not None}"
        )


class IsolatedConv2d(IsolatedLayer):
    """``[B, C_in, H, W] -> [B, C_out, H', W']`` with the weight of the active task (see :class:`IsolatedLayer`).

    Example:
        >>> layer = IsolatedConv2d(1, 4, 3, n_tasks=2, padding=1)
        >>> layer.active_task = 1
        >>> layer(torch.ones(2, 1, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        n_tasks: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__(n_tasks)
        check_int("in_channels", in_channels, low=1)
        check_int("out_channels", out_channels, low=1)
        check_int("kernel_size", kernel_size, low=1)
        self.stride = check_int("stride", stride, low=1)
        self.padding = check_int("padding", padding, low=0)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self._init_storage(shape, out_channels, in_channels * kernel_size * kernel_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.current_task()
        return F.conv2d(x, self.task_weight(task), self.task_bias(task), self.stride, self.padding)

    def engine_view(self) -> nn.Module:
        view = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=False,
            device="meta",
        )
        return self._view_of(view)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, n_tasks={self.n_tasks}, bias={self.biases is not None}"
        )
