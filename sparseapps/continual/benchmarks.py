"""Offline continual-learning benchmarks as Avalanche 0.6.0 scenarios.

Eight benchmarks, by name (``make_benchmark(name, ...)``):

- ``split-digits``: scikit-learn's digits (8x8 images, 1797 samples, bundled with scikit-learn, no download),
  a seeded stratified train/test split, the ten classes in a seeded order split into ``n_tasks`` tasks (default
  5 tasks x 2 classes).
- ``permuted-digits``: every task holds all ten digits with its own seeded pixel permutation (default 10 tasks).
  Task 0 is the unpermuted data; tasks 1.. each draw a permutation different from all earlier ones. (Avalanche's
  ``PermutedMNIST`` permutes every task, the first included.)
- ``rotated-digits``: every task holds all ten digits rotated counterclockwise by a fixed angle,
  ``180 * t / n_tasks`` degrees for task ``t`` (default 5 tasks: 0, 36, 72, 108, 144 degrees); bilinear resampling,
  zeros outside the image.
- ``split-mnist1d`` and ``permuted-mnist1d``: MNIST-1D (Greydanus & Kobak), the published dataset (mnist1d's
  generator, seed 42, 4000 train / 1000 test signals of 40 points) generated offline and cached by
  :func:`~sparseapps.core.mnist1d.load_mnist1d` under ``dataset_root`` (the cache root; None: ``$SPARSEAPPS_DATA``
  or ``~/.cache/sparseapps/data``). A signal is a ``[1, 1, 40]`` sample. ``split-mnist1d`` splits the ten classes in
  a seeded order into ``n_tasks`` tasks (default 5 x 2), as ``split-digits``; ``permuted-mnist1d`` gives every
  task all ten classes with its own seeded permutation of the 40 positions (default 10 tasks), task 0 unpermuted,
  as ``permuted-digits``. The signals are used as generated (about zero mean and unit variance, as mnist1d's own
  training uses them), not rescaled to [0, 1]: the digits' scaling divides by their pixel maximum, which a signal
  does not have. ``seed`` seeds the class order and the permutations; the dataset itself is always the published
  one.
- ``split-mnist`` (default 5 tasks), ``permuted-mnist`` (default 10 tasks) and ``split-cifar100`` (default 10
  tasks), read from a local ``dataset_root``; nothing is downloaded. Expected layouts:

  * MNIST: the four official idx files, gzipped or not, directly in ``dataset_root`` or in
    ``dataset_root/MNIST/raw`` (torchvision's layout): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), from ``MNIST_URLS``.
  * CIFAR-100: the official python tarball ``dataset_root/cifar-100-python.tar.gz`` or its extracted files
    ``dataset_root/cifar-100-python/train`` and ``.../test``, from ``CIFAR100_URL``.

  The recorded MD5 checksums (``MNIST_MD5``, ``CIFAR100_MD5``, as torchvision 0.29 records them) are verified for
  the gzipped MNIST files, the CIFAR-100 tarball and its extracted ``train`` / ``test`` files; uncompressed idx
  files have no official checksum and are checked for format only. The CIFAR pickles are read with an unpickler
  that accepts only the numpy array constructors the official files use, so a crafted file cannot run code.

Labels and task labels. Every sample is ``[x, y, t]``: ``x`` a float32 image ``[C, H, W]`` (in [0, 1] but for
MNIST-1D's signals), ``y`` the
label, ``t`` the task label, so the streams work with ``MultiTaskModule`` models and Avalanche's templates.

- ``task_incremental=True``: experience ``t`` has task label ``t`` and labels ``0 .. k-1`` local to the task
  (one head of ``k`` outputs per task; every experience's ``classes_in_this_experience`` is ``[0 .. k-1]``).
- ``task_incremental=False`` (class-incremental): every task label is 0 and labels are global, ``t * k + j``
  for the ``j``-th class of task ``t``; for the split benchmarks that is the position of the class in the seeded
  class order, for the permuted / rotated ones every task brings ``k`` new classes (van de Ven et al.'s
  class-incremental permuted MNIST), so one head needs ``n_tasks * k`` outputs.

``Benchmark.classes_per_task[t][j]`` is the original class of local label ``j`` in task ``t``. Experiences carry
Avalanche's class timeline (``classes_in_this_experience`` and the rest) as sorted lists rather than the sets
``with_classes_timeline`` leaves in 0.6.0, so multi-head classifiers can index with them.

Example:
    >>> benchmark = make_benchmark("split-digits", seed=0)
    >>> benchmark.n_tasks, benchmark.n_outputs, benchmark.input_shape
    (5, 2, (1, 8, 8))
    >>> x, y, t = benchmark.train_stream[1].dataset[0]
    >>> tuple(x.shape), y in (0, 1), t
    ((1, 8, 8), True, 1)

The pieces: :mod:`sparseapps.continual.sources` reads the images, :mod:`sparseapps.continual.streams` builds the
streams; every name of both stays importable from here.
"""

from __future__ import annotations

from pathlib import Path

from sparseapps.continual.config import BENCHMARK_NAMES, DEFAULT_N_TASKS
from sparseapps.continual.sources import (
    CIFAR100_FOLDER,
    CIFAR100_MD5,
    CIFAR100_TARBALL,
    CIFAR100_URL,
    DIGITS_TEST_FRACTION,
    MNIST_MD5,
    MNIST_STEMS,
    MNIST_URLS,
    load_cifar100,
    load_digits_split,
    load_mnist,
    load_mnist1d_signals,
    load_source,
    read_idx,
)
from sparseapps.continual.streams import (
    Benchmark,
    LabeledImages,
    build_permuted_benchmark,
    build_rotated_benchmark,
    build_split_benchmark,
    rotate_images,
)
from sparseapps.core.validation import check_bool, check_choice, check_int


def make_benchmark(
    name: str,
    *,
    n_tasks: int | None = None,
    seed: int = 0,
    dataset_root: str | Path | None = None,
    task_incremental: bool = True,
) -> Benchmark:
    """Builds one of ``BENCHMARK_NAMES`` (see the module docstring for each).

    Args:
        name: the benchmark, e.g. ``"split-digits"``.
        n_tasks: number of tasks; ``DEFAULT_N_TASKS[name]`` when None. Split
            benchmarks need a divisor of the number of classes (10 or 100).
        seed: seeds the digits train/test split, the class order and the permutations.
        dataset_root: folder of the MNIST / CIFAR-100 files, required by those benchmarks; the cache root of
            MNIST-1D (optional); unused by the digits ones.
        task_incremental: task labels and per-task labels when True; class-incremental (task label 0, global
            labels) when False.

    Returns:
        The ``Benchmark``.

    Raises:
        ValueError: an unknown name, a bad ``n_tasks`` or ``seed``, a missing ``dataset_root``, corrupt files,
            or train and test class sets that differ.
        FileNotFoundError: a dataset file is missing.
    """
    check_choice("name", name, BENCHMARK_NAMES)
    n_tasks = check_int(f"n_tasks of {name}", DEFAULT_N_TASKS[name] if n_tasks is None else n_tasks, low=1)
    check_int("seed", seed, low=0, high=2**32 - 1)
    check_bool("task_incremental", task_incremental)
    train, test = load_source(name, seed=seed, dataset_root=dataset_root)
    if name.startswith("split-"):
        return build_split_benchmark(
            train, test, n_tasks=n_tasks, seed=seed, task_incremental=task_incremental, name=name
        )
    if name.startswith("permuted-"):
        return build_permuted_benchmark(
            train, test, n_tasks=n_tasks, seed=seed, task_incremental=task_incremental, name=name
        )
    angles = [180.0 * task / n_tasks for task in range(n_tasks)]
    return build_rotated_benchmark(train, test, angles=angles, task_incremental=task_incremental, name=name)


__all__ = [
    "BENCHMARK_NAMES",
    "CIFAR100_FOLDER",
    "CIFAR100_MD5",
    "CIFAR100_TARBALL",
    "CIFAR100_URL",
    "DEFAULT_N_TASKS",
    "DIGITS_TEST_FRACTION",
    "MNIST_MD5",
    "MNIST_STEMS",
    "MNIST_URLS",
    "Benchmark",
    "LabeledImages",
    "build_permuted_benchmark",
    "build_rotated_benchmark",
    "build_split_benchmark",
    "load_cifar100",
    "load_digits_split",
    "load_mnist",
    "load_mnist1d_signals",
    "make_benchmark",
    "read_idx",
    "rotate_images",
]
