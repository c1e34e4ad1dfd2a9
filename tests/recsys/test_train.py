"""End-to-end training on a tiny split: results, selection after settling, checkpoints, resume, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparseapps.core.config import ConfigMismatchError
from sparseapps.core.io import OWNER_FILE, OutputConflictError, claim_output
from sparseapps.recsys import demo as demo_module
from sparseapps.recsys.cli import add_commands
from sparseapps.recsys.data import MOVIELENS_ARCHIVES, InteractionSplit, synthetic_interactions
from sparseapps.recsys.demo import _demo_job
from sparseapps.recsys.train import (
    CHECKPOINT,
    COMPACT,
    OUTPUTS,
    RESULTS,
    SLOW_CHECKPOINT_VARIABLE,
    TrainConfig,
    demo_configs,
    format_table,
    load_checkpoint,
    train,
)


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
    # the ITOP rate: the engine's fraction of table entries ever active, above the density once entries moved
    assert written["itop_rate"] == results["itop_rate"] and 0.25 < written["itop_rate"] <= 1.0
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
    assert dense["itop_rate"] is None
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


def test_compact_storage_matches_masked_and_resumes_bit_for_bit(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    masked = train(
        tiny_config(method="dsl", density=0.25, grow="gradient"), None, progress=False, split=tiny_split
    )
    config = tiny_config(method="dsl", density=0.25, grow="gradient", storage="compact")
    straight = train(config, tmp_path / "straight", progress=False, split=tiny_split)
    assert straight["parameters"] == masked["parameters"] and straight["bytes"] == masked["bytes"]
    assert straight["topology_updates"] == masked["topology_updates"] > 0
    for part in ("valid", "test"):
        for metric, value in masked[part].items():
            assert straight[part][metric] == pytest.approx(value, abs=1e-6), (part, metric)
    assert straight["serving"]["max_abs_difference"] < 1e-5
    compact = torch.load(tmp_path / "straight" / COMPACT)
    assert compact["users"]["columns"].dtype == torch.uint8  # the training storage's own index width
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
    with pytest.raises(
        ValueError, match=f"{CHECKPOINT} is not a readable file of a checkpoint written by sparseapps recsys"
    ):
        train(config, tmp_path, resume=True, progress=False, split=tiny_split)


def test_k_above_the_number_of_items_is_refused(tiny_split: InteractionSplit) -> None:
    config = tiny_config(ks=(10, 500), selection_metric="recall@10")
    with pytest.raises(ValueError, match=r"at most the number of items \(60\), got \[500\]"):
        train(config, None, progress=False, split=tiny_split)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"density": 0.0}, "density must be a finite number in (0, 1], got 0.0"),
        ({"density": 1.5}, "density must be a finite number in (0, 1], got 1.5"),
        ({"dataset": "ml-7m"}, "dataset must be one of"),
        (
            {"method": "sparse"},
            "method must be one of 'dense', 'dsl', 'static', 'prune', 'pep', got 'sparse'",
        ),
        ({"selection_metric": "recall@50"}, "selection_metric must be"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"update_interval": 0}, "update_interval must be an integer >= 1, got 0"),
        ({"grow": "cosine"}, "grow='cosine' reads layer activations, which embedding tables do not have"),
        ({"grow": "unknown"}, "grow must be one of 'none', 'random', 'gradient'"),
        ({"drop": "unknown"}, "drop must be one of 'magnitude'"),
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


def test_cli_options_are_the_config_fields(tmp_path: Path) -> None:
    import argparse

    from sparseapps.recsys.cli import _config_from

    parser = argparse.ArgumentParser(prog="sparseapps")
    add_commands(parser.add_subparsers(dest="command", required=True))
    recsys = next(a for a in parser._actions if a.dest == "command").choices["recsys"]
    actions = (
        next(a for a in recsys._actions if a.dest == "recsys_command").choices["train"]._option_string_actions
    )
    for item in dataclasses.fields(TrainConfig):
        assert f"--{item.name.replace('_', '-')}" in actions, item.name
    assert actions["--reg-weight"].help.endswith("(default: 0.02; lightgcn: 0.003; neumf: 0.01)")
    assert actions["--ks"].help.endswith("(default: 10 20)") and actions["--no-rescale-init"].nargs == 0
    given = parser.parse_args(
        ["recsys", "train", "--model", "lightgcn", "--ks", "5", "20", "--out", str(tmp_path)]
    )
    assert _config_from(given) == TrainConfig.tuned("lightgcn", ks=(5, 20))
    assert _config_from(parser.parse_args(["recsys", "train", "--out", str(tmp_path)])) == TrainConfig.tuned()


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["recsys", "train", "--density", "1.5", "--out", str(tmp_path)]) == 2
    assert "density must be a finite number in (0, 1], got 1.5" in capsys.readouterr().err
    compact = ["recsys", "train", "--method", "dsl", "--storage", "compact", "--out", str(tmp_path)]
    assert run_cli(compact) == 2
    assert "grow='momentum' reads a gradient average over every step" in capsys.readouterr().err
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
    _demo_job((config.to_dict(), str(folder), False))
    before = (folder / "results.json").read_bytes()
    with pytest.raises(
        ValueError, match=r"'epochs': \(1, 2\).*move it away, pass another --out, or pass --overw"
    ):
        _demo_job((config.replace(epochs=2).to_dict(), str(folder), False))
    assert (folder / "results.json").read_bytes() == before
    replaced = _demo_job((config.replace(epochs=2).to_dict(), str(folder), True))
    assert replaced["epochs_run"] == 2 and read_record(folder)["settings"]["epochs"] == 2


class SerialPool:
    """A stand-in for ``multiprocessing.Pool``: the demo's jobs run in this process, one after another."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self) -> SerialPool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def imap(self, function, jobs):  # type: ignore[no-untyped-def]
        return map(function, jobs)

    def close(self) -> None:
        pass

    def join(self) -> None:
        pass


def test_demo_rerun_reuses_its_runs_and_refuses_foreign_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    base = TrainConfig(dataset=str(data), dim=8, epochs=1, batch_size=128, update_interval=2)
    configs = [base, base.replace(model="lightgcn", layers=1, method="dsl", density=0.25)]
    monkeypatch.setattr(demo_module, "demo_configs", lambda seed=0: configs)
    monkeypatch.setattr(
        demo_module.multiprocessing, "get_context", lambda method: SimpleNamespace(Pool=SerialPool)
    )
    out = tmp_path / "demo"
    first = demo_module.run_demo(out, workers=1)
    runs = [out / "mf-dense", out / "lightgcn-dsl-0.25"]
    checkpoints = [(run / CHECKPOINT).read_bytes() for run in runs]
    assert read_record(out) == {
        "version": 1,
        "tool": "recsys demo",
        "settings": {"runs": ["mf-dense", "lightgcn-dsl-0.25"]},
    }
    assert [read_record(run)["settings"] for run in runs] == [c.to_dict() for c in configs]

    second = demo_module.run_demo(out, workers=1)  # finished runs are reused, not retrained
    assert [row["test"] for row in second] == [row["test"] for row in first]
    assert [(run / CHECKPOINT).read_bytes() for run in runs] == checkpoints

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "table.txt").write_text("theirs\n")
    with pytest.raises(OutputConflictError, match=r"holds .*table\.txt but no sparseapps-run\.json"):
        demo_module.run_demo(foreign, workers=1)
    assert (foreign / "table.txt").read_text() == "theirs\n" and sorted(foreign.iterdir()) == [
        foreign / "table.txt"
    ]
    capsys.readouterr()
    assert run_cli(["recsys", "demo", "--out", str(foreign)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "--overwrite" in error
    demo_module.run_demo(foreign, workers=1, overwrite=True)
    assert "theirs" not in (foreign / "table.txt").read_text()


# ---------------------------------------------------------------------------------------------------------------
# The output directory: claimed, never written over


def read_record(directory: Path) -> dict[str, object]:
    return json.loads((directory / OWNER_FILE).read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_run_records_its_tool_and_settings(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=1)
    train(config, tmp_path / "run", progress=False, split=tiny_split)
    assert read_record(tmp_path / "run") == {
        "version": 1,
        "tool": "recsys train",
        "settings": config.to_dict(),
    }
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [CHECKPOINT, RESULTS, COMPACT, "recall_vs_epoch.png", "embedding_size_vs_popularity.png", OWNER_FILE]
    )


def test_resume_into_an_empty_or_missing_directory_starts(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(epochs=1)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing" / "deeper"):
        assert train(config, folder, resume=True, progress=False, split=tiny_split)["finished"] is True


def test_another_tools_run_is_refused_and_kept_unless_overwrite(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(epochs=1)
    (tmp_path / OWNER_FILE).write_text(
        json.dumps({"version": 1, "tool": "rl train", "settings": {"seed": 0}})
    )
    (tmp_path / "model.zip").write_bytes(b"an agent")
    (tmp_path / "results.json").write_text('{"return": 1}')
    before = snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(OutputConflictError) as error:
            train(config, tmp_path, resume=resume, progress=False, split=tiny_split)
        assert str(error.value) == (
            f"{tmp_path} holds a run of `sparseapps rl train` ({tmp_path / OWNER_FILE}), not `sparseapps recsys "
            "train`. Nothing was changed. Choose another output directory, or pass --overwrite (overwrite=True) to "
            "replace it"
        )
        assert snapshot(tmp_path) == before
    unreadable = config.replace(dataset=str(tmp_path / "missing.inter"))
    with pytest.raises(OutputConflictError):  # refused before the data is read
        train(unreadable, tmp_path, resume=True, progress=False)
    results = train(config, tmp_path, overwrite=True, progress=False, split=tiny_split)
    assert read_record(tmp_path)["tool"] == "recsys train"
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]
    assert (tmp_path / "model.zip").read_bytes() == b"an agent"  # not a file recsys train writes: kept


@pytest.mark.parametrize("name", [COMPACT, RESULTS, CHECKPOINT, "recall_vs_epoch.png"])
def test_foreign_outputs_are_never_replaced_silently(
    name: str, tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(epochs=1)
    (tmp_path / name).write_bytes(b"someone else's file")
    for resume in (False, True):
        with pytest.raises((OutputConflictError, FileExistsError, ValueError)) as error:
            train(config, tmp_path, resume=resume, progress=False, split=tiny_split)
        assert str(tmp_path) in str(error.value) and name in str(error.value)
        assert snapshot(tmp_path) == {name: b"someone else's file"}
        with pytest.raises((OutputConflictError, FileExistsError, ValueError)):  # before the data is read
            train(
                config.replace(dataset=str(tmp_path / "missing.inter")),
                tmp_path,
                resume=resume,
                progress=False,
            )
    train(config, tmp_path, overwrite=True, progress=False, split=tiny_split)
    assert (tmp_path / name).read_bytes() != b"someone else's file" and read_record(tmp_path)[
        "tool"
    ] == "recsys train"


def test_other_settings_are_refused_naming_the_fields(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    config = tiny_config(method="static", density=0.25, epochs=2)
    train(config, tmp_path, progress=False, split=tiny_split, stop_after=1)
    before = snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(ConfigMismatchError) as error:
            train(
                config.replace(density=0.5, seed=1), tmp_path, resume=resume, progress=False, split=tiny_split
            )
        assert str(error.value) == (
            f"{tmp_path} holds a run of another configuration ({tmp_path / OWNER_FILE}); (saved, current) differ "
            "in {'density': (0.25, 0.5), 'seed': (0, 1)}. Nothing was changed: choose another output directory, "
            "or pass --overwrite (overwrite=True) to replace it"
        )
        assert snapshot(tmp_path) == before
    with pytest.raises(FileExistsError, match="already holds a run; pass resume=True"):
        train(config, tmp_path, progress=False, split=tiny_split)
    other = config.replace(density=0.5)
    results = train(other, tmp_path, resume=True, overwrite=True, progress=False, split=tiny_split)
    assert results["epochs_run"] == 2 and read_record(tmp_path)["settings"] == other.to_dict()
    # --resume --overwrite continues a run of the same settings instead of replacing it
    train(other.replace(epochs=3), tmp_path / "b", progress=False, split=tiny_split, stop_after=2)
    straight = train(other.replace(epochs=3), None, progress=False, split=tiny_split)
    resumed = train(
        other.replace(epochs=3), tmp_path / "b", resume=True, overwrite=True, progress=False, split=tiny_split
    )
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_overwrite_without_resume_starts_afresh(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    config = tiny_config(epochs=2)
    train(config, tmp_path, progress=False, split=tiny_split, stop_after=1)
    assert load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1
    results = train(config, tmp_path, overwrite=True, progress=False, split=tiny_split, stop_after=1)
    assert results["finished"] is False and results["history"][0]["epoch"] == 1  # epoch 1 again, not epoch 2


def test_a_directory_holding_only_the_record_of_a_run_that_wrote_nothing_is_free(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(epochs=1)
    claim_output(tmp_path, tool="recsys train", settings=config.replace(seed=4).to_dict(), outputs=OUTPUTS)
    train(config, tmp_path, progress=False, split=tiny_split)
    assert read_record(tmp_path)["settings"] == config.to_dict()


def test_runs_written_before_records_and_fields_existed_still_resume(
    tiny_split: InteractionSplit, tmp_path: Path
) -> None:
    config = tiny_config(method="dsl", density=0.25, epochs=3)
    straight = train(config, None, progress=False, split=tiny_split)
    train(config, tmp_path, progress=False, split=tiny_split, stop_after=1)
    (tmp_path / OWNER_FILE).unlink()  # an older version wrote none
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    del (
        state["config"]["init_std"],
        state["config"]["pep_granularity"],
    )  # fields added since, at their defaults
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(
        FileExistsError, match=rf"already holds {CHECKPOINT} but no {OWNER_FILE}.*pass resume=True"
    ):
        train(config, tmp_path, progress=False, split=tiny_split)
    with pytest.raises(ConfigMismatchError, match=r"'epochs': \(3, 4\)"):
        train(config.replace(epochs=4), tmp_path, resume=True, progress=False, split=tiny_split)
    assert not (tmp_path / OWNER_FILE).exists()
    resumed = train(config, tmp_path, resume=True, progress=False, split=tiny_split)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert read_record(tmp_path)["settings"] == config.to_dict()


def test_the_slow_checkpoint_test_hook_needs_seconds(
    tiny_split: InteractionSplit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SLOW_CHECKPOINT_VARIABLE, "soon")
    with pytest.raises(
        ValueError, match=r"^\$SPARSEAPPS_TEST_SLOW_CHECKPOINT must be a number of seconds, got 'soon'$"
    ):
        train(tiny_config(epochs=1), tmp_path, progress=False, split=tiny_split)


def test_cli_conflicts_and_missing_data_print_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    out = tmp_path / "run"
    out.mkdir()
    (out / COMPACT).write_bytes(b"tables someone exported")
    argv = ["recsys", "train", "--dataset", str(data), "--dim", "8", "--epochs", "1", "--batch-size", "128",
            "--ks", "5", "10", "--selection-metric", "recall@10", "--no-progress", "--out", str(out)]  # fmt: skip
    for extra in ([], ["--resume"]):
        assert run_cli([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert error == (
            f"error: {out} holds {out / COMPACT} but no {OWNER_FILE}: it was written by another program or by a "
            "sparseapps version that did not record its settings. Nothing was changed. Choose another output "
            "directory, or pass --overwrite (overwrite=True) to replace it\n"
        )
    assert (out / COMPACT).read_bytes() == b"tables someone exported"
    assert run_cli([*argv, "--overwrite"]) == 0
    assert read_record(out)["tool"] == "recsys train"
    capsys.readouterr()

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    command = ["recsys", "train", "--dataset", "ml-1m", "--data-root", str(root), "--no-progress"]
    assert run_cli([*command, "--out", str(tmp_path / "ml-1m")]) == 2
    error = capsys.readouterr().err
    spec = MOVIELENS_ARCHIVES["ml-1m"]
    assert (
        error.startswith("error: ml-1m: no local copy, and the download failed (") and error.count("\n") == 1
    )
    for expected in (
        str(root / "ml-1m" / "ml-1m.inter"),
        str(root / spec.member),
        str(root / "ml-1m.zip"),
        spec.url,
        spec.md5,
    ):
        assert expected in error
    assert not (tmp_path / "ml-1m").exists()  # nothing claimed for a run that never started
