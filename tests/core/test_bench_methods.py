"""scripts/bench_methods.py runs --quick end to end and writes its table, plot and runs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

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


def test_validation_holds_out_training_examples_and_never_reads_the_test_split(
    bench: ModuleType, tmp_path: Path
) -> None:
    args = bench.parse_args(["--quick", "--tasks", "digits-mlp", "--validation", "100"])
    full = bench.load_task("digits-mlp", bench.parse_args(["--quick", "--tasks", "digits-mlp"]))
    task = bench.load_task("digits-mlp", args)
    cut = len(full.x_train) - 100
    assert torch.equal(task.x_train, full.x_train[:cut]) and torch.equal(task.x_test, full.x_train[cut:])
    assert torch.equal(task.y_test, full.y_train[cut:]) and len(task.x_test) == 100
    with pytest.raises(ValueError, match=r"expected validation >= 0 held-out training examples, got -1"):
        bench.parse_args(["--validation", "-1"])
    with pytest.raises(ValueError, match=r"expected validation in \[1, \d+\] \(task 'digits-mlp'"):
        bench.load_task("digits-mlp", bench.parse_args(["--tasks", "digits-mlp", "--validation", "100000"]))
    # the table says what it measured, and folders measured on different splits do not merge
    folders = {}
    for name, extra in (("validation", ["--validation", "100"]), ("test", [])):
        folders[name] = tmp_path / name
        argv = ["--quick", "--tasks", "digits-mlp", "--methods", "rigl", "--out", str(folders[name]), *extra]
        bench.main(argv)
    assert (
        "**Validation** accuracy (the last 100 training examples held out"
        in (folders["validation"] / "results.md").read_text()
    )
    assert "Test accuracy, mean" in (folders["test"] / "results.md").read_text()
    with pytest.raises(
        ValueError, match=r"expected folders evaluated on one split, got .*test.* \(validation 0\)"
    ):
        bench.main(
            ["--combine", str(folders["validation"]), str(folders["test"]), "--out", str(tmp_path / "c")]
        )


def test_combine_relabels_a_folder_and_pairs_add_comparisons(bench: ModuleType, tmp_path: Path) -> None:
    """A variant run without --label merges under FOLDER=LABEL, and --pairs compares it with its base by seed."""
    folders = {}
    for name, extra in (("base", []), ("variant", ["--overrides", "drop_fraction=0.1"])):
        folders[name] = tmp_path / name
        argv = ["--quick", "--tasks", "digits-mlp", "--methods", "rigl", "--out", str(folders[name]), *extra]
        bench.main(argv)
    out = tmp_path / "merged"
    bench.main(
        [
            "--combine",
            str(folders["base"]),
            f"{folders['variant']}=+low",
            "--pairs",
            "rigl+low:rigl",
            "--out",
            str(out),
        ]
    )
    result = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in result["runs"]} == {"dense", "rigl", "rigl+low"}
    variant = json.loads((folders["variant"] / "results.json").read_text())["runs"]
    base = json.loads((folders["base"] / "results.json").read_text())["runs"]
    by_seed = {r["seed"]: r["test_accuracy"] for r in base if r["method"] == "rigl"}
    diffs = [r["test_accuracy"] - by_seed[r["seed"]] for r in variant if r["method"] == "rigl"]
    (row,) = [p for p in result["paired"] if (p["method"], p["baseline"]) == ("rigl+low", "rigl")]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(sum(diffs) / 2)
    assert "| rigl+low | rigl | digits-mlp |" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match=r"expected pairs as METHOD:BASELINE, got \['rigl'\]"):
        bench.parse_args(["--pairs", "rigl"])


def test_paired_p_value_is_scipys_paired_t_test_and_handles_the_edges() -> None:
    from scipy import stats as scipy_stats

    from sparseapps.core.stats import paired_p_value

    diffs = [0.012, -0.004, 0.021, 0.007, 0.0, 0.015]
    assert paired_p_value(diffs) == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-12)
    assert paired_p_value([0.0, 0.0]) == 1.0 and paired_p_value([0.01, 0.01]) == 0.0
    assert math.isnan(paired_p_value([0.01]))


def test_interval_verdict_names_the_side_and_refuses_to_judge_without_an_interval(bench: ModuleType) -> None:
    from sparseapps.core.stats import interval_verdict

    assert interval_verdict((0.0, 0.2)) == "no difference shown"  # an interval touching 0 holds 0
    assert interval_verdict((-0.3, -1e-9), below="b better") == "b better"
    assert interval_verdict((math.nan, math.nan)) == "n/a" and interval_verdict(None, missing="-") == "-"
    runs = [
        bench.Run(
            task="t",
            method=m,
            target_sparsity=0.9,
            seed=s,
            test_accuracy=a - s / 100,
            sparsity=0.9,
            flops_fraction=0.1,
            steps=1,
            seconds=1.0,
        )
        for s in range(3)
        for m, a in (("m", 0.4), ("b", 0.5))
    ]
    row = bench.paired_differences(runs, (("m", "b"),))[0]
    assert row["verdict"] == "b better" and row["mean"] == pytest.approx(-0.1)
