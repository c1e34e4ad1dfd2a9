"""End to end: run_continual, results.json and plots, the CLI, metrics by hand, bad run settings."""

from __future__ import annotations

import json

import pytest
import torch

from sparseapps.cli import main
from sparseapps.continual import cli as continual_cli
from sparseapps.continual.benchmarks import BENCHMARK_NAMES
from sparseapps.continual.isolation import IsolationConfig
from sparseapps.continual.train import ContinualRun, run_continual, stream_metrics, write_results


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one CPU thread (and the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stream_metrics_by_hand():
    metrics = stream_metrics([[0.5, None, None], [0.25, 0.75, None], [0.5, 0.5, 1.0]])
    assert metrics["acc"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.5) + (0.5 - 0.75)) / 2)
    assert metrics["forgetting"] == pytest.approx(0.125)
    assert stream_metrics([[0.7]]) == {"acc": 0.7, "bwt": 0.0, "forgetting": 0.0}
    with pytest.raises(ValueError, match=r"square T x T"):
        stream_metrics([[0.5, None]])
    with pytest.raises(ValueError, match=r"R\[T-1\]\[j\] and R\[j\]\[j\]"):
        stream_metrics([[None, None], [0.5, 0.5]])


def test_run_continual_writes_results_and_plots(tmp_path):
    run = ContinualRun(
        benchmark="split-digits",
        epochs=2,
        hidden=(32, 32),
        threads=1,
        isolation=IsolationConfig(sparsity=0.9, distribution="erk", growth="unfired", update_interval=3),
    )
    result = run_continual(run, progress=False)
    matrix = result["accuracy_matrix"]
    assert len(matrix) == 5 and all(row[i + 1 :] == [None] * (4 - i) for i, row in enumerate(matrix))
    assert result["bwt"] == 0.0 and result["bwt_exact_zero"]
    agnostic = result["task_agnostic"]
    assert 0.0 <= agnostic["accuracy"] <= agnostic["task_inference_accuracy"] <= 1.0
    capacity = result["capacity"]
    assert sum(t["weights"] for t in capacity["tasks"]) + capacity["free"] == capacity["total"]
    assert capacity["total"] == result["model"]["isolated_weights"] == 64 * 32 + 32 * 32
    assert result["run"]["isolation"]["distribution"] == "erk"
    assert result["topology_updates"] > 0 and len(result["train_seconds"]) == 5
    paths = write_results(result, tmp_path / "out")
    stored = json.loads(paths["results"].read_text())
    assert stored["accuracy_matrix"] == matrix and stored["acc"] == result["acc"]
    for name in ("accuracy_matrix", "capacity"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "accuracy_matrix.png",
        "capacity.png",
        "results.json",
    ]


def test_cli_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "x"
    code = main(
        [
            "continual",
            "run",
            "--benchmark",
            "split-digits",
            "--sparsity",
            "0.9",
            "--init",
            "uniform",
            "--growth",
            "momentum",
            "--epochs",
            "1",
            "--hidden",
            "16,16",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "BWT 0.0000" in printed and "R[T-1][j] == R[j][j] for all j: True" in printed
    stored = json.loads((out / "results.json").read_text())
    assert stored["run"]["isolation"]["growth"] == "momentum" and stored["run"]["hidden"] == [16, 16]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sparsity", "1.5"], "sparsity: expected a number in [0.0, 1.0), got 1.5"),
        (
            ["--benchmark", "permuted-digits", "--n-tasks", "12", "--init", "uniform"],
            "capacity: expected n_tasks x (weights per task) <= layer size",
        ),
        (["--benchmark", "split-mnist", "--dataset-root", "{tmp}"], "MNIST"),
        (["--epochs", "0"], "epochs: expected an integer >= 1, got 0"),
    ],
)
def test_cli_bad_input_exits_with_a_message(tmp_path, capsys, arguments, message):
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    code = main(["continual", "run", "--no-progress", "--out", str(tmp_path / "o"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the output directory is claimed


def test_cli_benchmark_choices_match_the_benchmarks():
    assert continual_cli.BENCHMARK_CHOICES == BENCHMARK_NAMES


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"benchmark": "split-digit"}, ValueError, r"benchmark: expected one of .* got 'split-digit'"),
        ({"model": "rnn"}, ValueError, r"model: expected 'mlp' or 'cnn', got 'rnn'"),
        ({"hidden": ()}, ValueError, r"hidden: expected a non-empty tuple of positive integers, got \(\)"),
        ({"lr": 0.0}, ValueError, r"lr: expected a positive number, got 0.0"),
        ({"device": "gpu:x"}, ValueError, r"device: expected a torch device .* got 'gpu:x'"),
        ({"isolation": {"sparsity": 0.9}}, TypeError, r"isolation: expected an IsolationConfig, got dict"),
        ({"task_agnostic": "yes"}, TypeError, r"task_agnostic: expected a bool, got 'yes'"),
    ],
)
def test_run_settings_are_validated(changes, error, match):
    with pytest.raises(error, match=match):
        ContinualRun(**changes)
