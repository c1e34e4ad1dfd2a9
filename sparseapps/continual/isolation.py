"""Parameter isolation: one network holds a sparse subnetwork per task, found by dynamic sparse training.

Every isolated weight has an owner in a ``uint8`` ownership map: a task id, or ``FREE`` (255). While task ``t``
trains, its weights live in the layer's ``weight`` parameter (exact zeros elsewhere) and drop and grow only among
its own and the free entries; the core's pure pieces do the work: ``target_nnz`` (per-layer budgets from ERK or
uniform), ``rules`` (top-k drop and grow), ``scoring`` (magnitude, random, unfired, gradient, momentum) and
``schedules`` (update steps, drop fraction). When the task ends its weights move into the layer's
``frozen_weight`` buffer, which no optimizer holds, and their optimizer state is deleted; the task's own
parameters (biases, head, normalization) stop requiring gradients. An earlier task's forward pass reads only
buffers and frozen parameters, so nothing it computes can change afterwards: strict isolation gives a backward
transfer of exactly zero, bit for bit.

Forward pass of task ``j`` through an isolated layer:

- the task in training: ``weight`` (strict) or ``weight + frozen_weight`` (forward transfer: every finished
  task's frozen weights are reused, read-only, as in WSN / SpaceNet);
- any other task: ``frozen_weight * (owner == j)`` (strict) or ``frozen_weight * (owner <= j)`` (transfer).

Capacity. Each task's subnetwork gets, per isolated layer, the nnz that ``target_nnz`` gives a network at
``sparsity`` under ``distribution`` (optionally the first layer at its whole fair share, ``size // n_tasks``,
as RigL's uniform keeps the first layer dense). ``IsolationConfig.capacity`` says what happens when the tasks do
not fit:

- ``"equal"``: every task gets exactly its target; ``n_tasks * target > layer size`` is a ``ValueError`` before
  any training (more tasks than the capacity allows).
- ``"redistribute"``: a layer gives a task at most its fair share of what is free (``free // tasks left``) and
  the surplus goes to the other layers by the same distribution; tasks get fewer weights than the target only
  when the whole network cannot hold ``n_tasks`` targets.
- ``"free"``: each layer gives a task ``density_l * free_l`` (the density computed over the free capacity: in
  Yildirim et al.'s code each task draws a fresh mask at the density over the whole network and reuses the
  frozen weights it overlaps, so it adds new weights at that density of the free ones). Nothing is capped: it
  never runs out, later tasks get geometrically fewer new weights, and a layer ERK makes dense is taken whole by
  the first task (later tasks can only reuse it, so that needs ``forward_transfer``; under strict isolation it
  is an error).

Example:
    >>> from sparseapps.continual.models import IsolatedMLP
    >>> model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(64, 64))
    >>> isolation = TaskIsolation(model, IsolationConfig(sparsity=0.8, distribution="uniform"))
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> isolation.begin_task(0, optimizer, total_steps=10)
    >>> isolation.capacity()["tasks"][0]["weights"], isolation.capacity()["free"]
    (1638, 6554)
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import rules, schedules, scoring
from sparseapps.core.config import SparsityConfig
from sparseapps.core.distributions import target_nnz

FREE: Final = 255
"""Owner id of a weight no task holds."""
MAX_TASKS: Final = 255
"""Task ids are ``0 .. MAX_TASKS - 1`` so that they fit the ``uint8`` ownership map beside ``FREE``."""

Capacity = Literal["equal", "redistribute", "free"]
CAPACITIES = ("equal", "redistribute", "free")
GROWTH = ("random", "unfired", "gradient", "momentum", "none")
DROPS = ("magnitude", "random")
DISTRIBUTIONS = ("erk", "uniform", "er")
STATE_VERSION = 1


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an integer {bound}, got {value!r}")
    return value


def _check_float(name: str, value: object, *, low: float, high: float, high_closed: bool = True) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low or value > high or (value == high and not high_closed):
        bracket = "]" if high_closed else ")"
        raise ValueError(f"{name}: expected a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class IsolationConfig:
    """How each task's sparse subnetwork is allocated and trained.

    Example:
        >>> config = IsolationConfig(sparsity=0.9, distribution="uniform", growth="gradient")
        >>> config.density, config.sparsity_config().grow
        (0.1, 'gradient')
    """

    sparsity: float = field(
        default=0.9,
        metadata={"help": "fraction of zeros of each task's own subnetwork over the isolated layers"},
    )
    distribution: Literal["erk", "uniform", "er"] = field(
        default="erk", metadata={"help": "per-layer split of each task's budget: erk, uniform or er"}
    )
    dense_first_layer: bool = field(
        default=False,
        metadata={"help": "the first isolated layer gives each task its whole fair share (size // n_tasks)"},
    )
    capacity: Capacity = field(
        default="equal",
        metadata={
            "help": "when tasks do not fit: equal (error), redistribute (fair share per layer, surplus to the "
            "other layers) or free (density over the free weights)"
        },
    )
    forward_transfer: bool = field(
        default=False,
        metadata={"help": "tasks reuse earlier tasks' frozen weights read-only (False: strict separation)"},
    )
    init_scale: Literal["sparse", "dense"] = field(
        default="sparse",
        metadata={
            "help": "new weights U(-b, b): sparse b = 1/sqrt(the unit's nonzero fan-in), dense b = 1/sqrt(fan_in)"
        },
    )
    drop: Literal["magnitude", "random"] = field(
        default="magnitude", metadata={"help": "which of the task's own weights a topology update drops"}
    )
    growth: Literal["random", "unfired", "gradient", "momentum", "none"] = field(
        default="random",
        metadata={"help": "which free weights are grown: random, unfired, gradient, momentum, none (static)"},
    )
    drop_fraction: float = field(
        default=0.3, metadata={"help": "fraction of a layer's nnz dropped at step 0"}
    )
    drop_schedule: Literal["constant", "cosine", "linear"] = field(
        default="cosine", metadata={"help": "decay of the drop fraction over a task"}
    )
    update_interval: int = field(default=100, metadata={"help": "optimizer steps between topology updates"})
    end_fraction: float = field(
        default=0.75, metadata={"help": "fraction of a task's steps after which its topology is fixed"}
    )
    momentum: float = field(
        default=0.9, metadata={"help": "decay of the dense-gradient average used by momentum growth"}
    )
    tie_noise: float = field(default=1e-5, metadata={"help": "relative noise that breaks score ties"})
    seed: int | None = field(
        default=None, metadata={"help": "seed of masks and new weights (None: from torch)"}
    )

    def __post_init__(self) -> None:
        _check_float("sparsity", self.sparsity, low=0.0, high=1.0, high_closed=False)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("capacity", self.capacity, CAPACITIES)
        _check_choice("init_scale", self.init_scale, ("sparse", "dense"))
        _check_choice("drop", self.drop, DROPS)
        _check_choice("growth", self.growth, GROWTH)
        for name in ("dense_first_layer", "forward_transfer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        _check_float("drop_fraction", self.drop_fraction, low=0.0, high=1.0)
        _check_choice("drop_schedule", self.drop_schedule, ("constant", "cosine", "linear"))
        _check_int("update_interval", self.update_interval, low=1)
        _check_float("end_fraction", self.end_fraction, low=0.0, high=1.0)
        _check_float("momentum", self.momentum, low=0.0, high=1.0, high_closed=False)
        _check_float("tie_noise", self.tie_noise, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        if self.sparsity == 0.0 and self.capacity == "equal":
            raise ValueError(
                "sparsity: expected > 0 with capacity='equal' (a dense task leaves nothing to the others), got 0.0"
            )

    @property
    def density(self) -> float:
        """Fraction of nonzeros of a task's subnetwork, ``1 - sparsity``."""
        return round(1.0 - self.sparsity, 12)

    def sparsity_config(self) -> SparsityConfig:
        """The core configuration that drives the schedules (update steps and drop fraction) of one task."""
        return SparsityConfig(
            sparsity=self.sparsity if self.sparsity > 0 else 0.5,
            method="static" if self.growth == "none" else "dst",
            distribution=self.distribution,
            drop=self.drop,
            grow=self.growth,
            drop_fraction=self.drop_fraction,
            drop_schedule=self.drop_schedule,
            update_interval=self.update_interval,
            end_fraction=self.end_fraction,
            momentum=self.momentum,
            tie_noise=self.tie_noise,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for results.json and checkpoints)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------- task modules


class TaskModule(nn.Module, ABC):
    """A module with state per task; ``active_task`` says which task the next forward pass serves.

    ``frozen_tasks`` (a bool buffer, one entry per task) marks finished tasks: their parameters no longer require
    gradients and modules with running statistics stop updating them.

    Args:
        n_tasks: number of task slots, ``1 .. MAX_TASKS``.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = _check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
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
        _check_int("in_features", in_features, low=1)
        _check_int("out_features", out_features, low=1)
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), out_features, in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.current_task()
        return F.linear(x, self.task_weight(task), self.task_bias(task))

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
        _check_int("in_channels", in_channels, low=1)
        _check_int("out_channels", out_channels, low=1)
        _check_int("kernel_size", kernel_size, low=1)
        self.stride = _check_int("stride", stride, low=1)
        self.padding = _check_int("padding", padding, low=0)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self._init_storage(shape, out_channels, in_channels * kernel_size * kernel_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.current_task()
        return F.conv2d(x, self.task_weight(task), self.task_bias(task), self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, n_tasks={self.n_tasks}, bias={self.biases is not None}"
        )


# ----------------------------------------------------------------------------------------------- capacity


def _fair_shares(free: Mapping[str, int], tasks_left: int) -> dict[str, int]:
    return {fqn: n // tasks_left for fqn, n in free.items()}


def _capped_distribution(
    shapes: Mapping[str, Sequence[int]], budget: int, caps: Mapping[str, int], distribution: str
) -> dict[str, int]:
    """``budget`` nonzeros split by ``distribution`` with no tensor above its cap; capped tensors' surplus is
    re-split over the others (``target_nnz`` solved again on the rest). Less than ``budget`` when caps bind all."""
    counts: dict[str, int] = {}
    open_fqns = list(shapes)
    while open_fqns:
        rest = budget - sum(counts.values())
        if rest <= 0:
            counts.update({fqn: 0 for fqn in open_fqns})
            break
        if rest >= sum(caps[fqn] for fqn in open_fqns):
            counts.update({fqn: caps[fqn] for fqn in open_fqns})
            break
        total = sum(math.prod(shapes[fqn]) for fqn in open_fqns)
        trial = target_nnz({fqn: shapes[fqn] for fqn in open_fqns}, rest / total, distribution)
        over = [fqn for fqn in open_fqns if trial[fqn] > caps[fqn]]
        if not over:
            counts.update(trial)
            break
        for fqn in over:
            counts[fqn] = caps[fqn]
        open_fqns = [fqn for fqn in open_fqns if fqn not in over]
    return counts


def plan_capacity(
    shapes: Mapping[str, Sequence[int]],
    n_tasks: int,
    config: IsolationConfig,
) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Weights per layer for each task, in the order tasks arrive; a pure function of shapes and the config.

    Args:
        shapes: ``{fqn: shape}`` of the isolated weights, in forward order.
        n_tasks: how many tasks the network must hold.
        config: sparsity, distribution, first-layer option and capacity policy.

    Returns:
        ``(target, plan)``: ``target[fqn]`` is one task's nnz when nothing limits it, ``plan[k][fqn]`` the nnz the
        ``k``-th task gets.

    Raises:
        ValueError: ``capacity='equal'`` and ``n_tasks`` targets exceed a layer (more tasks than the capacity
            allows), or, under strict isolation, a task would get no weight in some layer.

    Example:
        >>> config = IsolationConfig(sparsity=0.5, distribution="uniform", capacity="redistribute")
        >>> plan_capacity({"a": (4, 10)}, 3, config)
        ({'a': 20}, [{'a': 13}, {'a': 13}, {'a': 14}])
    """
    n_tasks = _check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
    if not shapes:
        raise ValueError("shapes: expected at least one isolated layer, got none")
    sizes = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
    names = list(shapes)
    first = names[0] if config.dense_first_layer else None
    sparse = [fqn for fqn in names if fqn != first]
    density_profile = (
        target_nnz({fqn: shapes[fqn] for fqn in sparse}, config.density, config.distribution)
        if sparse
        else {}
    )
    target = {fqn: sizes[fqn] // n_tasks if fqn == first else density_profile[fqn] for fqn in names}
    # target_nnz rounds each layer to an integer; a target above the fair share by rounding alone
    # (n_tasks x (target - 1) < size) is rounded down so that density 1 / n_tasks fits exactly.
    target = {
        fqn: sizes[fqn] // n_tasks if n * n_tasks > sizes[fqn] and (n - 1) * n_tasks < sizes[fqn] else n
        for fqn, n in target.items()
    }

    plan: list[dict[str, int]] = []
    if config.capacity == "equal":
        over = {fqn: n for fqn, n in target.items() if n * n_tasks > sizes[fqn]}
        if over:
            details = ", ".join(
                f"{fqn}: {n_tasks} x {n} = {n_tasks * n} > {sizes[fqn]}" for fqn, n in over.items()
            )
            raise ValueError(
                f"capacity: expected n_tasks x (weights per task) <= layer size in every isolated layer, got "
                f"{details} ({n_tasks} tasks at sparsity {config.sparsity} with distribution "
                f"{config.distribution!r}); raise the sparsity, use fewer tasks"
                + (", distribution='uniform'" if config.distribution != "uniform" else "")
                + ", or capacity='redistribute' / 'free'"
            )
        plan = [dict(target) for _ in range(n_tasks)]
    else:
        free = dict(sizes)
        budget = sum(target[fqn] for fqn in sparse)
        for k in range(n_tasks):
            caps = _fair_shares(free, n_tasks - k)
            if config.capacity == "redistribute":
                counts = _capped_distribution(
                    {fqn: shapes[fqn] for fqn in sparse}, budget, caps, config.distribution
                )
            else:
                counts = {fqn: round(density_profile[fqn] / sizes[fqn] * free[fqn]) for fqn in sparse}
            if first is not None:
                counts[first] = caps[first]
            allocation = {fqn: counts[fqn] for fqn in names}
            for fqn, n in allocation.items():
                free[fqn] -= n
            plan.append(allocation)
    if not config.forward_transfer:
        for k, allocation in enumerate(plan):
            empty = [fqn for fqn, n in allocation.items() if n == 0]
            if empty:
                raise ValueError(
                    f"capacity: expected every task to get at least one weight in every isolated layer under "
                    f"strict isolation, got none for task #{k} (0-based arrival order) in {empty} with "
                    f"{n_tasks} tasks at sparsity {config.sparsity}, distribution {config.distribution!r}, "
                    f"capacity {config.capacity!r}; lower the sparsity, use fewer tasks or forward_transfer=True"
                )
    return target, plan


# ----------------------------------------------------------------------------------------------- isolation


class TaskIsolation:
    """Per-task sparse subnetworks in one model: allocation, dynamic sparse training, freezing, accounting.

    Call ``begin_task`` before a task's first step, ``before_optimizer_step`` between ``backward()`` and
    ``optimizer.step()``, ``after_optimizer_step`` after it, and ``end_task`` when the task is done
    (:class:`~sparseapps.continual.plugin.SparseIsolationPlugin` does this inside Avalanche).

    Args:
        model: a model whose trainable parameters all belong to task modules: ``IsolatedLinear`` /
            ``IsolatedConv2d`` weights, and per-task parameters (biases, heads, normalization).
        config: the :class:`IsolationConfig`.
        n_tasks: how many tasks the network must hold; defaults to the smallest ``n_tasks`` of its task modules.

    Raises:
        ValueError: no isolated layer, parameters shared by all tasks outside the isolated weights (they would
            drift), ``n_tasks`` above a module's task slots, or a capacity plan that does not fit.
        TypeError: ``model`` or ``config`` of the wrong type.

    Example: see the module docstring.
    """

    def __init__(self, model: nn.Module, config: IsolationConfig, *, n_tasks: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, IsolationConfig):
            raise TypeError(f"config: expected an IsolationConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.layers: dict[str, IsolatedLayer] = {
            name: module for name, module in model.named_modules() if isinstance(module, IsolatedLayer)
        }
        if not self.layers:
            raise ValueError(
                f"model: expected IsolatedLinear / IsolatedConv2d layers (sparseapps.continual.isolation), got "
                f"{type(model).__name__} with none; build it from sparseapps.continual.models or those layers"
            )
        self.modules = task_modules(model)
        slots = min(module.n_tasks for module in self.modules)
        self.n_tasks = slots if n_tasks is None else _check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
        if self.n_tasks > slots:
            raise ValueError(
                f"n_tasks: expected at most {slots} (the model's task slots), got {self.n_tasks}"
            )
        isolated = {id(layer.weight) for layer in self.layers.values()}
        per_task = {
            id(p)
            for module in self.modules
            for task in range(module.n_tasks)
            for p in module.task_parameters(task)
        }
        shared = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in isolated and id(p) not in per_task
        ]
        if shared:
            raise ValueError(
                f"model: expected every trainable parameter to be isolated or per task, got shared parameters "
                f"{shared} that every task would update (they would drift); use IsolatedLinear / IsolatedConv2d, "
                "TaskHeads or TaskBatchNorm2d, or set requires_grad=False"
            )
        for layer in self.layers.values():
            layer.forward_transfer = config.forward_transfer
        shapes = {fqn: tuple(layer.weight.shape) for fqn, layer in self.layers.items()}
        self.target, self.plan = plan_capacity(shapes, self.n_tasks, config)
        short = [
            k
            for k, allocation in enumerate(self.plan)
            if sum(allocation.values()) < sum(self.target.values())
        ]
        if short and config.capacity != "free":
            warnings.warn(
                f"capacity={config.capacity!r}: tasks #{short} (arrival order) get fewer weights than the target "
                f"{sum(self.target.values())} because {self.n_tasks} targets exceed the isolated layers",
                stacklevel=2,
            )
        self.schedule_config = config.sparsity_config()
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.task_order: list[int] = []
        self.current: int | None = None
        self.step = 0
        self.total_steps = 1
        self.history: list[dict[str, Any]] = []
        self.ever_active: dict[str, torch.Tensor] = {}
        self.momentum: dict[str, torch.Tensor] = {}
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._multipliers: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ task lifecycle
    def begin_task(self, task: int, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Allocates ``task``'s subnetwork from the free weights and prepares it for training.

        The task's weights are drawn at random among the free ones (``plan[k]`` per layer for the ``k``-th task)
        and initialized by ``IsolatedLayer.initial_values`` (``config.init_scale``); the optimizer state of the
        isolated weights and of the task's own parameters is deleted (fresh moments for the new task).

        Args:
            task: the task id (the experience's task label), ``0 <= task < n_tasks``, not trained before.
            optimizer: the optimizer that updates the model; it must hold the isolated weights.
            total_steps: optimizer steps the task will take (the DST schedule is a fraction of it).

        Raises:
            ValueError: a bad or repeated task id, more tasks than planned, or missing parameters.
            RuntimeError: another task is still in training.
        """
        task = _check_int("task", task, low=0, high=self.n_tasks - 1)
        if self.current is not None:
            raise RuntimeError(
                f"task {self.current} is still in training; call end_task() before task {task}"
            )
        if task in self.task_order:
            raise ValueError(
                f"task: expected a task not trained before, got {task} (trained: {self.task_order}); its "
                "subnetwork is frozen. Parameter isolation needs one new task label per experience "
                "(a task-incremental stream)"
            )
        if len(self.task_order) >= self.n_tasks:
            raise ValueError(
                f"task: expected at most {self.n_tasks} tasks (the capacity planned), got task {task} after "
                f"{self.task_order}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_int("total_steps", total_steps, low=1)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [fqn for fqn, layer in self.layers.items() if id(layer.weight) not in held]
        if missing:
            raise ValueError(f"optimizer: expected it to hold the isolated weights, missing {missing}")
        allocation = self.plan[len(self.task_order)]
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                free = layer.owner == FREE
                n = allocation[fqn]
                if int(free.sum()) < n:
                    raise ValueError(
                        f"capacity: expected {n} free weights in {fqn} for task {task}, got {int(free.sum())}"
                    )
                scores = scoring.uniform_like(free, self.generator)
                mask = rules.select_top(scores, free, n)
                layer.owner[mask] = task
                layer.weight_mask.copy_(mask)
                if self.config.init_scale == "sparse":
                    layer.weight.copy_(layer.initial_values(self.generator, mask))
                else:
                    layer.weight.copy_(layer.initial_values(self.generator) * mask)
                layer.training_task = task
        self._multipliers.clear()
        self._forget_optimizer_state(optimizer, task)
        self.task_order.append(task)
        self.current = task
        self.step = 0
        self.total_steps = total_steps
        self._optimizer = optimizer
        growth = self.config.growth
        self.ever_active = (
            {fqn: layer.weight_mask.clone() for fqn, layer in self.layers.items()}
            if growth == "unfired"
            else {}
        )
        self.momentum = (
            {fqn: torch.zeros_like(layer.weight) for fqn, layer in self.layers.items()}
            if growth == "momentum"
            else {}
        )
        self._dense_grads.clear()

    def end_task(self) -> None:
        """Freezes the task in training: its weights move to ``frozen_weight``, its parameters stop training.

        Raises:
            RuntimeError: no task is in training.
        """
        task = self._require_current("end_task")
        with torch.no_grad():
            for layer in self.layers.values():
                mask = layer.weight_mask
                layer.frozen_weight.copy_(torch.where(mask, layer.weight, layer.frozen_weight))
                layer.weight.zero_()
                mask.zero_()
                layer.training_task = None
        self._multipliers.clear()
        for module in self.modules:
            module.freeze_task(task)
        if self._optimizer is not None:
            self._forget_optimizer_state(self._optimizer, task)
        self.current = None
        self._optimizer = None
        self._dense_grads.clear()
        self.ever_active = {}
        self.momentum = {}

    def _forget_optimizer_state(self, optimizer: torch.optim.Optimizer, task: int) -> None:
        params = [layer.weight for layer in self.layers.values()]
        params += [p for module in self.modules for p in module.task_parameters(task)]
        for param in params:
            optimizer.state.pop(param, None)

    def _require_current(self, what: str) -> int:
        if self.current is None:
            raise RuntimeError(
                f"{what}: no task in training; call begin_task(task, optimizer, total_steps) first"
            )
        return self.current

    # ------------------------------------------------------------------ per step
    def before_optimizer_step(self) -> None:
        """Keeps the dense gradients a coming topology update needs, then zeroes every gradient outside the task's
        own weights (frozen and free entries never move)."""
        self._require_current("before_optimizer_step")
        upcoming = self.step + 1
        capture = self.config.growth == "gradient" and schedules.is_update_step(
            upcoming, self.schedule_config, self.total_steps
        )
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                grad = layer.weight.grad
                if grad is None:
                    continue
                if capture:
                    self._dense_grads[fqn] = grad.detach().clone()
                if fqn in self.momentum:
                    self.momentum[fqn].mul_(self.config.momentum).add_(grad, alpha=1.0 - self.config.momentum)
                grad.mul_(self._multiplier(fqn, layer))

    def after_optimizer_step(self) -> None:
        """Re-zeroes everything outside the task's weights (weight decay, stale moments) and runs the topology
        update when the schedule says so."""
        self._require_current("after_optimizer_step")
        self.step += 1
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                layer.weight.mul_(self._multiplier(fqn, layer))
        if schedules.is_update_step(self.step, self.schedule_config, self.total_steps):
            self._update_topology()

    def _multiplier(self, fqn: str, layer: IsolatedLayer) -> torch.Tensor:
        """The task's mask in the weight's dtype (multiplying by it is ~10x faster than by a bool mask on CPU);
        cached until the mask changes."""
        multiplier = self._multipliers.get(fqn)
        if multiplier is None:
            multiplier = self._multipliers[fqn] = layer.weight_mask.to(layer.weight.dtype)
        return multiplier

    def _grow_scores(self, fqn: str, layer: IsolatedLayer) -> torch.Tensor:
        growth = self.config.growth
        if growth == "random":
            return scoring.uniform_like(layer.weight_mask, self.generator)
        if growth == "unfired":
            return scoring.unfired(self.ever_active[fqn], self.generator)
        if growth == "gradient":
            grad = self._dense_grads.get(fqn)
            scores = scoring.gradient(grad) if grad is not None else torch.zeros_like(layer.weight)
        else:
            scores = scoring.momentum(self.momentum[fqn])
        return scoring.add_tie_noise(scores, self.config.tie_noise, self.generator)

    def _drop_scores(self, layer: IsolatedLayer) -> torch.Tensor:
        if self.config.drop == "random":
            return scoring.uniform_like(layer.weight_mask, self.generator)
        return scoring.add_tie_noise(scoring.magnitude(layer.weight), self.config.tie_noise, self.generator)

    def _update_topology(self) -> None:
        task = self._require_current("update")
        fraction = schedules.drop_fraction(self.step, self.schedule_config, self.total_steps)
        stats: dict[str, Any] = {"task": task, "step": self.step, "drop_fraction": fraction, "layers": {}}
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                mask = layer.weight_mask
                nnz = int(mask.sum())
                n_drop = min(math.ceil(fraction * nnz), nnz - 1)
                if n_drop <= 0:
                    continue
                old = mask.clone()
                kept = rules.drop(old, self._drop_scores(layer), n_drop)
                candidates = ((layer.owner == FREE) | old) & ~kept
                new_mask = kept | rules.select_top(self._grow_scores(fqn, layer), candidates, n_drop)
                dropped, grown = old & ~new_mask, new_mask & ~old
                layer.owner[dropped] = FREE
                layer.owner[grown] = task
                mask.copy_(new_mask)
                layer.weight.mul_(new_mask)
                if fqn in self.ever_active:
                    self.ever_active[fqn] |= new_mask
                if self._optimizer is not None:
                    for value in self._optimizer.state.get(layer.weight, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == new_mask.shape:
                            value.mul_(new_mask)
                stats["layers"][fqn] = {
                    "dropped": int(dropped.sum()),
                    "grown": int(grown.sum()),
                    "nnz": int(new_mask.sum()),
                }
        self._dense_grads.clear()
        self._multipliers.clear()
        self.history.append(stats)

    # ------------------------------------------------------------------ accounting
    def ownership(self) -> dict[str, torch.Tensor]:
        """``{fqn: uint8 owner map}`` (``FREE`` = 255); the layers' own buffers."""
        return {fqn: layer.owner for fqn, layer in self.layers.items()}

    def capacity(self) -> dict[str, Any]:
        """Weights per task and layer, read from the ownership map.

        Returns:
            ``{"total": N, "free": n, "free_per_layer": {fqn: n}, "target": {fqn: n}, "tasks": [{"task", "order",
            "weights", "fraction", "per_layer", "planned", "visible"}]}``; ``visible`` counts the weights the
            task computes with (its own, plus earlier tasks' under forward transfer).
        """
        total = sum(layer.owner.numel() for layer in self.layers.values())
        counts = {
            fqn: torch.bincount(layer.owner.reshape(-1).long(), minlength=FREE + 1).tolist()
            for fqn, layer in self.layers.items()
        }
        tasks = []
        seen = 0
        for order, task in enumerate(self.task_order):
            per_layer = {fqn: counts[fqn][task] for fqn in self.layers}
            weights = sum(per_layer.values())
            seen += weights
            tasks.append(
                {
                    "task": task,
                    "order": order,
                    "weights": weights,
                    "fraction": weights / total,
                    "per_layer": per_layer,
                    "planned": dict(self.plan[order]),
                    "visible": seen if self.config.forward_transfer else weights,
                }
            )
        free_per_layer = {fqn: counts[fqn][FREE] for fqn in self.layers}
        return {
            "total": total,
            "free": sum(free_per_layer.values()),
            "free_per_layer": free_per_layer,
            "target": dict(self.target),
            "tasks": tasks,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model's own buffers needed to resume bit for bit."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "n_tasks": self.n_tasks,
            "task_order": list(self.task_order),
            "current": self.current,
            "step": self.step,
            "total_steps": self.total_steps,
            "generator": self.generator.get_state(),
            "ever_active": {fqn: m.cpu().clone() for fqn, m in self.ever_active.items()},
            "momentum": {fqn: m.cpu().clone() for fqn, m in self.momentum.items()},
            "history": list(self.history),
        }

    def load_state_dict(
        self, state: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Restores :meth:`state_dict` (load the model's state_dict first); ``optimizer`` resumes a task mid-way.

        Finished tasks' own parameters stop requiring gradients again (the model's ``frozen_tasks`` buffers say
        which), as ``end_task`` left them.

        Raises:
            ValueError: another version, configuration or number of tasks.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state: expected a TaskIsolation state_dict of version {STATE_VERSION}, got {state!r:.80}"
            )
        if state["config"] != self.config.to_dict():
            raise ValueError(f"state: expected the config {self.config.to_dict()}, got {state['config']}")
        if state["n_tasks"] != self.n_tasks:
            raise ValueError(f"state: expected n_tasks={self.n_tasks}, got {state['n_tasks']}")
        self.task_order = list(state["task_order"])
        self.current = state["current"]
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.generator.set_state(state["generator"])
        device = {fqn: layer.weight.device for fqn, layer in self.layers.items()}
        self.ever_active = {fqn: m.to(device[fqn]).clone() for fqn, m in state["ever_active"].items()}
        self.momentum = {fqn: m.to(device[fqn]).clone() for fqn, m in state["momentum"].items()}
        self.history = list(state["history"])
        self._optimizer = optimizer if self.current is not None else None
        self._dense_grads.clear()
        self._multipliers.clear()
        for module in self.modules:  # requires_grad is not in a state_dict: the frozen_tasks buffers say it
            for task in module.frozen_tasks.nonzero().flatten().tolist():
                module.freeze_task(task)
