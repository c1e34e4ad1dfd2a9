"""scripts/bench_training.py runs end to end on a tiny grid and writes what it prints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import script_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_training") as module:
        yield module


def test_quick_grid_times_every_variant_and_counts_its_bytes(bench: ModuleType, tmp_path: Path) -> None:
    argv = ["--quick", "--models", "block", "--measure_interval", "3", "--rounds", "1", "--warmup", "1"]
    bench.main([*argv, "--peers", "off", "--inference_repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().count("| compact-rigl |") == 1 and (
        tmp_path / "speedup.png"
    ).exists()
    assert {row["batch"] for row in result["inference"]} == {1, 64}
    goals = {goal["goal"]: goal["met"] for goal in result["goals"]}
    assert goals["compact static step at 95%: >= 4.0x dense (speedup)"] is None  # not measured: no verdict
    rows = {row["variant"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(["dense", "masked-static", "compact-static", "masked-rigl", "compact-rigl"])
    assert rows["dense"]["ratio"] == pytest.approx(1.0)
    assert rows["compact-rigl"]["updates_timed"] == rows["masked-rigl"]["updates_timed"] == 1
    dense, compact = rows["dense"]["bytes"], rows["compact-static"]["bytes"]
    # 90% sparse: values, gradients and both AdamW moments of a tenth of the weights (biases and norm stay dense)
    assert compact["optimizer"] < 0.2 * dense["optimizer"] and compact["grads"] < 0.2 * dense["grads"]
    assert rows["masked-static"]["bytes"]["params"] == dense["params"]


def test_arguments_come_from_the_dataclass(bench: ModuleType) -> None:
    args = bench.parse_args(["--quick", "--sparsities", "0.8", "0.95"])
    assert args.sparsities == (0.8, 0.95) and args.batches == (64,) and args.interval == 10
    assert args.measure_interval == 5 and not args.skip_inference
    assert bench.parse_args([]).threads == (1, 2)
    with pytest.raises(ValueError, match="sparsities"):
        bench.parse_args(["--sparsities", "1.5"])
