"""End to end: run_continual, results.json and plots, the CLI (options from the config fields), metrics by hand."""

from __future__ import annotations

import json

import pytest

from sparseapps.cli import build_parser, main
from sparseapps.continual import cli as continual_cli
from sparseapps.continual.config import ContinualRun, IsolationConfig
from sparseapps.continual.train import run_continual, stream_metrics, write_results
from sparseapps.core import SparsityConfig


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
    sparsity = SparsityConfig(sparsity=0.9, distribution="erk", grow="unfired", update_interval=3)
    run = ContinualRun(
        benchmark="split-digits",
        epochs=2,
        hidden=(32, 32),
        threads=1,
        isolation=IsolationConfig(sparsity=sparsity),
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
    assert result["run"]["isolation"]["sparsity"]["distribution"] == "erk"
    assert result["topology_updates"] > 0 and len(result["train_seconds"]) == 5
    itop = result["itop"]
    assert [t["task"] for t in itop["tasks"]] == [0, 1, 2, 3, 4]
    assert all(t["rate"] > c["fraction"] for t, c in zip(itop["tasks"], capacity["tasks"], strict=True))
    assert max(t["rate"] for t in itop["tasks"]) < itop["overall"] <= 1.0
    paths = write_results(result, tmp_path / "out")
    stored = json.loads(paths["results"].read_text())
    assert stored["accuracy_matrix"] == matrix and stored["acc"] == result["acc"]
    assert stored["itop"] == itop
    for name in ("accuracy_matrix", "capacity"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "accuracy_matrix.png",
        "capacity.png",
        "results.json",
    ]


def _cli(out, *options):
    return [
        "continual",
        "run",
        "--epochs",
        "1",
        "--hidden",
        "16,16",
        "--no-progress",
        "--out",
        str(out),
        *options,
    ]


def test_cli_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "x"
    code = main(
        _cli(out, "--sparsity", "0.9", "--distribution", "uniform", "--grow", "momentum", "--tie-noise", "0")
    )
    captured = capsys.readouterr()
    assert code == 0 and "deprecated" not in captured.err
    printed = captured.out
    assert "BWT 0.0000" in printed and "R[T-1][j] == R[j][j] for all j: True" in printed
    assert "uniform, drop magnitude, grow momentum" in printed and "ITOP rate" in printed
    stored = json.loads((out / "results.json").read_text())
    sparsity = stored["run"]["isolation"]["sparsity"]
    assert (sparsity["grow"], sparsity["distribution"], sparsity["tie_noise"]) == ("momentum", "uniform", 0.0)
    assert sparsity["seed"] == 0 and stored["run"]["hidden"] == [16, 16]
    assert 0.0 < stored["itop"]["overall"] <= 1.0


def test_deprecated_option_names_still_work_with_a_note(tmp_path, capsys):
    old = build_parser().parse_args(_cli(tmp_path, "--init", "uniform", "--growth", "gradient"))
    new = build_parser().parse_args(_cli(tmp_path, "--distribution", "uniform", "--grow", "gradient"))
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "note: --init is deprecated; use --distribution",
        "note: --growth is deprecated; use --grow",
    ]
    assert continual_cli.run_from_arguments(old) == continual_cli.run_from_arguments(new)
    assert "--init" not in build_parser().format_help() and "--growth" not in _run_help()


def _run_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["continual"]
    return next(a for a in sub._actions if a.dest == "continual_command").choices["run"].format_help()


def test_options_are_the_config_fields():
    help_text = _run_help()
    names = [f for f in ContinualRun.__dataclass_fields__ if f != "isolation"]
    names += [f for f in IsolationConfig.__dataclass_fields__ if f != "sparsity"]
    names += list(continual_cli.SPARSITY_OPTIONS)
    for name in names:
        assert f"--{name.replace('_', '-')}" in help_text, name
    defaults = continual_cli.run_from_arguments(build_parser().parse_args(["continual", "run"]))
    isolation = ContinualRun().isolation
    seeded = isolation.replace(sparsity=isolation.sparsity.replace(seed=0))  # --seed seeds the engines too
    assert defaults == ContinualRun(threads=1, isolation=seeded)
    static = continual_cli.run_from_arguments(
        build_parser().parse_args(["continual", "run", "--grow", "none", "--seed", "3", "--forward-transfer"])
    )
    assert (static.isolation.sparsity.method, static.isolation.sparsity.seed, static.seed) == ("static", 3, 3)
    assert static.isolation.forward_transfer


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sparsity", "1.5"], "sparsity must be a finite number in [0, 1), got 1.5"),
        (
            ["--benchmark", "permuted-digits", "--n-tasks", "12", "--distribution", "uniform"],
            "capacity: expected n_tasks x (weights per task) <= layer size",
        ),
        (["--benchmark", "split-mnist", "--dataset-root", "{tmp}"], "MNIST"),
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--drop", "random", "--drop-schedule", "linear", "--end-fraction", "1.5"], "end_fraction must be"),
    ],
)
def test_cli_bad_input_exits_with_a_message(tmp_path, capsys, arguments, message):
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    code = main(["continual", "run", "--no-progress", "--out", str(tmp_path / "o"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the output directory is claimed
