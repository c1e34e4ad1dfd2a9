"""Split-MNIST-1D and Permuted-MNIST-1D: task and class layout, seeded permutations, data from the offline cache."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import sparseapps.core.mnist1d
from sparseapps.continual.benchmarks import Benchmark, load_mnist1d_signals, make_benchmark
from sparseapps.core.mnist1d import load_mnist1d


def _stack(experience) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All samples of an experience as ``x [N, 1, 1, 40]``, ``y [N]``, ``t [N]``."""
    dataset = experience.dataset
    x, y, t = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
    return x, y, t


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network connection or call of mnist1d's downloading ``get_dataset`` fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("MNIST-1D must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache root holding the published MNIST-1D, generated once for the module (about two seconds)."""
    root = tmp_path_factory.mktemp("mnist1d-cache")
    load_mnist1d(root)
    return root


@pytest.fixture(scope="module")
def arrays(cache_root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return load_mnist1d(cache_root)


def _permutation(x_task: torch.Tensor, x_base: torch.Tensor) -> list[int]:
    """``p`` with ``x_task[:, j] == x_base[:, p[j]]`` for every position ``j``; each column must match one."""
    matches = (x_task.reshape(len(x_task), -1).T[:, None, :] == x_base.reshape(len(x_base), -1).T[None]).all(
        -1
    )
    assert torch.equal(matches.sum(dim=1), torch.ones(matches.shape[0], dtype=torch.int64))
    return matches.int().argmax(dim=1).tolist()


@pytest.mark.parametrize("task_incremental", [True, False])
def test_split_mnist1d_tasks_hold_disjoint_pairs_of_classes(cache_root, arrays, task_incremental):
    x_train, y_train, x_test, y_test = arrays
    benchmark = make_benchmark(
        "split-mnist1d", seed=3, dataset_root=cache_root, task_incremental=task_incremental
    )
    assert isinstance(benchmark, Benchmark)
    assert (benchmark.n_tasks, benchmark.n_classes_per_task) == (5, 2)
    assert benchmark.n_outputs == (2 if task_incremental else 10)
    assert benchmark.input_shape == (1, 1, 40)
    classes = [c for task in benchmark.classes_per_task for c in task]
    assert sorted(classes) == list(range(10))  # disjoint, and together all ten
    for stream, x_all, y_all in (
        (benchmark.train_stream, x_train, y_train),
        (benchmark.test_stream, x_test, y_test),
    ):
        seen = 0
        for task, experience in enumerate(stream):
            x, y, t = _stack(experience)
            own = torch.isin(y_all, torch.tensor(benchmark.classes_per_task[task]))
            assert torch.equal(x.reshape(-1, 40), x_all[own])  # the signals as generated, in order
            offset = 0 if task_incremental else 2 * task
            original = torch.tensor(benchmark.classes_per_task[task])[y - offset]
            assert torch.equal(original, y_all[own])
            assert set(t.tolist()) == {task if task_incremental else 0}
            seen += len(y)
        assert seen == len(y_all)
    assert (len(y_train), len(y_test)) == (4000, 1000)


def test_split_mnist1d_class_order_is_seeded(cache_root):
    first = make_benchmark("split-mnist1d", seed=0, dataset_root=cache_root)
    again = make_benchmark("split-mnist1d", seed=0, dataset_root=cache_root)
    orders = {
        make_benchmark("split-mnist1d", seed=s, dataset_root=cache_root).classes_per_task for s in range(4)
    }
    assert first.classes_per_task == again.classes_per_task
    assert len(orders) > 1
    assert make_benchmark("split-mnist1d", n_tasks=2, dataset_root=cache_root).n_classes_per_task == 5


@pytest.mark.parametrize("task_incremental", [True, False])
def test_permuted_mnist1d_tasks_are_seeded_bijections(cache_root, arrays, task_incremental):
    x_train, y_train, x_test, _ = arrays
    benchmark = make_benchmark(
        "permuted-mnist1d", seed=1, dataset_root=cache_root, task_incremental=task_incremental
    )
    assert (benchmark.n_tasks, benchmark.n_classes_per_task) == (10, 10)
    assert benchmark.n_outputs == (10 if task_incremental else 100)
    assert benchmark.classes_per_task == (tuple(range(10)),) * 10
    again = make_benchmark("permuted-mnist1d", n_tasks=3, seed=1, dataset_root=cache_root)
    other = make_benchmark("permuted-mnist1d", n_tasks=3, seed=2, dataset_root=cache_root)
    permutations = []
    for task in range(benchmark.n_tasks):
        x, y, t = _stack(benchmark.train_stream[task])
        permutation = _permutation(x, x_train)
        assert sorted(permutation) == list(range(40))  # a bijection of the 40 positions
        x_test_task, _, _ = _stack(benchmark.test_stream[task])
        assert _permutation(x_test_task, x_test) == permutation  # the same one on the test stream
        assert torch.equal(y, y_train + (0 if task_incremental else 10 * task))
        assert set(t.tolist()) == {task if task_incremental else 0}
        permutations.append(permutation)
    assert permutations[0] == list(range(40))  # task 0 unpermuted, as permuted-digits
    assert len({tuple(p) for p in permutations}) == 10
    for task in range(3):
        assert _permutation(_stack(again.train_stream[task])[0], x_train) == permutations[task]
    assert _permutation(_stack(other.train_stream[1])[0], x_train) != permutations[1]


def test_mnist1d_benchmarks_read_the_cache_offline(cache_root, arrays, monkeypatch):
    _offline(monkeypatch)

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached MNIST-1D must be read, not generated again")

    monkeypatch.setattr(sparseapps.core.mnist1d, "_generate", no_generation)
    train, test = load_mnist1d_signals(cache_root)
    assert torch.equal(train.images.reshape(-1, 40), arrays[0]) and torch.equal(train.targets, arrays[1])
    assert torch.equal(test.images.reshape(-1, 40), arrays[2]) and torch.equal(test.targets, arrays[3])
    assert train.scale == 1.0
    for name in ("split-mnist1d", "permuted-mnist1d"):
        assert make_benchmark(name, n_tasks=2, dataset_root=str(cache_root)).n_tasks == 2


def test_mnist1d_is_generated_offline_into_an_empty_cache(tmp_path, arrays, monkeypatch):
    _offline(monkeypatch)
    train, test = load_mnist1d_signals(tmp_path)
    assert torch.equal(train.images.reshape(-1, 40), arrays[0])
    assert torch.equal(test.targets, arrays[3])
    assert list(tmp_path.glob("mnist1d-*/MANIFEST.json"))


def test_mnist1d_benchmark_errors(cache_root):
    with pytest.raises(ValueError, match=r"got 'split-mnist1'"):
        make_benchmark("split-mnist1", dataset_root=cache_root)
    with pytest.raises(
        ValueError, match=r"n_tasks for split-mnist1d: expected a divisor of its 10 classes, got 3"
    ):
        make_benchmark("split-mnist1d", n_tasks=3, dataset_root=cache_root)
    with pytest.raises(ValueError, match=r"n_tasks of permuted-mnist1d.*got 0"):
        make_benchmark("permuted-mnist1d", n_tasks=0, dataset_root=cache_root)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 .*got -1"):
        make_benchmark("permuted-mnist1d", seed=-1, dataset_root=cache_root)
    with pytest.raises(TypeError, match=r"dataset_root: expected a str or Path, got int"):
        make_benchmark("split-mnist1d", dataset_root=3)
