"""scripts/bench_obs.py runs --quick end to end; its paired comparison reads the right pairs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import script_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_obs") as module:
        yield module


def test_quick_run_prunes_both_ways_to_the_budget_and_writes_the_comparison(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    bench.main(["--quick", "--out", str(out), "--data-root", str(tmp_path / "data")])
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert {(r["method"], r["seed"]) for r in runs} == {(m, s) for m in bench.METHODS for s in (0, 1)}
    assert all(r["dense_accuracy"] == runs[0]["dense_accuracy"] for r in runs if r["seed"] == 0)
    assert all(0.0 <= r["pruned_accuracy"] <= 1.0 and r["finetuned_accuracy"] is not None for r in runs)
    (row,) = result["registered"]
    by = {(r["method"], r["seed"]): r["pruned_accuracy"] for r in runs}
    assert row["mean"] == pytest.approx(sum(by[("obs", s)] - by[("magnitude", s)] for s in (0, 1)) / 2)
    assert (
        "Exploratory (settings differ from the registered ones): obs - magnitude"
        in (out / "results.md").read_text()
    )


def test_comparison_verdicts_follow_the_interval(bench: ModuleType) -> None:
    def run(method: str, seed: int, accuracy: float) -> object:
        return bench.Run(method, 0.9, seed, 0.6, accuracy, None, 0.0)

    worse = [run("obs", s, 0.30 + s / 100) for s in range(3)] + [run("magnitude", s, 0.5) for s in range(3)]
    assert bench.comparisons(worse, "pruned_accuracy")[0]["verdict"] == "magnitude better"
    mixed = [run("obs", s, a) for s, a in enumerate((0.4, 0.6, 0.5))] + [
        run("magnitude", s, 0.5) for s in range(3)
    ]
    assert bench.comparisons(mixed, "pruned_accuracy")[0]["verdict"] == "no difference"


def test_bad_arguments_are_named(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="sparsities"):
        bench.Args(sparsities=(1.5,))
    with pytest.raises(ValueError, match="damp"):
        bench.Args(damp=0.0)


def test_only_the_registered_settings_are_labelled_registered(bench: ModuleType) -> None:
    assert bench._registered_label(bench.Args(out="/tmp/x", threads=2)) == "Registered"
    assert bench._registered_label(bench.Args(damp=1e-2)).startswith("Exploratory")
    assert bench._registered_label(bench.Args(quick=True, seeds=2)).startswith("Exploratory")
