"""`sparseapps recsys train --resume` killed at any point, even inside a checkpoint write, ends bit for bit where an
uninterrupted run ends: every tensor of the final checkpoint and of compact.pt, and every results.json value but
the wall-clock ones."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparseapps.core.io import OWNER_FILE, TEMPORARY_GLOB, load_torch
from sparseapps.recsys.data import synthetic_interactions
from sparseapps.recsys.train import (
    CHECKPOINT,
    COMPACT,
    RESULTS,
    SLOW_CHECKPOINT_VARIABLE,
    TrainConfig,
    load_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
# Wall-clock values: they differ between any two runs, killed or not.
WALL_CLOCK_RESULTS = ("seconds_per_epoch", "step_ms", "train_seconds", "total_seconds", "peak_rss_mb")
WALL_CLOCK_HISTORY = ("seconds",)
WALL_CLOCK_CHECKPOINT = ("train_seconds",)


def write_inter(path: Path) -> Path:
    rows = synthetic_interactions(n_users=60, n_items=80, n_interactions=1500, min_per_user=10, seed=0)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in zip(rows.users, rows.items, rows.timestamps, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def options(data: Path) -> list[str]:
    return [
        "--dataset", str(data), "--model", "mf", "--method", "dsl", "--density", "0.25", "--dim", "8",
        "--epochs", "6", "--batch-size", "128", "--update-interval", "3", "--ks", "5", "10",
        "--selection-metric", "recall@10", "--no-progress",
    ]  # fmt: skip


def start(data: Path, out: Path, *, slow: float | None = None) -> subprocess.Popen[bytes]:
    environment = {k: v for k, v in os.environ.items() if k != SLOW_CHECKPOINT_VARIABLE}
    if slow is not None:
        environment[SLOW_CHECKPOINT_VARIABLE] = str(slow)
    command = [
        sys.executable,
        "-m",
        "sparseapps",
        "recsys",
        "train",
        *options(data),
        "--resume",
        "--out",
        str(out),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill_when(process: subprocess.Popen[bytes], ready: Any, timeout: float = 60.0) -> None:
    """SIGKILLs ``process`` as soon as ``ready()`` holds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[0].decode()
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def checkpoint_being_written(out: Path) -> bool:
    return any(path.name.startswith(f".{CHECKPOINT}.") for path in out.glob(TEMPORARY_GLOB))


def assert_same_state(resumed: Any, straight: Any, path: str = "") -> None:
    """Every tensor equal (``torch.equal``), every other value equal, wall-clock values aside."""
    assert type(resumed) is type(straight), path
    if isinstance(straight, torch.Tensor):
        assert resumed.dtype == straight.dtype and torch.equal(resumed, straight), path
    elif isinstance(straight, dict):
        assert resumed.keys() == straight.keys(), path
        for key in straight:
            if key not in (*WALL_CLOCK_CHECKPOINT, *WALL_CLOCK_HISTORY, *WALL_CLOCK_RESULTS):
                assert_same_state(resumed[key], straight[key], f"{path}/{key}")
    elif isinstance(straight, list | tuple):
        assert len(resumed) == len(straight), path
        for index, (a, b) in enumerate(zip(resumed, straight, strict=True)):
            assert_same_state(a, b, f"{path}[{index}]")
    else:
        assert resumed == straight, path


def test_runs_killed_anywhere_even_inside_a_checkpoint_write_resume_bit_for_bit(tmp_path: Path) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    config = TrainConfig.tuned(
        "mf", dataset=str(data), method="dsl", density=0.25, dim=8, epochs=6, batch_size=128,
        update_interval=3, ks=(5, 10), selection_metric="recall@10",
    )  # fmt: skip  # what options(data) asks of the command line
    straight = tmp_path / "straight"
    train(config, straight, progress=False)

    out = tmp_path / "killed"
    # 1. inside the first checkpoint write: no checkpoint yet, half a temporary file
    kill_when(start(data, out, slow=2.0), lambda: checkpoint_being_written(out))
    assert not (out / CHECKPOINT).exists() and checkpoint_being_written(out)
    # 2. inside a later checkpoint write: the previous checkpoint stays whole
    kill_when(
        start(data, out, slow=0.5),
        lambda: (out / CHECKPOINT).exists() and checkpoint_being_written(out),
    )
    assert load_checkpoint(out / CHECKPOINT)["epoch"] >= 1
    # 3. at a random time: anywhere from start-up to the last plot
    process = start(data, out)
    time.sleep(random.Random(13).uniform(1.0, 5.0))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    # 4. resume until the run ends
    for _ in range(3):
        process = start(data, out)
        output = process.communicate(timeout=120)[0].decode()
        if process.returncode == 0:
            break
    assert process.returncode == 0, output

    assert_same_state(load_checkpoint(out / CHECKPOINT), load_checkpoint(straight / CHECKPOINT))
    assert_same_state(load_torch(out / COMPACT), load_torch(straight / COMPACT))
    resumed, reference = (json.loads((d / RESULTS).read_text()) for d in (out, straight))
    assert resumed["config"] == config.to_dict()
    assert_same_state(resumed, reference)
    assert json.loads((out / OWNER_FILE).read_text()) == json.loads((straight / OWNER_FILE).read_text())
    assert not list(out.glob(TEMPORARY_GLOB))
