"""`sparseapps continual run`: an interrupted and resumed run is bitwise the uninterrupted one; nothing is lost.

In-process interruptions stop a run right after its n-th checkpoint (the checkpoint writer raises once it has
written), resume it, and compare every checkpoint the resumed run writes with the uninterrupted run's checkpoint
at the same position (every tensor with ``torch.equal``: parameters, buffers, masks, ownership maps, optimizer
state, isolation state, random states), then the results (every metric; wall-clock seconds excepted).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sparseapps.continual.resume as resume
import sparseapps.continual.train as train
from sparseapps.cli import main
from sparseapps.continual.benchmarks import make_benchmark
from sparseapps.continual.checkpoint import FORMAT, TOOL
from sparseapps.continual.config import IsolationConfig
from sparseapps.continual.train import ContinualRun, run_continual
from sparseapps.core import SparsityConfig
from sparseapps.core.io import (
    TEMPORARY_GLOB,
    CorruptFileError,
    OutputConflictError,
    claim_output,
    load_torch,
    save_torch,
)

ROOT = Path(__file__).resolve().parents[2]
WALL_CLOCK = ("train_seconds", "task_elapsed_seconds")

MLP = ContinualRun(
    benchmark="split-digits",
    epochs=2,
    hidden=(16, 16),
    lr=1e-2,
    threads=1,
    isolation=IsolationConfig(
        sparsity=SparsityConfig(sparsity=0.8, distribution="uniform", grow="momentum", update_interval=2)
    ),
)
CNN = ContinualRun(
    benchmark="split-digits",
    n_tasks=2,
    model="cnn",
    channels=(4, 8),
    cnn_hidden=16,
    batch_norm=True,
    epochs=2,
    lr=1e-2,
    threads=1,
    isolation=IsolationConfig(
        sparsity=SparsityConfig(sparsity=0.7, distribution="uniform", grow="gradient", update_interval=3)
    ),
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


# ----------------------------------------------------------------------------------------------- helpers


class _Interrupted(Exception):
    """Stands for a kill right after a checkpoint was written."""


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every difference between two saved states (tensors with torch.equal), wall-clock fields excepted."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if key in WALL_CLOCK:
                continue
            if key not in a or key not in b:
                found.append(f"{where}.{key} (missing on one side)")
            else:
                found += _differences(a[key], b[key], f"{where}.{key}")
        return found
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _run(
    run: ContinualRun, out: Path, *, stop_at: tuple[int, int] | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Runs (or resumes) ``run`` into ``out``; returns its results (None when stopped) and every checkpoint it wrote.

    ``stop_at=(completed, steps)`` interrupts the run right after it wrote the checkpoint at that position.
    """
    written: list[dict[str, Any]] = []

    def save(path: Path, state: dict[str, Any]) -> None:
        save_torch(path, state)
        written.append(load_torch(path))  # a copy: the live tensors go on training
        if (state["completed"], state["steps"]) == stop_at:
            raise _Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resume, "save_torch", save)
        try:
            result = run_continual(run, progress=False, out=out, resume=True, checkpoint_every=1)
        except _Interrupted:
            result = None
    if stop_at is not None:
        assert result is None, f"the run never wrote a checkpoint at {stop_at}"
    return result, written


def _position(state: dict[str, Any]) -> tuple[int, int]:
    return state["completed"], state["steps"]


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The uninterrupted runs: results and every checkpoint (one after every optimizer step and every task)."""
    found = {}
    for name, run in (("mlp", MLP), ("cnn", CNN)):
        result, written = _run(run, tmp_path_factory.mktemp(f"reference-{name}"))
        assert result is not None
        found[name] = (result, written)
    return found


def _batches_per_epoch(run: ContinualRun, task: int) -> int:
    benchmark = make_benchmark(run.benchmark, n_tasks=run.n_tasks, seed=run.seed, task_incremental=True)
    return math.ceil(len(benchmark.train_stream[task].dataset) / run.batch_size)


def _assert_resumed_equals_reference(
    reference: tuple[dict[str, Any], list[dict[str, Any]]],
    resumed_result: dict[str, Any] | None,
    written: list[dict[str, Any]],
    stopped_at: tuple[int, int],
) -> None:
    result, saved = reference
    positions = [_position(state) for state in saved]
    tail = saved[positions.index(stopped_at) + 1 :]
    assert [_position(state) for state in written] == [_position(state) for state in tail]
    for expected, got in zip(tail, written, strict=True):
        assert _differences(expected, got) == [], f"checkpoint at {_position(expected)}"
    assert resumed_result is not None
    assert _differences(result, resumed_result) == []
    assert len(resumed_result["train_seconds"]) == len(result["accuracy_matrix"])


# ----------------------------------------------------------------------------------------------- exact resume


def _stop_points(run: ContinualRun) -> dict[str, tuple[int, int]]:
    first, third, last = _batches_per_epoch(run, 0), _batches_per_epoch(run, 2), _batches_per_epoch(run, 4)
    return {
        "after the first step": (0, 1),
        "at an epoch boundary": (0, first),
        "between two tasks": (1, 0),
        "inside a later task's second epoch": (2, third + 4),
        "one step before a task ends": (4, 2 * last - 1),
        "after the last task, before the results": (5, 0),
    }


@pytest.mark.parametrize("point", list(_stop_points(MLP)))
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, references, point):
    stop_at = _stop_points(MLP)[point]
    _, before = _run(MLP, tmp_path, stop_at=stop_at)
    assert _position(before[-1]) == stop_at
    assert not (tmp_path / "results.json").exists()
    result, written = _run(MLP, tmp_path)
    _assert_resumed_equals_reference(references["mlp"], result, written, stop_at)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["accuracy_matrix"] == references["mlp"][0]["accuracy_matrix"]


def test_two_interruptions_in_a_row(tmp_path, references):
    saved = references["mlp"][1]
    positions = [_position(state) for state in saved]
    _run(MLP, tmp_path, stop_at=(1, 5))
    _, middle = _run(MLP, tmp_path, stop_at=(3, 7))
    expected = saved[positions.index((1, 5)) + 1 : positions.index((3, 7)) + 1]
    assert [_position(state) for state in middle] == [_position(state) for state in expected]
    for want, got in zip(expected, middle, strict=True):
        assert _differences(want, got) == [], f"checkpoint at {_position(want)}"
    resumed, written = _run(MLP, tmp_path)
    _assert_resumed_equals_reference(references["mlp"], resumed, written, (3, 7))


def test_cnn_with_batch_norm_and_gradient_growth_resumes_bit_for_bit(tmp_path, references):
    stop_at = (1, _batches_per_epoch(CNN, 1) + 2)
    _run(CNN, tmp_path, stop_at=stop_at)
    result, written = _run(CNN, tmp_path)
    _assert_resumed_equals_reference(references["cnn"], result, written, stop_at)
    running_means = [key for key in written[-1]["model"] if key.endswith("running_mean")]
    assert running_means  # the batch-norm statistics were among the compared buffers


def test_checkpoints_do_not_change_the_run(references):
    assert _differences(references["mlp"][0], run_continual(MLP, progress=False)) == []


def test_checkpoint_holds_only_weights_only_content_and_every_piece_of_state(references):
    state = references["mlp"][1][-1]  # loaded with weights_only=True
    assert set(state) >= {"model", "optimizer", "plugin", "evaluator", "record", "rng", "settings"}
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    isolation = state["plugin"]["isolation"]
    assert isinstance(isolation["generator"], torch.Tensor) and isolation["task_order"] == [0, 1, 2, 3, 4]
    assert isolation["engine"] is None and [t["task"] for t in isolation["task_itop"]] == [0, 1, 2, 3, 4]
    inside = next(s for s in references["mlp"][1] if s["steps"] == 5)["plugin"]["isolation"]
    assert inside["engine"]["step"] == 5 and set(inside["engine"]["growth_regions"]) == set(
        inside["engine"]["masks"]
    )  # a checkpoint inside a task holds the task's engine
    assert any(key.endswith("owner") for key in state["model"])
    assert any(key.endswith("weight_mask") for key in state["model"])


# ----------------------------------------------------------------------------------------------- nothing is lost


def _cli(out: Path, *extra: str, seed: int = 0, every: int = 5) -> list[str]:
    return [
        "continual",
        "run",
        "--benchmark",
        "split-digits",
        "--n-tasks",
        "2",
        "--epochs",
        "1",
        "--hidden",
        "16,16",
        "--sparsity",
        "0.8",
        "--distribution",
        "uniform",
        "--seed",
        str(seed),
        "--checkpoint-every",
        str(every),
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


def test_a_second_run_into_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(out)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(_cli(out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out} already holds this run ({out / 'results.json'})" in line
    assert "--resume" in line and "--overwrite" in line
    assert main(_cli(out, seed=1)) == 2  # other settings: refused naming the field, even with --resume
    line = _one_error_line(capsys.readouterr().err)
    assert "'seed': (0, 1)" in line and "sparseapps-run.json" in line
    assert main(_cli(out, "--resume", seed=1)) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_of_a_finished_run_reuses_its_results(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_cli(out)) == 0
    first = capsys.readouterr().out
    results = (out / "results.json").read_bytes()
    (out / "capacity.png").unlink()  # killed between the plots and the results? results.json is written last

    def never(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train, "train_and_evaluate", never)
    assert main(_cli(out, "--resume")) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[:-1] == first.splitlines()[:-1]  # the same summary, every metric
    assert (out / "results.json").read_bytes() == results and (out / "capacity.png").exists()


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(out)) == 0
    (out / "notes.txt").write_text("mine")
    stale = time.time() - 1000
    os.utime(out / "results.json", (stale, stale))
    assert main(_cli(out, "--overwrite")) == 0  # the same settings, afresh
    assert (out / "results.json").stat().st_mtime > stale + 500
    assert main(_cli(out, "--overwrite", seed=1)) == 0  # other settings
    assert json.loads((out / "results.json").read_text())["run"]["seed"] == 1
    assert json.loads((out / "sparseapps-run.json").read_text())["settings"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert main(_cli(out, "--overwrite", "--resume")) == 2
    assert "must not both be set" in _one_error_line(capsys.readouterr().err)


def test_resume_into_an_empty_or_missing_directory_starts_the_run(tmp_path, capsys):
    assert main(_cli(tmp_path / "plain")) == 0
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for out in (missing, empty):
        assert main(_cli(out, "--resume")) == 0
        plain = json.loads((tmp_path / "plain" / "results.json").read_text())
        resumed = json.loads((out / "results.json").read_text())
        assert _differences(plain, resumed) == []


def test_foreign_outputs_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(_cli(out, "--resume")) == 2
    assert "but no sparseapps-run.json" in _one_error_line(capsys.readouterr().err)
    assert (out / "results.json").read_text() == "{}"


def test_truncated_checkpoint_names_the_file_and_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(out)) == 0
    (out / "results.json").unlink()  # as if killed before the results
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert main(_cli(out, "--resume")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(checkpoint) in line and "remove it" in line and "--overwrite" in line
    assert main(_cli(out, "--overwrite")) == 0
    assert load_torch(checkpoint)["completed"] == 2


def test_checkpoint_of_another_configuration_is_refused_naming_the_fields(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(_cli(first)) == 0
    assert main(_cli(second, seed=1)) == 0
    (second / "results.json").unlink()
    (second / "checkpoint.pt").write_bytes((first / "checkpoint.pt").read_bytes())  # copied by mistake
    capsys.readouterr()
    assert main(_cli(second, "--resume", seed=1)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(second / "checkpoint.pt") in line
    assert "{'isolation.sparsity.seed': (0, 1), 'seed': (0, 1)}" in line


def _earlier_version_run(out: Path, *, finished: bool) -> None:
    """A run directory as the version before the engine redesign left it: its settings name isolation.growth
    (IsolationConfig copied SparsityConfig's fields) and its checkpoint is of version 1."""
    settings = json.loads(json.dumps(MLP.settings()))
    settings["isolation"] = {
        "sparsity": 0.8,
        "distribution": "uniform",
        "growth": "momentum",
        "update_interval": 2,
    }
    claim_output(out, tool=TOOL, settings=settings, outputs=["checkpoint.pt", "results.json"])
    save_torch(out / "checkpoint.pt", {"format": FORMAT, "version": 1, "settings": settings, "completed": 1})
    if finished:
        (out / "results.json").write_text(json.dumps({"accuracy_matrix": [[1.0]], "acc": 1.0, "bwt": 0.0}))


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_of_the_version_before_the_engine_redesign_is_refused_naming_its_files(tmp_path, finished):
    out = tmp_path / "old"
    _earlier_version_run(out, finished=finished)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for resume_it in (False, True):
        with pytest.raises(OutputConflictError) as error:
            run_continual(MLP, progress=False, out=out, resume=resume_it)
        message = str(error.value)
        assert str(out / "sparseapps-run.json") in message and str(out / "checkpoint.pt") in message
        assert "earlier sparseapps version" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was changed
    result = run_continual(MLP, progress=False, out=out, overwrite=True, checkpoint_every=0)
    assert result["bwt_exact_zero"] and load_torch(out / "checkpoint.pt")["version"] == 2


def test_python_api_refuses_a_second_run_and_checks_its_arguments(tmp_path):
    out = tmp_path / "run"
    first = run_continual(MLP, progress=False, out=out, checkpoint_every=0)
    with pytest.raises(OutputConflictError, match=r"already holds this run .*--resume"):
        run_continual(MLP, progress=False, out=out)
    assert run_continual(MLP, progress=False, out=out, resume=True) == json.loads(
        (out / "results.json").read_text()
    )
    assert _differences(first, run_continual(MLP, progress=False, out=out, overwrite=True)) == []
    tmp_path = tmp_path / "unused"
    tmp_path.mkdir()
    with pytest.raises(ValueError, match=r"out must be an output directory with resume or overwrite"):
        run_continual(MLP, resume=True)
    with pytest.raises(ValueError, match=r"checkpoint_every must be an integer >= 0, got -1"):
        run_continual(MLP, out=tmp_path, checkpoint_every=-1)
    with pytest.raises(TypeError, match=r"resume must be True or False, got 'yes'"):
        run_continual(MLP, out=tmp_path, resume="yes")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # nothing claimed


def test_damaged_checkpoint_content_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    _run(MLP, out, stop_at=(0, 3))
    state = load_torch(out / "checkpoint.pt")
    state["model"] = {"nonsense": torch.zeros(1)}
    save_torch(out / "checkpoint.pt", state)
    with pytest.raises(CorruptFileError, match=r"checkpoint.pt does not fit this run .*--overwrite"):
        run_continual(MLP, progress=False, out=out, resume=True)


# ----------------------------------------------------------------------------------------------- killed for real

# Runs the CLI with a checkpoint writer that, from the SLOW_AFTER-th write on, writes half of the file, waits
# SLOW_WRITE seconds, then writes the rest: a kill then lands inside a checkpoint write when wanted. Everything
# else is the real command.
_SLOW_CLI = """
import io, os, sys, time
import torch
import sparseapps.continual.resume as resume
from sparseapps.core.io import write_atomic

delay, fast = float(os.environ["SLOW_WRITE"]), int(os.environ["SLOW_AFTER"])
writes = 0

def slow_save(path, state):
    global writes
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    wait = delay if writes >= fast else 0.0
    writes += 1

    def write(temporary):
        with open(temporary, "wb") as stream:
            stream.write(data[: len(data) // 2])
            stream.flush()
            time.sleep(wait)
            stream.write(data[len(data) // 2 :])

    write_atomic(path, write)

resume.save_torch = slow_save
from sparseapps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(arguments: list[str], log: Path, *, delay: float, fast: int = 0) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", _SLOW_CLI, *arguments],
            cwd=ROOT,
            env={**os.environ, "SLOW_WRITE": str(delay), "SLOW_AFTER": str(fast)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def _wait_for(condition: Any, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True once ``condition()`` holds while the process runs; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the run neither reached the kill point nor ended")


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it ended just now
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_inside_a_checkpoint_write_and_at_a_random_point_then_resume_is_bitwise(tmp_path):
    reference, out, log = tmp_path / "reference", tmp_path / "killed", tmp_path / "stderr.txt"
    assert main(_cli(reference, every=2)) == 0
    arguments = _cli(out, "--resume", every=2)
    checkpoint = out / "checkpoint.pt"

    # 1. Killed inside a checkpoint write, the second one: the first must survive intact.
    process = _start(arguments, log, delay=60.0, fast=1)

    def inside_second_write() -> bool:
        return checkpoint.exists() and any(p.stat().st_size > 0 for p in out.glob(TEMPORARY_GLOB))

    assert _wait_for(inside_second_write, process), log.read_text()
    _kill(process)
    assert list(out.glob(TEMPORARY_GLOB)), "the kill was meant to land inside a write"
    first = load_torch(checkpoint)  # the previous checkpoint is whole
    assert (first["completed"], first["steps"]) == (0, 2)

    # 2. Killed at a random moment while training (every write pauses a little, so the kill may land inside one).
    process = _start(arguments, log, delay=0.05)
    seen = checkpoint.stat().st_mtime_ns
    assert _wait_for(lambda: checkpoint.stat().st_mtime_ns != seen, process), log.read_text()
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    _kill(process)

    # 3. Resumed until it finishes.
    for _ in range(3):
        process = _start(arguments, log, delay=0.0)
        process.wait(timeout=300)
        assert "Traceback" not in log.read_text(), log.read_text()
        if process.returncode == 0:
            break
    assert process.returncode == 0, log.read_text()
    assert not list(out.glob(TEMPORARY_GLOB))
    for name in ("results.json", "sparseapps-run.json"):
        expected = json.loads((reference / name).read_text())
        got = json.loads((out / name).read_text())
        assert _differences(expected, got) == [], name
    assert _differences(load_torch(reference / "checkpoint.pt"), load_torch(checkpoint)) == []
