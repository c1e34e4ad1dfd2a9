"""The configurations of continual learning: a task's isolation (:class:`IsolationConfig`) and a whole run
(:class:`ContinualRun`).

An :class:`IsolationConfig` contains the core's :class:`~sparseapps.core.SparsityConfig`: each task's subnetwork
is trained by the core engine with those fields (sparsity, distribution, drop and grow criteria of the score
registry, schedule, seed), and the isolation adds only what is continual: the capacity policy, forward transfer
and the scale of a new task's weights. This module imports neither Avalanche nor a dataset, so the command line
can build its options from these dataclasses without paying for Avalanche's import.

Example:
    >>> config = IsolationConfig(sparsity=SparsityConfig(sparsity=0.9, distribution="uniform", grow="gradient"))
    >>> config.sparsity.density, config.sparsity.grow, config.capacity
    (0.1, 'gradient', 'equal')
    >>> IsolationConfig(sparsity=0.8).sparsity.grow  # a float: the continual default at that sparsity
    'random'
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparseapps.core import scores
from sparseapps.core.config import SparsityConfig
from sparseapps.core.validation import check_bool, check_choice, check_int, check_number

BENCHMARK_NAMES = (
    "split-digits",
    "permuted-digits",
    "rotated-digits",
    "split-mnist",
    "permuted-mnist",
    "split-cifar100",
    "split-mnist1d",
    "permuted-mnist1d",
)
"""Every benchmark :func:`~sparseapps.continual.benchmarks.make_benchmark` builds."""
DEFAULT_N_TASKS = {
    "split-digits": 5,
    "permuted-digits": 10,
    "rotated-digits": 5,
    "split-mnist": 5,
    "permuted-mnist": 10,
    "split-cifar100": 10,
    "split-mnist1d": 5,
    "permuted-mnist1d": 10,
}
Capacity = Literal["equal", "redistribute", "free"]
CAPACITIES = ("equal", "redistribute", "free")
INIT_SCALES = ("sparse", "dense")
METHODS = ("dst", "static")
"""The core methods a task can be trained with: drop/grow updates, or its allocation kept fixed."""
# SparsityConfig fields whose other values the isolation cannot honor, and why.
_UNSUPPORTED = {
    "redistribution": "it moves a task's budget across layers, which the capacity plan fixes per layer",
    "constant_fan_in": "SRigL's updates do not respect the free capacity",
    "n_m": "N:M groups regrow inside themselves, where the free capacity may have no room",
    "ablation_threshold": "SRigL's updates do not respect the free capacity",
    "rescale_initialization": "a new task's weights are initialized by init_scale",
    "dense_last_layer": "every isolated layer is shared among the tasks",
    "include": "every isolated layer is shared among the tasks",
    "exclude": "every isolated layer is shared among the tasks",
    "module_types": "the isolated layers are the IsolatedLinear / IsolatedConv2d of the model",
}


def continual_sparsity(sparsity: float) -> SparsityConfig:
    """The default per-task training at ``sparsity``: the core's defaults with random growth (Yildirim et al.'s
    continual DST default; the core defaults to RigL's gradient growth)."""
    return SparsityConfig(sparsity=sparsity, grow="random")


@dataclass(frozen=True, kw_only=True)
class IsolationConfig:
    """How each task's sparse subnetwork is allocated and trained.

    Example:
        >>> config = IsolationConfig(sparsity=SparsityConfig(sparsity=0.8, grow="momentum"), capacity="free")
        >>> config.to_dict()["sparsity"]["grow"], config.engine_config().dense_first_layer
        ('momentum', False)
    """

    sparsity: SparsityConfig = field(
        default_factory=lambda: continual_sparsity(0.9),
        metadata={
            "help": "each task's sparse training, the core's SparsityConfig: sparsity of the task's own "
            "subnetwork, distribution of its budget over the layers, drop and grow criteria, schedule, seed; "
            "dense_first_layer gives each task the first layer's whole fair share (size // n_tasks). A float "
            "is continual_sparsity(float)"
        },
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

    def __post_init__(self) -> None:
        sparsity: object = self.sparsity
        if isinstance(sparsity, int | float) and not isinstance(sparsity, bool):
            object.__setattr__(self, "sparsity", continual_sparsity(float(sparsity)))
        elif not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"sparsity must be a SparsityConfig or a float, got {sparsity!r}")
        core = self.sparsity
        check_choice("capacity", self.capacity, CAPACITIES)
        check_choice("init_scale", self.init_scale, INIT_SCALES)
        check_bool("forward_transfer", self.forward_transfer)
        check_choice("sparsity.method", core.method, METHODS)
        defaults = SparsityConfig()
        for name, reason in _UNSUPPORTED.items():
            if getattr(core, name) != getattr(defaults, name):
                raise ValueError(
                    f"sparsity.{name} must be {getattr(defaults, name)!r} in continual isolation ({reason}), "
                    f"got {getattr(core, name)!r}"
                )
        if core.grow != "none" and "activations" in scores.get("grow", core.grow).needs:
            raise ValueError(
                f"sparsity.grow must be a criterion that does not read layer activations in continual isolation "
                f"(the isolated layers do not pass theirs to the engine), got {core.grow!r}"
            )
        if core.sparsity == 0.0 and self.capacity == "equal":
            raise ValueError(
                "sparsity.sparsity must be > 0 with capacity='equal' (a dense task leaves nothing to the others), "
                "got 0.0"
            )

    def engine_config(self) -> SparsityConfig:
        """The configuration of the core engine that trains one task.

        ``dense_first_layer`` is the capacity plan's business (the first layer's fair share, still updated by
        drop and grow), not the engine's; the engine's own generator is replaced by the isolation's, so its seed
        is only fixed to spare a draw from torch's global generator.
        """
        core = self.sparsity
        return core.replace(dense_first_layer=False, seed=0 if core.seed is None else core.seed)

    def replace(self, **changes: Any) -> IsolationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (results.json and checkpoints): the sparsity config as its own dict."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "sparsity": self.sparsity.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IsolationConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**values, "sparsity": SparsityConfig.from_dict(values["sparsity"])})


def _default_isolation() -> IsolationConfig:
    return IsolationConfig(sparsity=continual_sparsity(0.9).replace(update_interval=20))


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
    hidden: tuple[int, ...] = field(default=(256, 256), metadata={"help": "MLP hidden widths, e.g. 256,256"})
    channels: tuple[int, ...] = field(
        default=(32, 64), metadata={"help": "CNN convolution channels, e.g. 32,64"}
    )
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
        default_factory=_default_isolation,
        metadata={"help": "the per-task sparse training (a SparsityConfig), capacity policy and transfer"},
    )

    def __post_init__(self) -> None:
        check_choice("benchmark", self.benchmark, BENCHMARK_NAMES)
        if self.n_tasks is not None:
            check_int("n_tasks", self.n_tasks, low=1)
        check_choice("model", self.model, ("mlp", "cnn"))
        for name in ("hidden", "channels"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple | list)
                or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            ):
                raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        check_int("cnn_hidden", self.cnn_hidden, low=1)
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_int("seed", self.seed, low=0, high=2**32 - 1)
        if self.threads is not None:
            check_int("threads", self.threads, low=1)
        check_bool("batch_norm", self.batch_norm)
        check_bool("task_agnostic", self.task_agnostic)
        if not isinstance(self.isolation, IsolationConfig):
            raise TypeError(f"isolation must be an IsolationConfig, got {type(self.isolation).__name__}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}"
            ) from error

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (results.json)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "isolation": self.isolation.to_dict()}

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


__all__ = [
    "BENCHMARK_NAMES",
    "CAPACITIES",
    "DEFAULT_N_TASKS",
    "ContinualRun",
    "IsolationConfig",
    "continual_sparsity",
]
