"""Benchmark streams: labeled images turned into Avalanche 0.6.0 scenarios, one experience per task.

:func:`build_split_benchmark` (classes split into tasks), :func:`build_permuted_benchmark` (every task all
classes, its own pixel permutation) and :func:`build_rotated_benchmark` (every task all classes, its own angle)
take :class:`LabeledImages` from any source (:mod:`sparseapps.continual.sources`) and return a
:class:`Benchmark`. See :mod:`sparseapps.continual.benchmarks` for the named benchmarks and the label layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios import (
    CLScenario,
    CLStream,
    benchmark_from_datasets,
    with_classes_timeline,
    with_task_labels,
)
from avalanche.benchmarks.utils import ConstantSequence, DataAttribute, TaskLabels
from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
from torch.utils.data import Dataset

from sparseapps.core.validation import check_bool, check_int


@dataclass(frozen=True, kw_only=True, eq=False)
class LabeledImages:
    """Images and their class labels, the input of the benchmark builders.

    Attributes:
        images: ``[N, C, H, W]``, uint8 or float32; ``images * scale`` is the model's input.
        targets: ``[N]`` int64 class labels, non-negative.
        scale: factor applied to the images on access (``1 / 255`` for uint8 pixels).

    Example:
        >>> data = LabeledImages(images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        ...                      targets=torch.tensor([0, 1, 0, 1]), scale=1 / 255)
        >>> data.n_samples, data.classes
        (4, [0, 1])
    """

    images: torch.Tensor
    targets: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"images: expected a [N, C, H, W] tensor, got {_describe(self.images)}")
        if self.images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images: expected dtype uint8 or float32, got {self.images.dtype}")
        if not isinstance(self.targets, torch.Tensor) or self.targets.dim() != 1:
            raise ValueError(f"targets: expected a [N] tensor, got {_describe(self.targets)}")
        if self.targets.dtype != torch.int64:
            raise ValueError(f"targets: expected dtype int64, got {self.targets.dtype}")
        if len(self.targets) != len(self.images):
            raise ValueError(
                f"targets: expected one label per image ({len(self.images)}), got {len(self.targets)}"
            )
        if len(self.images) == 0:
            raise ValueError("images: expected at least one sample, got 0")
        if int(self.targets.min()) < 0:
            raise ValueError(f"targets: expected non-negative labels, got {int(self.targets.min())}")
        if (
            not isinstance(self.scale, int | float)
            or isinstance(self.scale, bool)
            or not math.isfinite(self.scale)
            or self.scale <= 0
        ):
            raise ValueError(f"scale: expected a finite positive number, got {self.scale!r}")

    @property
    def n_samples(self) -> int:
        """Number of samples ``N``."""
        return len(self.targets)

    @property
    def classes(self) -> list[int]:
        """Sorted distinct labels."""
        return torch.unique(self.targets).tolist()


@dataclass(frozen=True, kw_only=True, eq=False)
class Benchmark:
    """An Avalanche scenario plus what a model needs to know about it.

    Attributes:
        name: the benchmark's name (one of ``BENCHMARK_NAMES`` for ``make_benchmark``).
        scenario: the Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``, one experience per task.
        task_incremental: True when experience ``t`` has task label ``t`` and task-local labels; False when every
            task label is 0 and labels are global (class-incremental).
        input_shape: ``(C, H, W)`` of one sample.
        classes_per_task: ``classes_per_task[t][j]`` is the original class of label ``j`` of task ``t`` (label
            ``t * k + j`` in the class-incremental setting).

    Example:
        >>> from sparseapps.continual.benchmarks import make_benchmark
        >>> benchmark = make_benchmark("permuted-digits", n_tasks=3, task_incremental=False)
        >>> benchmark.n_tasks, benchmark.n_classes_per_task, benchmark.n_outputs
        (3, 10, 30)
    """

    name: str
    scenario: CLScenario
    task_incremental: bool
    input_shape: tuple[int, ...]
    classes_per_task: tuple[tuple[int, ...], ...]

    @property
    def n_tasks(self) -> int:
        """Number of tasks (experiences per stream)."""
        return len(self.classes_per_task)

    @property
    def n_classes_per_task(self) -> int:
        """Number of classes ``k`` in each task."""
        return len(self.classes_per_task[0])

    @property
    def n_outputs(self) -> int:
        """Classifier width: ``k`` per head (task-incremental) or ``n_tasks * k`` for one head."""
        return self.n_classes_per_task if self.task_incremental else self.n_tasks * self.n_classes_per_task

    @property
    def train_stream(self) -> CLStream:
        """The scenario's training stream."""
        return self.scenario.train_stream

    @property
    def test_stream(self) -> CLStream:
        """The scenario's test stream."""
        return self.scenario.test_stream


class _ImageDataset(Dataset):
    """``(x, y)`` pairs from shared image storage: ``x = images[i] * scale``, optionally pixel-permuted."""

    def __init__(
        self, images: torch.Tensor, labels: list[int], *, scale: float, permutation: torch.Tensor | None
    ) -> None:
        self.images = images
        self.labels = labels
        self.scale = scale
        self.permutation = permutation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32, copy=True)
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.permutation is not None:
            channels = x.shape[0]
            x = x.reshape(channels, -1)[:, self.permutation].reshape(self.images.shape[1:])
        return x, self.labels[index]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _check_pair(train: LabeledImages, test: LabeledImages, name: str) -> list[int]:
    """Checks that train and test agree on image shape and class set; returns the sorted classes."""
    for split, data in (("train", train), ("test", test)):
        if not isinstance(data, LabeledImages):
            raise TypeError(f"{name} {split} data: expected LabeledImages, got {type(data).__name__}")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(
            f"{name}: expected train and test images of one shape, got {tuple(train.images.shape[1:])} "
            f"and {tuple(test.images.shape[1:])}"
        )
    train_classes, test_classes = set(train.classes), set(test.classes)
    if train_classes != test_classes:
        raise ValueError(
            f"{name}: expected the same classes in train and test, got classes only in train "
            f"{sorted(train_classes - test_classes)} and only in test {sorted(test_classes - train_classes)}"
        )
    return sorted(train_classes)


def _task_dataset(
    data: LabeledImages,
    indices: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    task_label: int,
    permutation: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    scale: float | None = None,
) -> TaskAwareSupervisedClassificationDataset:
    """One experience's dataset: samples ``indices`` of ``data`` (all when None) with new ``labels``.

    A task-aware dataset (``task_set``, ``targets``, ``targets_task_labels``), as Avalanche's own benchmarks build:
    LwF and the task-balanced data loaders of Avalanche 0.6.0 read ``task_set``.
    """
    source = data.images if images is None else images
    if indices is not None:
        source = source[indices]
    label_list = labels.tolist()
    inner = _ImageDataset(
        source, label_list, scale=data.scale if scale is None else scale, permutation=permutation
    )
    return TaskAwareSupervisedClassificationDataset(
        [inner],
        data_attributes=[
            DataAttribute(label_list, "targets"),
            TaskLabels(ConstantSequence(task_label, len(label_list))),
        ],
    )


def _assemble(
    name: str,
    train_sets: list[TaskAwareSupervisedClassificationDataset],
    test_sets: list[TaskAwareSupervisedClassificationDataset],
    *,
    task_incremental: bool,
    input_shape: tuple[int, ...],
    classes_per_task: list[tuple[int, ...]],
) -> Benchmark:
    scenario = with_classes_timeline(
        with_task_labels(benchmark_from_datasets(train=train_sets, test=test_sets))
    )
    for stream in scenario.streams.values():
        for experience in stream:
            for attribute in ("classes_in_this_experience", "previous_classes", "classes_seen_so_far"):
                setattr(experience, attribute, sorted(getattr(experience, attribute)))
            experience.future_classes = sorted(experience.future_classes)
    return Benchmark(
        name=name,
        scenario=scenario,
        task_incremental=task_incremental,
        input_shape=input_shape,
        classes_per_task=tuple(classes_per_task),
    )


def build_split_benchmark(
    train: LabeledImages,
    test: LabeledImages,
    *,
    n_tasks: int,
    seed: int = 0,
    task_incremental: bool = True,
    name: str = "split",
) -> Benchmark:
    """Splits the classes, in a seeded order, into ``n_tasks`` tasks of ``k = n_classes / n_tasks`` classes.

    Args:
        train: training images with labels; must hold the same classes as ``test``.
        test: test images with labels.
        n_tasks: number of tasks; must divide the number of classes.
        seed: seeds the class order (a ``torch.Generator``; the global RNG is untouched).
        task_incremental: task labels ``t`` and task-local labels ``0..k-1`` when True; task label 0 and labels
            ``t * k + j`` (the position in the class order) when False.
        name: the benchmark's name, used in errors and in ``Benchmark.name``.

    Returns:
        A ``Benchmark`` whose experience ``t`` in both streams holds the samples of classes
        ``order[t * k : (t + 1) * k]``.

    Raises:
        ValueError: train and test class sets or image shapes differ, or ``n_tasks`` does not divide the classes.
    """
    classes = _check_pair(train, test, name)
    check_int(f"n_tasks of {name}", n_tasks, low=1)
    check_int("seed", seed, low=0, high=2**32 - 1)
    check_bool("task_incremental", task_incremental)
    if len(classes) % n_tasks != 0:
        raise ValueError(
            f"n_tasks for {name}: expected a divisor of its {len(classes)} classes, got {n_tasks}"
        )
    per_task = len(classes) // n_tasks
    generator = torch.Generator().manual_seed(seed)
    order = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    position = torch.full((max(classes) + 1,), -1, dtype=torch.int64)
    position[torch.tensor(order)] = torch.arange(len(order))

    streams: dict[str, list[TaskAwareSupervisedClassificationDataset]] = {"train": [], "test": []}
    for split, data in (("train", train), ("test", test)):
        global_labels = position[data.targets]
        task_of_sample = global_labels // per_task
        for task in range(n_tasks):
            indices = torch.nonzero(task_of_sample == task).flatten()
            labels = global_labels[indices]
            if task_incremental:
                labels = labels - task * per_task
            streams[split].append(
                _task_dataset(data, indices, labels, task_label=task if task_incremental else 0)
            )
    return _assemble(
        name,
        streams["train"],
        streams["test"],
        task_incremental=task_incremental,
        input_shape=tuple(train.images.shape[1:]),
        classes_per_task=[tuple(order[t * per_task : (t + 1) * per_task]) for t in range(n_tasks)],
    )


def _draw_permutations(n_tasks: int, n_pixels: int, seed: int) -> list[torch.Tensor | None]:
    """Identity (None) for task 0, then seeded permutations distinct from the identity and from each other."""
    generator = torch.Generator().manual_seed(seed)
    permutations: list[torch.Tensor | None] = [None]
    seen = {tuple(range(n_pixels))}
    if n_tasks > 1 and math.factorial(n_pixels) < n_tasks:
        raise ValueError(
            f"n_tasks: expected at most {math.factorial(n_pixels)} tasks for images of {n_pixels} pixels, "
            f"got {n_tasks}"
        )
    while len(permutations) < n_tasks:
        permutation = torch.randperm(n_pixels, generator=generator)
        key = tuple(permutation.tolist())
        if key not in seen:
            seen.add(key)
            permutations.append(permutation)
    return permutations


def build_permuted_benchmark(
    train: LabeledImages,
    test: LabeledImages,
    *,
    n_tasks: int,
    seed: int = 0,
    task_incremental: bool = True,
    name: str = "permuted",
) -> Benchmark:
    """Every task holds all samples with one pixel permutation (shared by all channels); task 0 unpermuted.

    Permutations are applied on access, so the tasks share one copy of the images.

    Args:
        train: training images with labels; must hold the same classes as ``test``.
        test: test images with labels.
        n_tasks: number of tasks.
        seed: seeds the permutations (a ``torch.Generator``; the global RNG is untouched).
        task_incremental: task labels ``t`` and labels ``j`` (the index of the class among the sorted classes)
            when True; task label 0 and labels ``t * k + j`` when False.
        name: the benchmark's name, used in errors and in ``Benchmark.name``.

    Returns:
        A ``Benchmark`` with ``n_tasks`` experiences per stream, each of ``k = n_classes`` classes.

    Raises:
        ValueError: train and test class sets or image shapes differ, or ``n_tasks`` is not positive.
    """
    classes = _check_pair(train, test, name)
    check_int(f"n_tasks of {name}", n_tasks, low=1)
    check_int("seed", seed, low=0, high=2**32 - 1)
    check_bool("task_incremental", task_incremental)
    n_pixels = train.images.shape[2] * train.images.shape[3]
    permutations = _draw_permutations(n_tasks, n_pixels, seed)
    return _build_same_classes_tasks(
        name,
        train,
        test,
        classes,
        task_incremental=task_incremental,
        permutations=permutations,
        angles=[None] * n_tasks,
    )


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotates images counterclockwise about their centre by bilinear resampling, zeros outside.

    Args:
        images: ``[N, C, H, W]`` float32.
        degrees: the angle; 90 equals ``torch.rot90(images, 1, dims=(2, 3))`` on square images.

    Returns:
        ``[N, C, H, W]`` float32.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.float32:
        raise ValueError(f"images: expected a float32 [N, C, H, W] tensor, got {_describe(images)}")
    if not isinstance(degrees, int | float) or isinstance(degrees, bool) or not math.isfinite(degrees):
        raise ValueError(f"degrees: expected a finite number, got {degrees!r}")
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    height, width = images.shape[2], images.shape[3]
    # affine_grid maps output positions to input positions in normalized coordinates ([-1, 1] on each axis);
    # the aspect ratio corrections keep the rotation rigid on non-square images.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=torch.float32
    )
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def build_rotated_benchmark(
    train: LabeledImages,
    test: LabeledImages,
    *,
    angles: Sequence[float],
    task_incremental: bool = True,
    name: str = "rotated",
) -> Benchmark:
    """Every task holds all samples rotated counterclockwise by its angle (``rotate_images``).

    The rotated images are computed once per task and stored as float32.

    Args:
        train: training images with labels; must hold the same classes as ``test``.
        test: test images with labels.
        angles: one angle in degrees per task; distinct.
        task_incremental: as in ``build_permuted_benchmark``.
        name: the benchmark's name, used in errors and in ``Benchmark.name``.

    Returns:
        A ``Benchmark`` with ``len(angles)`` experiences per stream, each of all classes.

    Raises:
        ValueError: train and test class sets or image shapes differ, or the angles are empty, not finite or
            repeated.
    """
    classes = _check_pair(train, test, name)
    check_bool("task_incremental", task_incremental)
    angle_list = list(angles)
    if not angle_list or not all(
        isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in angle_list
    ):
        raise ValueError(
            f"angles for {name}: expected a non-empty sequence of finite numbers, got {angles!r}"
        )
    if len({a % 360.0 for a in angle_list}) != len(angle_list):
        raise ValueError(f"angles for {name}: expected distinct angles (mod 360), got {angle_list}")
    return _build_same_classes_tasks(
        name,
        train,
        test,
        classes,
        task_incremental=task_incremental,
        permutations=[None] * len(angle_list),
        angles=[float(a) for a in angle_list],
    )


def _build_same_classes_tasks(
    name: str,
    train: LabeledImages,
    test: LabeledImages,
    classes: list[int],
    *,
    task_incremental: bool,
    permutations: list[torch.Tensor | None],
    angles: list[float | None],
) -> Benchmark:
    n_classes = len(classes)
    position = torch.full((max(classes) + 1,), -1, dtype=torch.int64)
    position[torch.tensor(classes)] = torch.arange(n_classes)
    streams: dict[str, list[TaskAwareSupervisedClassificationDataset]] = {"train": [], "test": []}
    for split, data in (("train", train), ("test", test)):
        local_labels = position[data.targets]
        for task, (permutation, angle) in enumerate(zip(permutations, angles, strict=True)):
            labels = local_labels if task_incremental else local_labels + task * n_classes
            if angle is None:
                images, scale = None, None
            else:
                images, scale = rotate_images(data.images.to(torch.float32) * data.scale, angle), 1.0
            streams[split].append(
                _task_dataset(
                    data,
                    None,
                    labels,
                    task_label=task if task_incremental else 0,
                    permutation=permutation,
                    images=images,
                    scale=scale,
                )
            )
    return _assemble(
        name,
        streams["train"],
        streams["test"],
        task_incremental=task_incremental,
        input_shape=tuple(train.images.shape[1:]),
        classes_per_task=[tuple(classes)] * len(permutations),
    )
