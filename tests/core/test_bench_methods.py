"""scripts/bench_methods.py runs --quick end to end and writes its table, plot and runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import script_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_methods") as module:
        yield module


def test_quick_run_writes_every_point_with_dense_beside(bench: ModuleType, tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    bench.main(["--quick", "--out", str(out), "--data_root", str(data)])
    result = json.loads((out / "results.json").read_text())
    quick = bench.QUICK
    points = {(p["task"], p["method"], p["target_sparsity"]) for p in result["points"]}
    expected = {
        (task, method, s) for task in bench.TASKS for method in quick["methods"] for s in quick["sparsities"]
    }
    assert points == expected | {(task, "dense", 0.0) for task in bench.TASKS}
    assert len(result["runs"]) == len(points) * quick["seeds"] and result["skipped"] == []
    sparse = [r for r in result["runs"] if r["method"] != "dense"]
    assert all(r["sparsity"] == pytest.approx(0.9, abs=0.01) for r in sparse)
    assert all(r["steps"] > 0 and r["seconds"] > 0 for r in result["runs"])
    table = (out / "results.md").read_text()
    for task in bench.TASKS:
        assert f"## {task}" in table
    assert table.count("| dense |") == len(bench.TASKS) and table.count("| taylor |") == len(bench.TASKS)
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_a_point_the_method_cannot_reach_is_reported_not_fatal(bench: ModuleType, tmp_path: Path) -> None:
    """SRigL's constant fan-in gives no weight to a row of the 40-100-100-10 MLP at 98% (ERK): n/a, with why."""
    out = tmp_path / "out"
    argv = ["--quick", "--tasks", "mnist1d-mlp", "--methods", "srigl", "--sparsities", "0.98"]
    bench.main([*argv, "--out", str(out), "--data_root", str(tmp_path / "data")])
    result = json.loads((out / "results.json").read_text())
    assert [(s["method"], s["sparsity"]) for s in result["skipped"]] == [("srigl", 0.98)]
    assert "no weight to each of" in result["skipped"][0]["reason"]
    assert "| srigl | n/a |" in (out / "results.md").read_text()


def test_confidence_interval_and_separation_by_hand(bench: ModuleType) -> None:
    assert bench.confidence_half_width([0.5, 0.7]) == pytest.approx(12.7062 * 0.141421 / 2**0.5, rel=1e-4)
    point = lambda method, mean, ci: bench.Point(  # noqa: E731
        task="t",
        method=method,
        target_sparsity=0.9,
        seeds=5,
        mean=mean,
        ci95=ci,
        flops_fraction=0.1,
        seconds=1.0,
    )
    points = [
        point("a", 0.80, 0.01),
        point("b", 0.75, 0.02),
        point("c", 0.78, 0.02),
        point("dense", 0.9, 0.0),
    ]
    assert bench.separated(points) == {("t", 0.9): ("a", ["b"])}


def test_arguments_come_from_the_dataclass(bench: ModuleType) -> None:
    args = bench.parse_args(["--quick", "--sparsities", "0.8", "0.95"])
    assert args.sparsities == (0.8, 0.95) and args.seeds == 2 and args.epochs == 1
    full = bench.parse_args([])
    assert full.sparsities == (0.9, 0.95, 0.98) and full.seeds == 5 and "taylor" in full.methods
    with pytest.raises(ValueError, match="sparsities"):
        bench.parse_args(["--sparsities", "1.5"])
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        bench.parse_args(["--methods", "nope"])
    with pytest.raises(ValueError, match="seeds >= 2"):
        bench.parse_args(["--seeds", "1"])


def test_overrides_set_config_fields_and_name_a_bad_one(bench: ModuleType) -> None:
    assert bench.config_overrides(("drop_fraction=0.1", "distribution=uniform")) == {
        "drop_fraction": 0.1,
        "distribution": "uniform",
    }
    with pytest.raises(ValueError, match=r"'drop_rate=0\.1'"):
        bench.Args(overrides=("drop_rate=0.1",))
    with pytest.raises(ValueError, match="'distribution'"):
        bench.Args(overrides=("distribution",))


def test_a_labelled_variant_is_named_in_runs_and_tables(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--tasks", "mnist1d-mlp", "--methods", "rigl", "--seeds", "2", "--out", str(out)]
    bench.main(
        [*argv, "--data-root", str(tmp_path / "data"), "--overrides", "grow=fisher", "--label", "+fisher"]
    )
    result = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in result["runs"]} == {"dense", "rigl+fisher"}
    assert "| rigl+fisher |" in (out / "results.md").read_text()
