"""Parameter isolation: one network holds a sparse subnetwork per task, each trained by the core engine.

The model's isolated layers (:mod:`sparseapps.continual.layers`) share their weights among tasks through an
ownership map (a task id or ``FREE`` per weight). :class:`TaskIsolation` gives each task its weights and trains
them with a :class:`~sparseapps.core.DynamicSparsity` engine of its own, restricted to the task's capacity:

- ``begin_task`` draws the task's weights at random among the free ones (``plan_capacity`` says how many per
  layer, :mod:`sparseapps.continual.capacity`), initializes them (``init_scale``) and attaches an engine to the
  isolated weights with those masks. The engine's growth region is the free weights plus the task's own
  (``set_growth_region``), and a commit hook keeps the ownership map in step with every drop and grow.
- During the task the engine does everything a sparse-from-scratch run does, through its optimizer hooks:
  gradients and weights outside the task's mask are zeroed, topology updates run on schedule with the drop and
  grow criteria of the score registry (a criterion registered with ``scores.register_grow`` works here as it
  does anywhere), dropped entries' optimizer state is cleared.
- ``end_task`` detaches the engine, moves the task's weights into the layers' ``frozen_weight`` buffers (no
  optimizer holds them), deletes their optimizer state and stops gradients to the task's own parameters
  (biases, head, normalization). An earlier task's forward pass reads only buffers and frozen parameters, so
  strict isolation gives a backward transfer of exactly zero, bit for bit.

Example:
    >>> from sparseapps.continual.models import IsolatedMLP
    >>> from sparseapps.core import SparsityConfig
    >>> model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(64, 64))
    >>> config = IsolationConfig(sparsity=SparsityConfig(sparsity=0.8, distribution="uniform", grow="random"))
    >>> isolation = TaskIsolation(model, config)
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> isolation.begin_task(0, optimizer, total_steps=10)
    >>> isolation.capacity()["tasks"][0]["weights"], isolation.capacity()["free"]
    (1638, 6554)
    >>> sorted(isolation.engine.masks)
    ['backbone.1.weight', 'backbone.3.weight']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import nn

from sparseapps.continual.capacity import plan_capacity
from sparseapps.continual.config import CAPACITIES, IsolationConfig
from sparseapps.continual.layers import (
    FREE,
    MAX_TASKS,
    IsolatedConv2d,
    IsolatedLayer,
    IsolatedLinear,
    TaskModule,
    set_active_task,
    task_modules,
)
from sparseapps.core import rules, scoring
from sparseapps.core.engine import DynamicSparsity
from sparseapps.core.validation import check_int

STATE_VERSION: Final = 2
"""Version 2: each task trained by a core engine (its state inside); version 1 held a copy of the engine's loop."""


class TaskIsolation:
    """Per-task sparse subnetworks in one model: allocation, a core engine per task, freezing, accounting.

    Call ``begin_task`` before a task's first step and ``end_task`` when it is done; in between the task's engine
    works through hooks on the optimizer, so the training loop does not change
    (:class:`~sparseapps.continual.plugin.SparseIsolationPlugin` makes both calls inside Avalanche).

    Args:
        model: a model whose trainable parameters all belong to task modules: ``IsolatedLinear`` /
            ``IsolatedConv2d`` weights, and per-task parameters (biases, heads, normalization).
        config: the :class:`IsolationConfig`.
        n_tasks: how many tasks the network must hold; defaults to the smallest ``n_tasks`` of its task modules.

    Attributes:
        engine: the :class:`~sparseapps.core.DynamicSparsity` of the task in training (None between tasks). Its
            tensors are the isolated weights, named ``"<layer>.weight"``; layers where the task owns no weight
            (possible with forward transfer) are left out and their gradients dropped.
        generator: one random stream for allocation, initialization and every engine's topology updates.

    Raises:
        ValueError: no isolated layer, parameters shared by all tasks outside the isolated weights (they would
            drift), ``n_tasks`` above a module's task slots, or a capacity plan that does not fit.
        TypeError: ``model`` or ``config`` of the wrong type.

    Example: see the module docstring.
    """

    def __init__(self, model: nn.Module, config: IsolationConfig, *, n_tasks: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, IsolationConfig):
            raise TypeError(f"config must be an IsolationConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.layers: dict[str, IsolatedLayer] = {
            name: module for name, module in model.named_modules() if isinstance(module, IsolatedLayer)
        }
        if not self.layers:
            raise ValueError(
                f"model must hold IsolatedLinear / IsolatedConv2d layers (sparseapps.continual.layers), got "
                f"{type(model).__name__} with none; build it from sparseapps.continual.models or those layers"
            )
        self.modules = task_modules(model)
        slots = min(module.n_tasks for module in self.modules)
        self.n_tasks = slots if n_tasks is None else check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
        if self.n_tasks > slots:
            raise ValueError(f"n_tasks must be at most {slots} (the model's task slots), got {self.n_tasks}")
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
                f"model must have every trainable parameter isolated or per task, got shared parameters "
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
        seed = config.sparsity.seed
        self.generator = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        )
        self.task_order: list[int] = []
        self.current: int | None = None
        self.engine: DynamicSparsity | None = None
        # Entries active at any time in any task (the ITOP rate over the whole run) and each task's own rate.
        self.explored = {fqn: torch.zeros_like(layer.weight_mask) for fqn, layer in self.layers.items()}
        self.task_itop: list[dict[str, Any]] = []
        self._history: list[dict[str, Any]] = []  # finished tasks' topology updates
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ views
    @property
    def step(self) -> int:
        """Optimizer steps the task in training has taken (0 between tasks)."""
        return self.engine.step if self.engine is not None else 0

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every topology update so far: the engine's record (``UpdateRecord.to_dict``) with the ``task``."""
        current = self.engine.history if self.engine is not None else []
        return self._history + [{"task": self.current, **record} for record in current]

    # ------------------------------------------------------------------ task lifecycle
    def begin_task(self, task: int, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Allocates ``task``'s subnetwork from the free weights and attaches its engine.

        The task's weights are drawn at random among the free ones (``plan[k]`` per layer for the ``k``-th task)
        and initialized by ``IsolatedLayer.initial_values`` (``config.init_scale``); the optimizer state of the
        isolated weights and of the task's own parameters is deleted (fresh moments for the new task).

        Args:
            task: the task id (the experience's task label), ``0 <= task < n_tasks``, not trained before.
            optimizer: the optimizer that updates the model; it must hold the isolated weights.
            total_steps: optimizer steps the task will take (the engine's schedule is a fraction of it).

        Raises:
            ValueError: a bad or repeated task id, more tasks than planned, or missing parameters.
            RuntimeError: another task is still in training.
        """
        task = check_int("task", task, low=0, high=self.n_tasks - 1)
        if self.current is not None:
            raise RuntimeError(
                f"task {self.current} is still in training; call end_task() before task {task}"
            )
        if task in self.task_order:
            raise ValueError(
                f"task must be one not trained before, got {task} (trained: {self.task_order}); its "
                "subnetwork is frozen. Parameter isolation needs one new task label per experience "
                "(a task-incremental stream)"
            )
        if len(self.task_order) >= self.n_tasks:
            raise ValueError(
                f"task {task} is one too many: the capacity was planned for {self.n_tasks} tasks, trained "
                f"{self.task_order}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_int("total_steps", total_steps, low=1)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [fqn for fqn, layer in self.layers.items() if id(layer.weight) not in held]
        if missing:
            raise ValueError(f"optimizer must hold the isolated weights, missing {missing}")
        allocation = self.plan[len(self.task_order)]
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                free = layer.owner == FREE
                n = allocation[fqn]
                if int(free.sum()) < n:
                    raise ValueError(
                        f"capacity: expected {n} free weights in {fqn} for task {task}, got {int(free.sum())}"
                    )
                mask = rules.select_top(scoring.uniform_like(free, self.generator), free, n)
                layer.owner[mask] = task
                layer.weight_mask.copy_(mask)
                if self.config.init_scale == "sparse":
                    layer.weight.copy_(layer.initial_values(self.generator, mask))
                else:
                    layer.weight.copy_(layer.initial_values(self.generator) * mask)
                layer.training_task = task
        self._forget_optimizer_state(optimizer, task)
        self.task_order.append(task)
        self.current = task
        self._attach(optimizer, total_steps)

    def _attach(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """The task's engine on the layers where it owns weights; gradients of the others are dropped."""
        task = self.current
        owned = {fqn: layer for fqn, layer in self.layers.items() if bool(layer.weight_mask.any())}
        self._optimizer = optimizer
        empty = [layer.weight for fqn, layer in self.layers.items() if fqn not in owned]
        if empty:
            self._handles.append(optimizer.register_step_pre_hook(_drop_gradients(empty)))
        if not owned:
            return
        engine = DynamicSparsity(
            _engine_view(owned),
            optimizer,
            self.config.engine_config(),
            total_steps,
            initial_masks={_tensor(fqn): layer.weight_mask for fqn, layer in owned.items()},
        )
        engine.generator = self.generator
        engine.set_growth_region(
            {_tensor(fqn): (layer.owner == FREE) | (layer.owner == task) for fqn, layer in owned.items()}
        )
        engine.commit_hooks.append(self._update_ownership)
        self.engine = engine

    def _update_ownership(self, new_masks: Mapping[str, torch.Tensor]) -> None:
        """The engine's commit hook: dropped entries become free, grown ones the task's."""
        for fqn, layer in self.layers.items():
            new = new_masks.get(_tensor(fqn))
            if new is None:
                continue
            old = layer.weight_mask
            layer.owner[old & ~new] = FREE
            layer.owner[new & ~old] = self.current

    def end_task(self) -> None:
        """Freezes the task in training: its weights move to ``frozen_weight``, its parameters stop training.

        Raises:
            RuntimeError: no task is in training.
        """
        task = self._require_current("end_task")
        self._record_itop(task)
        self._detach()
        with torch.no_grad():
            for layer in self.layers.values():
                mask = layer.weight_mask
                layer.frozen_weight.copy_(torch.where(mask, layer.weight, layer.frozen_weight))
                layer.weight.zero_()
                mask.zero_()
                layer.training_task = None
        for module in self.modules:
            module.freeze_task(task)
        if self._optimizer is not None:
            self._forget_optimizer_state(self._optimizer, task)
        self.current = None
        self._optimizer = None

    def _detach(self) -> None:
        """Removes the engine and the hooks of the task in training (its history is kept)."""
        if self.engine is not None:
            self._history += [{"task": self.current, **record} for record in self.engine.history]
            self.engine.remove()
            self.engine = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

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

    # ------------------------------------------------------------------ accounting
    def _ever_active(self) -> dict[str, torch.Tensor]:
        """The entries of the task in training that were ever active (its masks when the topology is fixed)."""
        if self.engine is None:
            return {}
        ever = self.engine.ever_active or self.engine.masks
        return {fqn: ever[_tensor(fqn)] for fqn in self.layers if _tensor(fqn) in ever}

    def _record_itop(self, task: int) -> None:
        ever = self._ever_active()
        for fqn, mask in ever.items():
            self.explored[fqn] |= mask
        counts = {fqn: int(ever[fqn].sum()) if fqn in ever else 0 for fqn in self.layers}
        total = sum(layer.weight.numel() for layer in self.layers.values())
        self.task_itop.append(
            {
                "task": task,
                "rate": sum(counts.values()) / total,
                "per_layer": {fqn: n / self.layers[fqn].weight.numel() for fqn, n in counts.items()},
            }
        )

    def itop(self) -> dict[str, Any]:
        """The in-time over-parameterization rate (Liu et al. 2021): the fraction of the isolated weights ever
        active, over the whole run and per finished task.

        Returns:
            ``{"overall": rate, "tasks": [{"task", "rate", "per_layer": {fqn: rate}}]}``; ``overall`` counts each
            weight once, whichever tasks held it (the task in training included).
        """
        ever = self._ever_active()
        explored = sum(
            int((mask | ever[fqn]).sum()) if fqn in ever else int(mask.sum())
            for fqn, mask in self.explored.items()
        )
        total = sum(layer.weight.numel() for layer in self.layers.values())
        return {"overall": explored / total, "tasks": [dict(record) for record in self.task_itop]}

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
        """Everything besides the model's own buffers needed to resume bit for bit (the engine's state inside)."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "n_tasks": self.n_tasks,
            "task_order": list(self.task_order),
            "current": self.current,
            "generator": self.generator.get_state(),
            "explored": {fqn: m.cpu().clone() for fqn, m in self.explored.items()},
            "task_itop": [dict(record) for record in self.task_itop],
            "history": list(self._history),
            "engine": self.engine.state_dict() if self.engine is not None else None,
        }

    def load_state_dict(
        self, state: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Restores :meth:`state_dict` (load the model's state_dict first); ``optimizer`` resumes a task mid-way.

        Finished tasks' own parameters stop requiring gradients again (the model's ``frozen_tasks`` buffers say
        which), as ``end_task`` left them.

        Raises:
            ValueError: another version, configuration or number of tasks, or a task in training without
                ``optimizer``.
        """
        version = state.get("version") if isinstance(state, Mapping) else None
        if version != STATE_VERSION:
            raise ValueError(
                f"state must be a TaskIsolation state_dict of version {STATE_VERSION}, got "
                f"{type(state).__name__} of version {version!r}"
                + (
                    " (written before each task ran on the core engine; it cannot be resumed)"
                    if version == 1
                    else ""
                )
            )
        if state["config"] != self.config.to_dict():
            raise ValueError(f"state must have the config {self.config.to_dict()}, got {state['config']}")
        if state["n_tasks"] != self.n_tasks:
            raise ValueError(f"state must have n_tasks={self.n_tasks}, got {state['n_tasks']}")
        if state["current"] is not None and optimizer is None:
            raise ValueError(
                f"optimizer must be the one of task {state['current']}, saved in training, got None"
            )
        self._detach()
        self.task_order = list(state["task_order"])
        self.current = state["current"]
        self.generator.set_state(state["generator"])
        self.explored = {
            fqn: state["explored"][fqn].to(layer.weight_mask.device).clone()
            for fqn, layer in self.layers.items()
        }
        self.task_itop = [dict(record) for record in state["task_itop"]]
        self._history = list(state["history"])
        self._optimizer = None
        if self.current is not None:
            assert optimizer is not None  # checked above
            self._attach(optimizer, int(state["engine"]["total_steps"]) if state["engine"] else 1)
            if self.engine is not None:
                self.engine.load_state_dict(state["engine"])
        for module in self.modules:  # requires_grad is not in a state_dict: the frozen_tasks buffers say it
            for task in module.frozen_tasks.nonzero().flatten().tolist():
                module.freeze_task(task)


def _tensor(fqn: str) -> str:
    """The engine's name of an isolated layer's weight (the parameter's fully qualified name)."""
    return f"{fqn}.weight" if fqn else "weight"


def _engine_view(layers: Mapping[str, IsolatedLayer]) -> nn.Module:
    """A module tree beside the model, with each layer's :meth:`~IsolatedLayer.engine_view` at the layer's path.

    The core engine sparsifies ``nn.Linear`` / ``nn.Conv2d`` weights; the views are those, holding the isolated
    layers' own weight parameters and mask buffers, so the engine trains the model's weights under their own
    names (``"backbone.1.weight"``).
    """
    if "" in layers:  # the model is one isolated layer
        return layers[""].engine_view()
    root = nn.Module()
    for fqn, layer in layers.items():
        parent = root
        *path, name = fqn.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]  # type: ignore[assignment]
        parent.add_module(name, layer.engine_view())
    return root


def _drop_gradients(params: list[nn.Parameter]) -> Any:
    """An optimizer step pre-hook that drops the gradients of ``params`` (layers where the task owns nothing)."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param in params:
            param.grad = None

    return hook


__all__ = [
    "CAPACITIES",
    "FREE",
    "MAX_TASKS",
    "IsolatedConv2d",
    "IsolatedLayer",
    "IsolatedLinear",
    "IsolationConfig",
    "TaskIsolation",
    "TaskModule",
    "plan_capacity",
    "set_active_task",
    "task_modules",
]
