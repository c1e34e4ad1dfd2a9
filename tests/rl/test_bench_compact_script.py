"""scripts/bench_rl_compact.py's sparsity matching and summary, checked without training anything."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.scripts import script_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_rl_compact") as module:
        yield module


def test_the_wide_agent_trains_the_dense_agents_number_of_weights(bench: ModuleType) -> None:
    args = bench.Args()
    dense = bench.weight_counts(bench.build(args, 256, 0))
    wide = bench.weight_counts(bench.build(args, 1024, 0))
    # Pendulum: obs 3, action 1; actor 3-256-256 + mu and log_std; two critics 4-256-256-1
    assert dense["weights"] == (3 * 256 + 256 * 256 + 2 * 256) + 2 * (4 * 256 + 256 * 256 + 256)
    assert wide["output_weights"] == 2 * 1024 + 2 * 1024
    sparsity = bench.matching_sparsity(dense, wide)
    assert sparsity == pytest.approx(0.9378, abs=1e-4)
    assert round((1 - sparsity) * wide["hidden_weights"]) + wide["output_weights"] == dense["weights"]
    with pytest.raises(ValueError, match="more weights"):
        bench.matching_sparsity({"weights": 10}, wide)


def test_summary_pairs_seeds_and_judges_the_goal(bench: ModuleType) -> None:
    args = bench.Args(steps=100, masked_steps=50, seeds=2)

    def record(variant: str, seed: int, at_50: float, at_100: float | None) -> dict[str, object]:
        seconds_at = {"50": at_50} | ({"100": at_100} if at_100 is not None else {})
        steps = 100 if at_100 is not None else 50
        return {"variant": variant, "seed": seed, "steps": steps, "seconds": seconds_at[str(steps)],
                "seconds_at": seconds_at, "return": -100.0 * (seed + 1), "trained_weights": 7}  # fmt: skip

    records = [
        record("dense", 0, 1.0, 2.0),
        record("dense", 1, 2.0, 4.0),
        record("compact", 0, 1.1, 2.2),
        record("compact", 1, 2.4, 4.8),
        record("masked", 0, 8.0, None),
        record("masked", 1, 20.0, None),
    ]
    summary = bench.summarize(args, records)
    assert summary["dense"]["seconds_vs_dense_median_of_pairs"] == 1.0
    assert summary["compact"]["seconds_vs_dense_per_seed"] == pytest.approx([1.1, 1.2])
    assert summary["compact"]["seconds_vs_dense_median_of_pairs"] == pytest.approx(1.15)
    assert summary["masked"]["seconds_vs_dense_per_seed"] == pytest.approx([8.0, 10.0])
    assert summary["goal"]["met"] and summary["goal"]["ratio"] == pytest.approx(1.15)
    assert not bench.summarize(
        args, [*records[:2], record("compact", 0, 1.0, 2.5), record("compact", 1, 2.0, 5.0)]
    )["goal"]["met"]
    partial = bench.summarize(args, [records[0], records[2], records[3]])  # seed 1's dense run not in yet
    assert partial["compact"]["seconds_vs_dense_per_seed"] == pytest.approx([1.1])
    table = bench.markdown(args, 0.9, summary, {"threads": 1, "cpu": "test"})
    assert "| RigL compact | 1024x2 | 0.9000 | 7 | 100 |" in table and "1.15x, met" in table


def test_summary_pairs_returns_by_seed(bench: ModuleType) -> None:
    args = bench.Args(steps=100, masked_steps=0, seeds=3, first_seed=400)

    def record(variant: str, seed: int, value: float) -> dict[str, object]:
        return {"variant": variant, "seed": seed, "steps": 100, "seconds": 1.0, "seconds_at": {"100": 1.0},
                "return": value, "trained_weights": 7}  # fmt: skip

    dense = [record("dense", 400 + k, r) for k, r in enumerate((-150.0, -120.0, -200.0))]
    worse = [record("compact", 400 + k, r) for k, r in enumerate((-160.0, -131.0, -209.0))]
    returns = bench.summarize(args, dense + worse)["compact"]["return_vs_dense"]
    assert returns["differences"] == [-10.0, -11.0, -9.0] and returns["mean"] == -10.0
    low, high = returns["ci95"]
    assert low < -10.0 < high < 0 and returns["verdict"] == "worse" and returns["p"] < 0.01
    mixed = [record("compact", 400 + k, r) for k, r in enumerate((-140.0, -130.0, -200.0))]
    assert (
        bench.summarize(args, dense + mixed)["compact"]["return_vs_dense"]["verdict"] == "no difference shown"
    )
    table = bench.markdown(args, 0.9, bench.summarize(args, dense + worse), {"threads": 1, "cpu": "test"})
    assert (
        "3 paired seeds from 400" in table and "paired over 3 seeds: -10.0 [" in table and ": worse." in table
    )
    with pytest.raises(ValueError, match="first_seed"):
        bench.Args(first_seed=-1)
