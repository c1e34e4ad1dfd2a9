"""Exact comparison of two RL runs' final outputs: every tensor of model.zip, every array of the replay buffer, every
metric of result.json and results.json but the wall-clock ones."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.save_util import load_from_pkl

from sparseapps.core.io import verify_manifest

# Keys of result.json / results.json measured on the wall clock: they differ between any two runs.
WALL_CLOCK = ("train_seconds", "steps_per_second", "seconds_vs_dense")


def without_wall_clock(value: Any) -> Any:
    """``value`` with every key of :data:`WALL_CLOCK` removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def archive_tensors(path: Path) -> dict[str, Any]:
    """The tensors of an SB3 archive: each ``.pth`` member (policy, optimizers, PyTorch variables), no pickle run."""
    with zipfile.ZipFile(path) as archive:
        return {
            name: torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            for name in sorted(archive.namelist())
            if name.endswith(".pth")
        }


def replay_buffer_arrays(path: Path) -> dict[str, Any]:
    """The arrays and counters of a replay buffer file the run wrote (its manifest checked before unpickling)."""
    verify_manifest(path.parent, [path.name])
    buffer = load_from_pkl(path)
    return {k: v for k, v in vars(buffer).items() if isinstance(v, np.ndarray | int | bool)}


def differences(expected: Any, got: Any, where: str = "") -> list[str]:
    """Where ``expected`` and ``got`` differ: tensors and arrays by dtype, shape and every value; NaN equals NaN."""
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        same = (
            isinstance(expected, torch.Tensor)
            and isinstance(got, torch.Tensor)
            and expected.dtype == got.dtype
            and torch.equal(expected, got)
        )
        return [] if same else [where]
    if isinstance(expected, np.ndarray) or isinstance(got, np.ndarray):
        same = (
            isinstance(expected, np.ndarray)
            and isinstance(got, np.ndarray)
            and expected.dtype == got.dtype
            and np.array_equal(expected, got, equal_nan=expected.dtype.kind == "f")
        )
        return [] if same else [where]
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected.keys() != got.keys():
            return [f"{where} keys {sorted(map(str, expected))} vs {sorted(map(str, got))}"]
        return [d for key in expected for d in differences(expected[key], got[key], f"{where}.{key}")]
    if isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        if len(expected) != len(got):
            return [f"{where} length {len(expected)} vs {len(got)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(expected, got, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    if isinstance(expected, float) and isinstance(got, float) and math.isnan(expected) and math.isnan(got):
        return []
    return [] if type(expected) is type(got) and expected == got else [f"{where}: {expected!r} vs {got!r}"]


def run_differences(reference: Path, trial: Path) -> list[str]:
    """Every difference between the final outputs of two run directories written by ``train_run``."""
    found = differences(
        archive_tensors(reference / "model.zip"), archive_tensors(trial / "model.zip"), "model.zip"
    )
    if (reference / "replay_buffer.pkl").exists() or (trial / "replay_buffer.pkl").exists():
        found += differences(
            replay_buffer_arrays(reference / "replay_buffer.pkl"),
            replay_buffer_arrays(trial / "replay_buffer.pkl"),
            "replay_buffer.pkl",
        )
    found += differences(
        without_wall_clock(json.loads((reference / "result.json").read_text())),
        without_wall_clock(json.loads((trial / "result.json").read_text())),
        "result.json",
    )
    return found
