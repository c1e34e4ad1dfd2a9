"""scripts/dist_train.py launched by torchrun with two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun(tmp_path: Path, *args: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "scripts" / "dist_train.py"),
        *args,
        "--out",
        str(tmp_path),
    ]
    completed = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def test_dist_train_mlp_under_torchrun(tmp_path: Path) -> None:
    result = torchrun(tmp_path, "--task", "mlp", "--steps", "60", "--preset", "set")
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["topology_updates"] >= 1
    assert result["cross_rank_checks"] == result["topology_updates"] + 1
    assert result["density"] == pytest.approx(0.2, abs=1e-3)
    assert result["samples_per_second"] > 0


@pytest.mark.slow
def test_dist_train_mf_under_torchrun(tmp_path: Path) -> None:
    result = torchrun(tmp_path, "--task", "mf", "--sharding", "column_wise", "--epochs", "2")
    assert result["world_size"] == 2 and result["sharding"] == "column_wise"
    assert result["density"] == pytest.approx(0.2, abs=1e-3)
    assert 0.0 < result["value"] < 1.0


def test_dist_train_refuses_a_plain_launch() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dist_train.py"), "--task", "mlp"],
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert completed.returncode != 0 and "launch with torchrun" in completed.stderr
