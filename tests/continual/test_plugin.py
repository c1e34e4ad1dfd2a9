"""SparseIsolationPlugin inside Avalanche's Naive: BWT exactly zero, Avalanche's metrics, bad streams."""

from __future__ import annotations

import pytest
import torch
from avalanche.training import Naive

from sparseapps.continual.benchmarks import make_benchmark
from sparseapps.continual.isolation import IsolationConfig
from sparseapps.continual.models import DenseMultiHeadMLP, IsolatedCNN, IsolatedMLP
from sparseapps.continual.plugin import SparseIsolationPlugin, continual_evaluator, experience_task
from sparseapps.continual.train import train_and_evaluate
from sparseapps.core import SparsityConfig

_UNIFORM = IsolationConfig(sparsity=SparsityConfig(sparsity=0.8, distribution="uniform", grow="random"))


@pytest.fixture(scope="module")
def split_digits():
    return make_benchmark("split-digits", n_tasks=5, seed=0)


def _strategy(model, plugins=(), epochs=1, lr=1e-2):
    return Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        train_mb_size=64,
        train_epochs=epochs,
        eval_mb_size=512,
        plugins=list(plugins),
        evaluator=continual_evaluator(),
    )


@pytest.mark.parametrize("forward_transfer", [False, True])
def test_strict_and_transfer_isolation_forget_nothing_bit_for_bit(split_digits, forward_transfer):
    model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(32, 32))
    sparsity = SparsityConfig(sparsity=0.8, distribution="uniform", grow="gradient", update_interval=2)
    config = IsolationConfig(sparsity=sparsity, forward_transfer=forward_transfer)
    plugin = SparseIsolationPlugin(config)
    result = train_and_evaluate(_strategy(model, [plugin], epochs=2), split_digits, progress=False)
    matrix = result["accuracy_matrix"]
    assert all(matrix[4][j] == matrix[j][j] for j in range(5))  # R[T][j] == R[j][j], bit for bit
    assert result["bwt"] == 0.0 and result["bwt_exact_zero"]
    assert result["avalanche"] == {"stream_forgetting": 0.0, "stream_bwt": 0.0}
    assert result["acc"] > 0.8  # each 2-class task is learned, not just preserved
    assert plugin.isolation is not None and plugin.isolation.task_order == [0, 1, 2, 3, 4]
    assert {h["task"] for h in plugin.isolation.history} == set(range(5))  # every task's engine updated it
    assert plugin.isolation.engine is None  # detached after the last task
    capacity = plugin.isolation.capacity()
    assert [t["weights"] for t in capacity["tasks"]] == [sum(plugin.isolation.target.values())] * 5
    assert plugin.trained_classes == {task: [0, 1] for task in range(5)}


def test_naive_forgets_and_our_bwt_matches_avalanche(split_digits):
    torch.manual_seed(0)
    model = DenseMultiHeadMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(32, 32))
    result = train_and_evaluate(_strategy(model, epochs=2, lr=5e-2), split_digits, progress=False)
    assert result["bwt"] < 0 and not result["bwt_exact_zero"]
    assert result["avalanche"]["stream_bwt"] == pytest.approx(result["bwt"], abs=1e-12)
    assert result["avalanche"]["stream_forgetting"] == pytest.approx(result["forgetting"], abs=1e-12)


def test_cnn_with_per_task_batch_norm_in_avalanche():
    benchmark = make_benchmark("permuted-digits", n_tasks=2, seed=1)
    model = IsolatedCNN(
        input_shape=(1, 8, 8), n_outputs=10, n_tasks=2, channels=(4, 8), hidden=16, batch_norm=True
    )
    plugin = SparseIsolationPlugin(
        IsolationConfig(sparsity=SparsityConfig(sparsity=0.6, grow="random"), capacity="redistribute")
    )
    result = train_and_evaluate(_strategy(model, [plugin]), benchmark, progress=False)
    assert result["bwt_exact_zero"]
    assert result["acc"] > 0.2  # above the 0.1 chance level of 10 classes after one epoch


def test_class_incremental_stream_is_refused(split_digits):
    benchmark = make_benchmark("split-digits", n_tasks=5, seed=0, task_incremental=False)
    model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=10, n_tasks=5, hidden=(16,))
    strategy = _strategy(model, [SparseIsolationPlugin(_UNIFORM)])
    strategy.train(benchmark.train_stream[0])
    with pytest.raises(
        ValueError, match=r"task must be one not trained before, got 0 .*task-incremental stream"
    ):
        strategy.train(benchmark.train_stream[1])


def test_experience_without_task_labels_is_refused(split_digits):
    class Bare:
        current_experience = 3

    with pytest.raises(ValueError, match=r"experience 3: expected task labels"):
        experience_task(Bare())
    two = type("Two", (), {"task_labels": [0, 1], "current_experience": 1})()
    with pytest.raises(ValueError, match=r"expected exactly one task label, got \[0, 1\]"):
        experience_task(two)
    assert experience_task(split_digits.train_stream[2]) == 2
    assert list(split_digits.train_stream[2].dataset.task_set) == [2]  # Avalanche's LwF reads task_set


def test_inconsistent_class_sets_between_train_and_test(split_digits):
    model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=3, n_tasks=5, hidden=(16,))
    strategy = _strategy(model, [SparseIsolationPlugin(_UNIFORM)])
    strategy.train(split_digits.train_stream[0])
    test_experience = split_digits.test_stream[0]
    original = test_experience.classes_in_this_experience
    test_experience.classes_in_this_experience = [0, 1, 2]
    try:
        with pytest.raises(
            ValueError, match=r"expected the classes task 0 was trained on, \[0, 1\], got \[0, 1, 2\]"
        ):
            strategy.eval([test_experience])
    finally:
        test_experience.classes_in_this_experience = original


def test_model_without_supported_layers_and_too_small_heads(split_digits):
    dense = DenseMultiHeadMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(16,))
    strategy = _strategy(dense, [SparseIsolationPlugin()])
    with pytest.raises(ValueError, match=r"must hold IsolatedLinear / IsolatedConv2d layers"):
        strategy.train(split_digits.train_stream[0])
    narrow = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=1, n_tasks=5, hidden=(16,))
    strategy = _strategy(narrow, [SparseIsolationPlugin(_UNIFORM)])
    with pytest.raises(ValueError, match=r"expected class labels in \[0, 1\) .* got \[0, 1\]"):
        strategy.train(split_digits.train_stream[0])


def test_task_labels_are_checked_by_the_model():
    model = IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=2, hidden=(8,))
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expected task ids in \[0, 2\), got 5"):
        model(x, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"expected an integer tensor \[B\] with B = 3, got a torch.float32"):
        model(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"B = 3, got a torch.int64 tensor of shape \(2,\)"):
        model(x, torch.tensor([0, 1]))
    assert model(x, torch.tensor([0, 1, 1])).shape == (3, 2)
