"""Training runs: results, TensorBoard logs, checkpoints and resume, drift, summaries and the CLI."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from sparseapps.cli import main
from sparseapps.core.io import MANIFEST, OWNER_FILE, CorruptFileError, claim_output, load_json
from sparseapps.rl.train import (
    SUMMARY_OUTPUTS,
    RLRun,
    make_sparsity_config,
    mean_confidence_interval,
    shared_settings,
    summarize,
    train_many,
    train_run,
)
from tests.rl.compare import archive_tensors, run_differences, without_wall_clock

PPO_TINY = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "policy_kwargs": {"net_arch": [16, 16]}}
DQN_TINY = {
    "learning_starts": 32,
    "batch_size": 32,
    "train_freq": 16,
    "gradient_steps": 4,
    "policy_kwargs": {"net_arch": [16, 16]},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_run(
    algo: str = "ppo",
    *,
    method: str = "rigl",
    sparsity: float = 0.8,
    update_interval: int = 2,
    storage: str = "masked",
    **changes: Any,
) -> RLRun:
    config = None
    if method != "dense":
        config = make_sparsity_config(
            method, sparsity=sparsity, update_interval=update_interval, storage=storage
        )
    values: dict[str, Any] = dict(
        env="CartPole-v1",
        algo=algo,
        method=method,
        sparsity=config,
        steps=256,
        eval_every=128,
        eval_episodes=2,
        checkpoint_every=0,
        hyperparameters=PPO_TINY if algo == "ppo" else DQN_TINY,
    )
    return RLRun(**{**values, **changes})


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C during training."""


class CrashingProgress:
    """A progress bar that interrupts training once ``limit`` env steps have passed."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def update(self, n: int) -> None:
        self.count += n
        if self.count >= self.limit:
            raise Interrupt


def test_train_run_writes_model_result_and_tensorboard_logs(tmp_path: Path) -> None:
    result = train_run(tiny_run(), tmp_path)
    assert result["timesteps"] == 256
    assert [point[0] for point in result["curve"]] == [128, 256]
    assert 0 < result["training_flops"]["ratio"] < 1
    assert result["topology_updates"]["policy"] > 0
    # the ITOP rate: the fraction of weights ever active, above the density once the topology has moved
    assert result["density"]["policy"] < result["itop_rate"]["policy"] <= 1
    assert result["itop_rate"]["policy"] == result["sparsity_report"]["policy"]["itop_rate"]
    assert all(0 < t <= 1 for t in result["turnover"]["policy"])
    assert 0 <= result["dormant_fraction"]["policy"] <= 1
    assert json.loads((tmp_path / "result.json").read_text())["final_return"] == result["final_return"]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    masks = {k: v for k, v in loaded.policy.state_dict().items() if k.endswith("weight_mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    assert not (tmp_path / "checkpoint").exists()
    # a finished run is returned as it is
    assert train_run(tiny_run(), tmp_path) == json.loads((tmp_path / "result.json").read_text())


def random_generators() -> tuple[Any, ...]:
    """The global generators' states (torch, numpy, Python): equal after two runs that drew the same numbers."""
    return torch.get_rng_state(), np.random.get_state(legacy=True), random.getstate()


def assert_same_generators(expected: tuple[Any, ...], got: tuple[Any, ...]) -> None:
    assert torch.equal(expected[0], got[0])
    assert expected[1][0] == got[1][0] and np.array_equal(expected[1][1], got[1][1])
    assert expected[1][2:] == got[1][2:]
    assert expected[2] == got[2]


RESUME_CASES: dict[str, dict[str, Any]] = {
    "ppo": {"steps": 384, "checkpoint_every": 64, "eval_every": 128},
    "dqn": {"algo": "dqn", "steps": 384, "checkpoint_every": 64, "eval_every": 128},
    "sac": {
        "env": "Pendulum-v1",
        "algo": "sac",
        "steps": 200,
        "checkpoint_every": 50,
        "eval_every": 100,
        "eval_episodes": 1,
        "hyperparameters": {"learning_starts": 50, "batch_size": 32, "policy_kwargs": {"net_arch": [16, 16]}},
    },
    # compact layers: SAC.load rebuilds them inside the optimizers, the targets follow every topology update
    "sac-compact": {
        "env": "Pendulum-v1",
        "algo": "sac",
        "storage": "compact",
        "steps": 200,
        "checkpoint_every": 50,
        "eval_every": 100,
        "eval_episodes": 1,
        "hyperparameters": {"learning_starts": 50, "batch_size": 32, "policy_kwargs": {"net_arch": [16, 16]}},
    },
    # gSDE's exploration matrices, two environment copies, a drift schedule mid-way (no evaluation env)
    "ppo-gsde-drifting-2envs": {
        "env": "Pendulum-v1",
        "n_envs": 2,
        "steps": 512,
        "checkpoint_every": 128,
        "eval_every": 0,
        "drift_parameter": "mass",
        "drift_shifts": ((150, 2.0),),
        "hyperparameters": {**PPO_TINY, "n_steps": 32, "use_sde": True, "sde_sample_freq": 8},
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_run_resumes_bit_for_bit(case: str, tmp_path: Path) -> None:
    """Interrupted twice mid-rollout and resumed from its checkpoints, a run ends exactly where an uninterrupted one
    ends: every tensor of model.zip (weights, masks, optimizer states), the replay buffer, every metric, and the
    global random generators."""
    run = tiny_run(**RESUME_CASES[case])
    reference = train_run(run, tmp_path / "reference", keep_replay_buffer=True)
    after_reference = random_generators()

    trial = tmp_path / "trial"
    for limit in (run.steps // 3, 2 * run.steps // 3 + 5):
        with pytest.raises(Interrupt):
            train_run(run, trial, progress=CrashingProgress(limit), keep_replay_buffer=True)
        checkpoint = trial / "checkpoint"
        assert {"model.zip", "random_state.pt", "environments.pkl", "progress.json", MANIFEST} <= {
            p.name for p in checkpoint.iterdir()
        }
    result = train_run(run, trial, keep_replay_buffer=True)
    assert_same_generators(after_reference, random_generators())
    assert result["timesteps"] == reference["timesteps"] == run.steps
    assert run_differences(tmp_path / "reference", trial) == []
    policy = archive_tensors(trial / "model.zip")["policy.pth"]
    storage = "masked" if run.sparsity is None else run.sparsity.storage
    assert any(key.endswith(".values") for key in policy) == (storage == "compact")
    assert (trial / "replay_buffer.pkl").exists() == (run.algo != "ppo")
    assert not (trial / "checkpoint").exists()
    assert sorted(p.name for p in trial.iterdir()) == sorted(
        ["tb", "model.zip", "result.json", MANIFEST] + (["replay_buffer.pkl"] if run.algo != "ppo" else [])
    )


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    run = tiny_run(checkpoint_every=64, eval_every=0)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path, progress=CrashingProgress(200))
    with pytest.raises(ValueError, match=r"another configuration.*sparsity"):
        train_run(tiny_run(checkpoint_every=64, eval_every=0, sparsity=0.5), tmp_path)
    # settings that do not change what is computed may differ
    train_run(dataclasses.replace(run, checkpoint_every=128), tmp_path)
    with pytest.raises(ValueError, match=r"another configuration.*steps"):
        train_run(tiny_run(checkpoint_every=64, eval_every=0, steps=512), tmp_path)
    assert run.sparsity is not None
    other = dataclasses.replace(run, sparsity=run.sparsity.replace(drop_fraction=0.5))
    with pytest.raises(ValueError, match=r"another configuration.*'sparsity\.drop_fraction': \(0\.3, 0\.5\)"):
        train_run(other, tmp_path)


@pytest.mark.parametrize("overrides", [None, {"drop_fraction": 0.3}])
def test_results_saved_before_the_run_contained_its_sparsity_config_are_reused(
    overrides: dict[str, float] | None, tmp_path: Path
) -> None:
    """Runs saved before issue 14 stored the sparsity and update interval as fields of their own, other fields as
    sparsity_overrides (and earlier still, none): they are recognized as the configuration those fields gave."""
    run = tiny_run(steps=64, eval_every=0)
    result = train_run(run, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    saved["run"] |= {"sparsity": 0.8, "update_interval": 2}
    if overrides is not None:
        saved["run"]["sparsity_overrides"] = overrides
    (tmp_path / "result.json").write_text(json.dumps(saved))
    (tmp_path / MANIFEST).unlink()  # nor did runs of that time write a manifest
    assert train_run(run, tmp_path)["final_return"] == result["final_return"]
    assert set(load_json(tmp_path / MANIFEST)["files"]) == {"model.zip", "result.json"}
    assert run.sparsity is not None
    with pytest.raises(ValueError, match=r"another configuration.*sparsity\.drop_fraction"):
        train_run(dataclasses.replace(run, sparsity=run.sparsity.replace(drop_fraction=0.5)), tmp_path)
    saved["run"]["sparsity_overrides"] = {"bogus": 1}
    (tmp_path / "result.json").write_text(json.dumps(saved))
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"result\.json holds settings this version cannot read .*bogus"):
        train_run(run, tmp_path)


def test_drifting_run_reports_recovery_after_each_shift(tmp_path: Path) -> None:
    run = tiny_run(
        method="static",
        steps=768,
        eval_every=0,
        drift_parameter="length",
        drift_shifts=((300, 0.25), (550, 1.0)),
    )
    result = train_run(run, tmp_path)
    phases = [episode[2] for episode in result["episodes"]]
    assert phases[0] == 0 and phases[-1] == 2
    assert [r["phase_after"] for r in result["recovery"]] == [1, 2]
    assert all(r["shift_step"] in (300, 550) for r in result["recovery"])


def test_run_settings_are_validated_and_merged() -> None:
    with pytest.raises(ValueError, match="algo"):
        RLRun(algo="trpo")
    with pytest.raises(ValueError, match="method"):
        RLRun(method="snip")
    with pytest.raises(ValueError, match="is for td3"):
        RLRun(algo="sac", preset="ds-td3")
    with pytest.raises(ValueError, match="drift_parameter"):
        RLRun(drift_shifts=((10, 2.0),))
    with pytest.raises(ValueError, match="steps"):
        RLRun(steps=0)
    run = RLRun(
        algo="dqn",
        env="CartPole-v1",
        preset="graesser-dqn",
        hyperparameters={"batch_size": 16, "policy_kwargs": {"net_arch": [8]}},
    )
    kwargs = run.algorithm_kwargs()
    assert kwargs["batch_size"] == 16  # the run's own value wins
    assert kwargs["target_update_interval"] == 100  # the preset's over the tuned rl-zoo value
    assert kwargs["policy_kwargs"] == {"net_arch": [8], "optimizer_kwargs": {"weight_decay": 1e-6}}
    assert kwargs["learning_rate"] == 2.3e-3  # tuned rl-zoo value kept
    assert run.sparsity_config().update_interval == 1000
    dense = RLRun(algo="dqn", env="CartPole-v1", method="dense", preset="graesser-dqn")
    assert dense.label == "dense" and dense.callback() is None and dense.sparsity is None
    assert dense.algorithm_kwargs()["target_update_interval"] == 100
    callback = run.callback()
    assert callback is not None and not callback.dense_output_layers
    # the run contains its engines' SparsityConfig whole; the run's seed seeds it
    tuned = RLRun(
        seed=3,
        sparsity=make_sparsity_config("rigl", update_interval=1000, drop_fraction=0.5, end_fraction=0.8),
    )
    config = tuned.sparsity_config()
    assert (config.drop_fraction, config.end_fraction, config.update_interval) == (0.5, 0.8, 1000)
    assert config.grow == "gradient" and config.sparsity == 0.9 and config.seed == 3
    assert tuned.to_dict()["sparsity"]["seed"] is None and RLRun().sparsity == make_sparsity_config("rigl")
    with pytest.raises(ValueError, match=r"unknown SparsityConfig fields.*bogus"):
        make_sparsity_config("rigl", bogus=1)
    with pytest.raises(ValueError, match="drop_fraction"):
        make_sparsity_config("rigl", drop_fraction=1.5)
    with pytest.raises(ValueError, match=r"sparsity\.seed must be None or the run's seed 0, got 5"):
        RLRun(sparsity=make_sparsity_config("rigl", seed=5))
    with pytest.raises(ValueError, match="method 'dense' trains no sparse network"):
        RLRun(method="dense", sparsity=make_sparsity_config("rigl"))
    with pytest.raises(TypeError, match="sparsity must be a SparsityConfig or None, got float"):
        RLRun(sparsity=0.8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'snip' prunes at initialization"):
        RLRun(sparsity=make_sparsity_config("rigl", method="snip", grow="none"))
    with pytest.raises(ValueError, match=r"critic_density_ratio must be a finite number > 0, got -1"):
        RLRun(critic_density_ratio=-1.0)


def test_summary_ratios_and_confidence_intervals() -> None:
    assert mean_confidence_interval([5.0]) == (5.0, 0.0)
    mean, half = mean_confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.3027 / 3**0.5, rel=1e-4)  # t(0.975, 2) = 4.3027

    def result(label: str, value: float, seconds: float) -> dict[str, Any]:
        return {
            "label": label,
            "final_return": value,
            "train_seconds": seconds,
            "training_flops": {"ratio": 0.1},
        }

    rows = summarize(
        [result("dense", -200.0, 10.0), result("rigl", -250.0, 11.0), result("dense", -200.0, 12.0)]
    )
    by_method = {row["method"]: row for row in rows}
    assert by_method["rigl"]["return_vs_dense"] == pytest.approx(0.8)  # negative returns: dense / sparse
    assert by_method["rigl"]["seconds_vs_dense"] == pytest.approx(1.0)
    assert by_method["dense"]["seeds"] == 2


def test_cli_trains_dense_and_sparse_and_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--method", "static", "--sparsity", "0.8",
        "--steps", "128", "--seeds", "1", "--eval-every", "0", "--eval-episodes", "2",
        "--hp", "n_steps=64", "--hp", "batch_size=32", "--hp", "policy_kwargs={'net_arch': [16]}",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main([*argv, "--no-progress"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dense", "static"]
    assert [row["itop_rate"] for row in summary["rows"]] == [None, None]  # a static mask: no ITOP rate
    assert (tmp_path / "curves.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "static" in printed.out and "rl train" not in printed.err  # --no-progress: no progress bar
    assert main([*argv[:-2], "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["rl", "train", "--algo", "sac", "--preset", "ds-td3", "--out", str(tmp_path / "x")]) == 2
    assert "is for td3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rl", "train", "--drift-shift", "nonsense"])


def test_cli_run_options_are_the_run_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparseapps.cli import build_parser
    from sparseapps.rl import cli as rl_cli

    rl = next(a for a in build_parser()._actions if a.dest == "command").choices["rl"]
    actions = next(a for a in rl._actions if a.dest == "rl_command").choices["train"]._option_string_actions
    for name in rl_cli.RUN_OPTIONS:
        flag = f"--{name.replace('_', '-')}"
        assert actions[flag].default is None and "(default: " in actions[flag].help, flag
    assert (
        actions["--eval-every"].help == "env steps between evaluations (0: only at the end) (default: 5000)"
    )
    built: list[RLRun] = []

    def fake_train_many(runs: list[RLRun], out: Path, **kwargs: Any) -> dict[str, Any]:
        built.extend(runs)
        return {"runs": runs, "rows": []}

    monkeypatch.setattr(rl_cli, "train_many", fake_train_many)
    monkeypatch.setattr(rl_cli, "format_table", lambda rows: "")
    assert (
        main(["rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--seeds", "1", "--out", str(tmp_path)])
        == 0
    )
    assert built == [
        RLRun(env="CartPole-v1", algo="ppo", method="dense"),
        RLRun(env="CartPole-v1", algo="ppo"),
    ]
    assert "PPO on CartPole-v1, 50000 steps" in capsys.readouterr().out
    built.clear()
    argv = [
        "rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--method", "set", "--critic-density-ratio", "0.5",
        "--steps", "64", "--n-envs", "2", "--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every", "32",
        "--threads", "2", "--device", "cpu", "--seeds", "2", "--no-dense", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    settings = dict(
        env="CartPole-v1", algo="ppo", method="set", critic_density_ratio=0.5, steps=64, n_envs=2, eval_every=0,
        eval_episodes=1, checkpoint_every=32, threads=2, device="cpu",
    )  # fmt: skip
    assert built == [RLRun(seed=seed, **settings) for seed in (0, 1)]
    assert (
        actions["--storage"].choices == ("masked", "compact")
        and "(default: masked)" in actions["--storage"].help
    )
    built.clear()
    assert main([*argv, "--storage", "compact", "--sparsity", "0.8"]) == 0
    compact = make_sparsity_config("set", sparsity=0.8, storage="compact")
    assert built == [RLRun(seed=seed, sparsity=compact, **settings) for seed in (0, 1)]


# ---------------------------------------------------------------------------------------------- one --out, many calls
def last_line(stderr: str) -> str:
    """The CLI's error: the one line after the progress bar, no traceback."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


def cli_options(out: Path, *extra: str) -> list[str]:
    return [
        "rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--sparsity", "0.8", "--steps", "64", "--seeds",
        "1", "--eval-every", "0", "--eval-episodes", "1", "--hp", "n_steps=64", "--hp", "batch_size=32", "--hp",
        "policy_kwargs={'net_arch': [16]}", "--out", str(out), *extra,
    ]  # fmt: skip


def test_another_method_into_the_same_out_adds_its_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli_options(tmp_path, "--method", "rigl")) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    dense = (tmp_path / "dense" / "seed0" / "result.json").read_bytes()
    capsys.readouterr()
    assert main(cli_options(tmp_path, "--method", "set")) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dense", "rigl", "set"]
    # every DST run carries the ITOP rate of each network, and each DST row its mean over seeds
    assert [set(r.get("itop_rate") or ()) for r in summary["runs"]] == [set(), {"policy"}, {"policy"}]
    assert [row["itop_rate"] is not None for row in summary["rows"]] == [False, True, True]
    assert [(r["label"], r["run"]["seed"]) for r in summary["runs"]] == [
        ("dense", 0),
        ("rigl", 0),
        ("set", 0),
    ]
    # the earlier rows are kept as they were
    assert without_wall_clock(summary["rows"][:2]) == without_wall_clock(first["rows"])
    assert (tmp_path / "dense" / "seed0" / "result.json").read_bytes() == dense  # dense reused, not retrained
    printed = capsys.readouterr().out
    assert all(f"\n{method} " in printed for method in ("dense", "rigl", "set"))
    assert load_json(tmp_path / OWNER_FILE)["settings"] == shared_settings(
        RLRun(env="CartPole-v1", algo="ppo", steps=64, eval_every=0, eval_episodes=1,
              hyperparameters={"n_steps": 64, "batch_size": 32, "policy_kwargs": {"net_arch": [16]}})
    )  # fmt: skip
    # a plain re-run trains nothing and changes no result
    results = {p: p.read_bytes() for p in tmp_path.glob("*/seed0/result.json")}
    assert main(cli_options(tmp_path, "--method", "set")) == 0
    assert {p: p.read_bytes() for p in tmp_path.glob("*/seed0/result.json")} == results


def test_other_settings_are_refused_with_a_one_line_error_until_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli_options(tmp_path, "--method", "rigl")) == 0
    summary = (tmp_path / "results.json").read_bytes()
    capsys.readouterr()
    # other shared settings: the whole directory is refused, nothing changes
    assert main([*cli_options(tmp_path, "--method", "set"), "--steps", "128"]) == 2
    error = last_line(capsys.readouterr().err)
    assert "'steps': (64, 128)" in error and "--overwrite" in error
    assert (tmp_path / "results.json").read_bytes() == summary
    # the same shared settings but another configuration of one run: that run is refused
    assert main(cli_options(tmp_path, "--method", "rigl", "--sparsity", "0.5")) == 2
    error = last_line(capsys.readouterr().err)
    assert (
        "another configuration" in error
        and "'sparsity.sparsity': (0.8, 0.5)" in error
        and "--overwrite" in error
    )
    # --overwrite retrains what conflicts and reuses the rest
    dense = (tmp_path / "dense" / "seed0" / "result.json").read_bytes()
    assert main(cli_options(tmp_path, "--method", "rigl", "--sparsity", "0.5", "--overwrite")) == 0
    assert load_json(tmp_path / "rigl" / "seed0" / "result.json")["run"]["sparsity"]["sparsity"] == 0.5
    assert (tmp_path / "dense" / "seed0" / "result.json").read_bytes() == dense
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert main([*cli_options(tmp_path, "--method", "set", "--overwrite"), "--steps", "128"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dense", "set"] and summary["steps"] == 128
    assert not (tmp_path / "rigl").exists() and (tmp_path / "notes.txt").exists()


def test_train_many_merges_and_overwrites_from_python(tmp_path: Path) -> None:
    rigl, dense = tiny_run(steps=64, eval_every=0), tiny_run(method="dense", steps=64, eval_every=0)
    train_many([dense, rigl], tmp_path, progress=False)
    set_run = tiny_run(method="set", steps=64, eval_every=0)
    summary = train_many([set_run], tmp_path, progress=False)
    assert summary["methods"] == ["dense", "rigl", "set"]
    # an earlier run whose result is damaged is named, never silently left out of the summary
    damaged = tmp_path / "rigl" / "seed0" / "result.json"
    damaged.write_text(damaged.read_text()[:100])
    with pytest.raises(CorruptFileError, match=r"rigl/seed0/result.json .* part of the summary"):
        train_many([set_run], tmp_path, progress=False)
    with pytest.warns(UserWarning, match=r"removing .*rigl/seed0"):
        summary = train_many([set_run], tmp_path, progress=False, overwrite=True)
    assert summary["methods"] == ["dense", "set"]
    train_many([rigl], tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="differ in"):
        train_many([tiny_run(steps=128, eval_every=0)], tmp_path, progress=False)
    summary = train_many([tiny_run(steps=128, eval_every=0)], tmp_path, progress=False, overwrite=True)
    assert summary["methods"] == ["rigl"] and summary["steps"] == 128
    with pytest.raises(ValueError, match=r"must share .* differ in \{'steps': \(64, 128\)\}"):
        train_many(
            [rigl, tiny_run(method="set", steps=128, eval_every=0)], tmp_path / "mixed", progress=False
        )
    assert not (tmp_path / "mixed").exists()


# ---------------------------------------------------------------------------------------------- bad input
def test_an_unknown_environment_is_named_before_any_directory_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["rl", "train", "--env", "CartPoleX-v9", "--steps", "64", "--seeds", "1", "--out", str(out)]
    assert main(argv) == 2
    error = last_line(capsys.readouterr().err)
    assert "'CartPoleX-v9' is not a registered gymnasium environment" in error and "'CartPole-v1'" in error
    assert not out.exists()
    with pytest.raises(ValueError, match=r"'Pendulum' is not a registered .* Close ids: 'Pendulum-v1'"):
        RLRun(env="Pendulum")


@pytest.mark.parametrize("algo", ["sac", "td3", "ddpg"])
def test_continuous_algorithms_on_a_discrete_space_say_which_algorithms_fit(
    algo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["rl", "train", "--env", "CartPole-v1", "--algo", algo, "--steps", "64", "--seeds", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    error = last_line(capsys.readouterr().err)
    assert f"algo '{algo}' needs a Box action space, but CartPole-v1 has Discrete(2)" in error
    assert "the algorithms for a Discrete action space are ppo, a2c, dqn" in error
    assert not out.exists()
    with pytest.raises(ValueError, match="Discrete"):
        train_run(RLRun(env="CartPole-v1", algo=algo, steps=64), out)
    assert not out.exists()
    with pytest.raises(
        ValueError, match=r"'dqn' needs a Discrete action space, .* are ppo, a2c, sac, td3, ddpg"
    ):
        train_run(RLRun(env="Pendulum-v1", algo="dqn", steps=64), out)


@pytest.mark.parametrize(
    "damaged",
    [
        "checkpoint/sparsity.pt",
        "checkpoint/model.zip",
        "checkpoint/progress.json",
        "result.json",
        "model.zip",
    ],
)
def test_a_truncated_file_is_named_with_how_to_start_afresh(
    damaged: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *cli_options(tmp_path, "--method", "rigl", "--no-dense"),
        "--steps",
        "256",
        "--checkpoint-every",
        "64",
    ]
    run = RLRun(  # the run the command trains
        env="CartPole-v1",
        algo="ppo",
        method="rigl",
        sparsity=make_sparsity_config("rigl", sparsity=0.8),
        steps=256,
        eval_every=0,
        eval_episodes=1,
        checkpoint_every=64,
        hyperparameters={"n_steps": 64, "batch_size": 32, "policy_kwargs": {"net_arch": [16]}},
    )
    run_dir = tmp_path / "rigl" / "seed0"
    if damaged.startswith("checkpoint/"):
        claim_output(tmp_path, tool="rl train", settings=shared_settings(run), outputs=SUMMARY_OUTPUTS)
        with pytest.raises(Interrupt):
            train_run(run, run_dir, progress=CrashingProgress(200))
    else:
        assert main(argv) == 0
    path = run_dir / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()

    assert main(argv) == 2
    error = last_line(capsys.readouterr().err)
    assert str(path) in error and f"remove {run_dir} or pass --overwrite" in error
    with pytest.raises(CorruptFileError, match=path.name) as raised:
        train_run(run, run_dir)
    assert isinstance(raised.value, ValueError)
    assert main([*argv, "--overwrite"]) == 0
    assert load_json(run_dir / "result.json")["timesteps"] == 256
