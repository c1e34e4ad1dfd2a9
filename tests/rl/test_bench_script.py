"""scripts/bench_rl.py's planning and verdicts, checked without training anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import script_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_rl") as module:
        yield module


def test_slow_suite_only_with_slow_and_its_budget_follows_slow_steps(bench: ModuleType) -> None:
    assert "sac-halfcheetah" not in [s.name for s in bench.suites(False, False)]
    cheetah = {s.name: s for s in bench.suites(False, True, 50_000)}["sac-halfcheetah"]
    assert (cheetah.env, cheetah.algo, cheetah.steps, cheetah.eval_every) == (
        "HalfCheetah-v5",
        "sac",
        50_000,
        5_000,
    )
    # The same RigL schedule as the Pendulum suite.
    assert cheetah.rigl_overrides == bench.SAC_RIGL
    run = next(r for r in bench.make_runs(cheetah, [10]) if r.method == "rigl")
    assert run.sparsity is not None
    assert (run.sparsity.drop_fraction, run.sparsity.end_fraction, run.sparsity.update_interval) == (
        0.5,
        0.8,
        1000,
    )
    assert run.algorithm_kwargs()["learning_starts"] == 10_000  # rl-zoo3's MuJoCo warm-up


def test_plan_shares_dense_runs_and_runs_seed_by_seed(bench: ModuleType, tmp_path: Path) -> None:
    chosen = [s for s in bench.suites(False, False) if s.name in ("sac-pendulum", "sac-pendulum-98")]
    per_suite, jobs = bench.plan(chosen, [3, 4], tmp_path)
    dense_dirs = {d for pairs in per_suite.values() for run, d in pairs if run.method == "dense"}
    assert dense_dirs == {str(tmp_path / "sac-pendulum" / "dense" / f"seed{k}") for k in (3, 4)}
    # 2 seeds x (dense + 2 x static + 2 x rigl), each dense run once.
    assert len(jobs) == 10 and len({d for _, d in jobs}) == 10
    assert [run.seed for run, _ in jobs] == [3] * 5 + [4] * 5
    assert {run.sparsity.sparsity for run, _ in jobs if run.sparsity is not None} == {0.9, 0.98}


def test_paired_difference_is_rigl_minus_static_seed_by_seed(bench: ModuleType) -> None:
    rows = [
        {"method": "static", "per_seed": [10.0, 20.0, 30.0]},  # learning_speed rows carry no "seeds"
        {"method": "rigl", "per_seed": [12.0, 23.0, 34.0]},
    ]
    paired = bench.paired_difference(rows)
    assert paired["per_seed"] == [2.0, 3.0, 4.0]
    assert paired["mean"] == pytest.approx(3.0)
    assert paired["ci95"] == pytest.approx(4.3027 * 1.0 / 3**0.5, rel=1e-4)  # t(0.975, 2) = 4.3027
    assert paired["above_zero"] is True  # 3 - 2.48 > 0
    rows[1]["per_seed"] = [12.0, 23.0, 26.0]
    assert bench.paired_difference(rows)["above_zero"] is False
    assert bench.paired_difference(rows[:1]) is None


def test_goals_name_the_verdicts(bench: ModuleType) -> None:
    def row(method: str, values: list[float], **extra: float) -> dict:
        mean = sum(values) / len(values)
        return {
            "method": method,
            "seeds": len(values),
            "final_return": mean,
            "ci95": 1.0,
            "per_seed": values,
            **extra,
        }

    report = {
        "ppo-cartpole": {
            "rows": [
                row("dense", [500.0, 500.0]),
                row("static", [400.0, 420.0], return_vs_dense=0.82),
                row("rigl", [490.0, 480.0], return_vs_dense=0.97, seconds_vs_dense=1.2, flops_ratio=0.12),
            ],
            "paired": {"mean": 75.0, "ci95": 10.0, "above_zero": True},
        },
        "sac-halfcheetah": {
            "rows": [row("static", [1000.0, 900.0]), row("rigl", [800.0, 950.0], return_vs_dense=0.9)],
        },
    }
    text = "\n".join(bench.goals(report))
    assert "ppo-cartpole: RigL keeps 0.970 of dense return (goal >= 0.95: reached); beats static: yes" in text
    assert "paired RigL - static +75.0 ± 10.0 -> above 0" in text
    assert "RigL wall-clock 1.20x dense (goal <= 1.15: NOT reached)" in text
    # HalfCheetah is reported, but the 95%-of-dense goal is Pendulum's and CartPole's.
    assert "sac-halfcheetah: RigL keeps 0.900 of dense return; beats static: NO" in text
    assert "higher in 1 of 2 seeds" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slow", "--slow-steps", "0"], "--slow-steps must be >= 1, got 0"),
        (["--seeds", "0"], "got 0, 1 and 10"),
        (["--only", "no-such-suite"], "no suite matches --only ['no-such-suite']"),
    ],
)
def test_bad_arguments_exit_2_with_the_value(
    bench: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
