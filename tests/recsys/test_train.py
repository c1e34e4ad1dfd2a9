"""End-to-end training on a tiny split: results, selection after settling, checkpoints, resume, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseapps.recsys.cli import add_commands
from sparseapps.recsys.data import InteractionSplit, synthetic_interactions
from sparseapps.recsys.train import CHECKPOINT, TrainConfig, _demo_job, demo_configs, format_table, train


def tiny_config(**changes: object) -> TrainConfig:
    values: dict[str, object] = dict(
        dataset="synthetic-ml-100k",
        dim=8,
        epochs=4,
        batch_size=256,
        lr=0.02,
        update_interval=2,
        ks=(5, 10),
        selection_metric="recall@10",
    )
    values.update(changes)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_dense_and_dsl_runs_report_what_the_issue_asks(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    results = train(
        tiny_config(method="dsl", density=0.25), tmp_path / "dsl", progress=False, split=tiny_split
    )
    written = json.loads((tmp_path / "dsl" / "results.json").read_text())
    for key in ("valid", "test", "parameters", "bytes", "seconds_per_epoch", "seed", "config", "history"):
        assert key in written
    assert written["config"]["method"] == "dsl" and written["seed"] == 0
    assert set(written["test"]) >= {
        f"{m}@{k}" for m in ("recall", "ndcg", "hit", "precision", "mrr") for k in (5, 10)
    }
    assert results["parameters"] == round(0.25 * (tiny_split.n_users + tiny_split.n_items) * 8)
    assert results["bytes"] < 0.3 * results["dense_bytes"] + 8 * (tiny_split.n_users + tiny_split.n_items + 2)
    assert results["serving"]["max_abs_difference"] < 1e-5
    for name in ("recall_vs_epoch.png", "embedding_size_vs_popularity.png", "compact.pt", CHECKPOINT):
        assert (tmp_path / "dsl" / name).stat().st_size > 0
    assert not list((tmp_path / "dsl").glob(".*.tmp"))

    dense = train(tiny_config(method="dense"), None, progress=False, split=tiny_split)
    assert dense["parameters"] == dense["dense_parameters"] == (tiny_split.n_users + tiny_split.n_items) * 8
    table = format_table([dense, results], k=10)
    assert "Recall@10" in table and "dense" in table and f"{results['test']['recall@10']:.4f}" in table


def test_selection_waits_for_the_topology_to_settle(tiny_split: InteractionSplit) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=6, end_fraction=0.5)
    results = train(config, None, progress=False, split=tiny_split)
    settle = results["selection"]["settle_epoch"]
    assert settle == 3
    assert results["best_epoch"] >= settle
    assert results["topology_updates"] > 0


def test_early_stopping_counts_only_after_settling(tiny_split: InteractionSplit) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=8, end_fraction=0.5, patience=1, lr=1e-6)
    results = train(config, None, progress=False, split=tiny_split)
    # at lr 1e-6 nothing improves: stop one evaluation after the first selectable one (epoch 4)
    assert results["stopped_early"] and results["epochs_run"] == 5


def test_resume_continues_bit_for_bit(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=4, model="lightgcn", layers=1)
    straight = train(config, tmp_path / "straight", progress=False, split=tiny_split)
    partial = train(config, tmp_path / "cut", progress=False, split=tiny_split, stop_after=2)
    assert partial["finished"] is False and partial["epoch"] == 2
    resumed = train(config, tmp_path / "cut", resume=True, progress=False, split=tiny_split)
    assert resumed["test"] == straight["test"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_existing_run_needs_resume_and_the_same_configuration(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(method="static", density=0.25, epochs=2)
    train(config, tmp_path, progress=False, split=tiny_split, stop_after=1)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(config, tmp_path, progress=False, split=tiny_split)
    with pytest.raises(ValueError, match=r"another configuration.*'density': \(0.25, 0.5\)"):
        train(config.replace(density=0.5), tmp_path, resume=True, progress=False, split=tiny_split)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{CHECKPOINT} is not a readable file"):
        train(config, tmp_path, resume=True, progress=False, split=tiny_split)


def test_k_above_the_number_of_items_is_refused(tiny_split: InteractionSplit) -> None:
    config = tiny_config(ks=(10, 500), selection_metric="recall@10")
    with pytest.raises(ValueError, match=r"at most the number of items \(60\), got \[500\]"):
        train(config, None, progress=False, split=tiny_split)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"density": 0.0}, "density must be a finite number > 0 and <= 1, got 0.0"),
        ({"density": 1.5}, "density must be a finite number > 0 and <= 1, got 1.5"),
        ({"dataset": "ml-7m"}, "dataset must be one of"),
        (
            {"method": "sparse"},
            "method must be one of 'dense', 'dsl', 'static', 'prune', 'pep', got 'sparse'",
        ),
        ({"selection_metric": "recall@50"}, "selection_metric must be"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
    ],
)
def test_bad_configs(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_config_round_trip_and_demo_runs() -> None:
    config = tiny_config(method="dsl")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"colour": 1})
    configs = demo_configs()
    assert [(c.model, c.method, c.density if c.method != "dense" else 1.0) for c in configs] == [
        (model, method, density)
        for model in ("mf", "lightgcn")
        for method, density in (("dense", 1.0), ("dsl", 0.5), ("dsl", 0.2), ("dsl", 0.1))
    ]


def write_inter(path: Path, seed: int = 0) -> Path:
    rows = synthetic_interactions(n_users=30, n_items=40, n_interactions=600, min_per_user=10, seed=seed)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in zip(rows.users, rows.items, rows.timestamps, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="sparseapps")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_trains_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    argv = [
        "recsys", "train", "--dataset", str(data), "--model", "mf", "--method", "dsl", "--density", "0.25",
        "--dim", "8", "--epochs", "2", "--batch-size", "128", "--ks", "5", "10", "--selection-metric",
        "recall@10", "--update-interval", "2", "--no-rescale-init", "--out", str(tmp_path / "run"),
        "--no-progress",
    ]  # fmt: skip
    assert run_cli(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["rescale_init"] is False and results["config"]["ks"] == [5, 10]
    assert "mf dsl density 0.25: test recall@10" in capsys.readouterr().out
    assert run_cli(argv) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert run_cli([*argv, "--resume"]) == 0
    assert run_cli([*argv, "--resume", "--density", "0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["recsys", "train", "--density", "1.5", "--out", str(tmp_path)]) == 2
    assert "density must be a finite number > 0 and <= 1, got 1.5" in capsys.readouterr().err
    missing = tmp_path / "missing.inter"
    assert run_cli(["recsys", "train", "--dataset", str(missing), "--out", str(tmp_path / "x")]) == 2
    assert "missing.inter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_seeds_make_runs_reproducible_and_threads_are_restored(tiny_split: InteractionSplit) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=2)
    before = torch.get_num_threads()
    first = train(config, None, progress=False, split=tiny_split, threads=1)
    assert torch.get_num_threads() == before
    second = train(config, None, progress=False, split=tiny_split)
    assert first["test"] == second["test"]
    assert np.isfinite(first["history"][0]["loss"])
    other = train(config.replace(seed=1), None, progress=False, split=tiny_split)
    assert other["history"][0]["loss"] != first["history"][0]["loss"]


def test_neumf_trains_dense_and_dsl_resumes_and_serves_like_the_dense_model(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    assert TrainConfig.tuned("neumf").model_config().model == "neumf"
    dense = train(tiny_config(model="neumf", epochs=2), None, progress=False, split=tiny_split)
    assert dense["parameters"] == (tiny_split.n_users + tiny_split.n_items) * 8
    config = tiny_config(model="neumf", method="dsl", density=0.25)
    partial = train(config, tmp_path / "neumf", progress=False, split=tiny_split, stop_after=2)
    assert partial["finished"] is False
    results = train(config, tmp_path / "neumf", resume=True, progress=False, split=tiny_split)
    straight = train(config, None, progress=False, split=tiny_split)
    assert results["test"] == straight["test"]
    assert [h["loss"] for h in results["history"]] == [h["loss"] for h in straight["history"]]
    assert results["parameters"] == round(0.25 * (tiny_split.n_users + tiny_split.n_items) * 8)
    assert results["serving"]["max_abs_difference"] < 1e-5
    assert (tmp_path / "neumf" / "compact.pt").stat().st_size > 0


def test_demo_refuses_a_run_left_by_other_settings_and_keeps_it(tmp_path: Path) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    config = TrainConfig(
        dataset=str(data), dim=8, epochs=1, batch_size=128, ks=(5, 10), selection_metric="recall@10"
    )
    folder = tmp_path / "demo" / "mf-dense"
    _demo_job((config.to_dict(), str(folder)))
    before = (folder / "results.json").read_bytes()
    with pytest.raises(ValueError, match=r"'epochs': \(1, 2\).*move it away or pass another --out"):
        _demo_job((config.replace(epochs=2).to_dict(), str(folder)))
    assert (folder / "results.json").read_bytes() == before
