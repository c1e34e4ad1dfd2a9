"""Training runs: results, TensorBoard logs, checkpoints and resume, drift, summaries and the CLI."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from stable_baselines3 import PPO

from sparseapps.cli import main
from sparseapps.rl.train import RLRun, mean_confidence_interval, summarize, train_run

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


def tiny_run(algo: str = "ppo", **changes: Any) -> RLRun:
    values: dict[str, Any] = dict(
        env="CartPole-v1",
        algo=algo,
        method="rigl",
        sparsity=0.8,
        update_interval=2,
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


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_interrupted_run_resumes_from_its_checkpoint(algo: str, tmp_path: Path) -> None:
    run = tiny_run(algo, checkpoint_every=64, eval_every=0)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path, progress=CrashingProgress(200))
    checkpoint = tmp_path / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} >= {"model.zip", "sparsity.pt", "run.json", "progress.json"}
    if algo == "dqn":
        assert (checkpoint / "replay_buffer.pkl").exists()
    saved = torch.load(checkpoint / "sparsity.pt", weights_only=False)["engines"]

    result = train_run(run, tmp_path)
    assert result["timesteps"] == 256
    assert not checkpoint.exists()
    # the engines continued the checkpoint's schedule: its topology updates are the first of the run
    name = "policy" if algo == "ppo" else "q_net"
    before = [
        sum(t["dropped"] + t["grown"] for t in update["tensors"].values())
        / (2 * sum(t["nnz"] for t in update["tensors"].values()))
        for update in saved[name]["history"]
    ]
    assert before and result["turnover"][name][: len(before)] == pytest.approx(before)
    uninterrupted = train_run(run, tmp_path / "uninterrupted")
    assert result["topology_updates"] == uninterrupted["topology_updates"]


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
    with pytest.raises(ValueError, match=r"another configuration.*sparsity_overrides"):
        train_run(dataclasses.replace(run, sparsity_overrides={"drop_fraction": 0.5}), tmp_path)


def test_results_saved_before_sparsity_overrides_existed_are_reused(tmp_path: Path) -> None:
    run = tiny_run(steps=64, eval_every=0)
    result = train_run(run, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    del saved["run"]["sparsity_overrides"]
    (tmp_path / "result.json").write_text(json.dumps(saved))
    assert train_run(run, tmp_path)["final_return"] == result["final_return"]
    with pytest.raises(ValueError, match="another configuration"):
        train_run(dataclasses.replace(run, sparsity_overrides={"drop_fraction": 0.5}), tmp_path)


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
    assert dense.label == "dense" and dense.callback() is None
    assert dense.algorithm_kwargs()["target_update_interval"] == 100
    callback = run.callback()
    assert callback is not None and not callback.dense_output_layers
    tuned = RLRun(update_interval=1000, sparsity_overrides={"drop_fraction": 0.5, "end_fraction": 0.8})
    config = tuned.sparsity_config()
    assert (config.drop_fraction, config.end_fraction, config.update_interval) == (0.5, 0.8, 1000)
    assert config.grow == "gradient" and config.seed == 0  # the rest stays RigL's, seeded by the run
    with pytest.raises(ValueError, match="bogus"):
        RLRun(sparsity_overrides={"bogus": 1})
    with pytest.raises(ValueError, match="update_interval"):
        RLRun(sparsity_overrides={"update_interval": 5})
    with pytest.raises(ValueError, match="drop_fraction"):
        RLRun(sparsity_overrides={"drop_fraction": 1.5})


def test_summary_ratios_and_confidence_intervals() -> None:
    assert mean_confidence_interval([5.0]) == (5.0, 0.0)
    mean, half = mean_confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5)

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
    assert main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dense", "static"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "static" in capsys.readouterr().out
    assert main([*argv[:-2], "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["rl", "train", "--algo", "sac", "--preset", "ds-td3", "--out", str(tmp_path / "x")]) == 2
    assert "is for td3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rl", "train", "--drift-shift", "nonsense"])
