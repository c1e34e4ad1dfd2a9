"""The continual checkpoint's pieces: random states, settings differences, refused files, docstring examples."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseapps.continual.checkpoint import (
    FORMAT,
    KEYS,
    VERSION,
    read_checkpoint,
    rng_state,
    set_rng_state,
    settings_differences,
)
from sparseapps.core.io import CorruptFileError, OutputConflictError, load_torch, save_torch


def _draws() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)] + [random.gauss(0, 1)]


def test_rng_state_round_trips_torch_numpy_and_python_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # numpy caches a second Gaussian: the cache is state too
    random.gauss(0, 1)
    save_torch(tmp_path / "rng.pt", rng_state())
    expected = _draws()
    set_rng_state(load_torch(tmp_path / "rng.pt"))  # weights_only=True: no pickled objects inside
    got = _draws()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_settings_differences_name_nested_fields() -> None:
    saved = {"seed": 0, "hidden": [32, 32], "isolation": {"sparsity": 0.9, "grow": "random"}}
    requested = {"seed": 1, "hidden": [32, 32], "isolation": {"sparsity": 0.9, "grow": "gradient"}}
    assert settings_differences(saved, requested) == {
        "isolation.grow": ("random", "gradient"),
        "seed": (0, 1),
    }
    assert settings_differences(saved, saved) == {}
    assert settings_differences({"a": 1}, {"b": 2}) == {"a": (1, None), "b": (None, 2)}


def _checkpoint(settings: dict, **changes: object) -> dict:
    state = {key: 0 for key in KEYS}
    state.update(format=FORMAT, version=VERSION, settings=settings)
    state.update(changes)
    return state


def test_read_checkpoint_accepts_its_own_format(tmp_path: Path) -> None:
    save_torch(tmp_path / "checkpoint.pt", _checkpoint({"seed": 0}))
    assert read_checkpoint(tmp_path / "checkpoint.pt", {"seed": 0})["format"] == FORMAT


def test_truncated_checkpoint_names_the_file_and_how_to_start_afresh(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_torch(path, _checkpoint({"seed": 0}, model={"w": torch.ones(100)}))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as error:
        read_checkpoint(path, {"seed": 0})
    message = str(error.value)
    assert str(path) in message and "remove it" in message and "--overwrite" in message


def test_checkpoint_of_other_settings_is_refused_naming_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_torch(path, _checkpoint({"seed": 0, "isolation": {"sparsity": 0.9}}))
    with pytest.raises(OutputConflictError) as error:
        read_checkpoint(path, {"seed": 1, "isolation": {"sparsity": 0.8}})
    message = str(error.value)
    assert "{'isolation.sparsity': (0.9, 0.8), 'seed': (0, 1)}" in message and str(path) in message


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"format": "something else", "version": VERSION}, r"expected a sparseapps continual run checkpoint"),
        ([1, 2, 3], r"got list"),
        ({"format": FORMAT, "version": VERSION, "settings": {}}, r"the checkpoint lacks \['completed'"),
    ],
)
def test_foreign_or_incomplete_checkpoints_are_refused(tmp_path: Path, state: object, match: str) -> None:
    path = tmp_path / "checkpoint.pt"
    save_torch(path, state)
    with pytest.raises(CorruptFileError, match=match):
        read_checkpoint(path, {})


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_of_the_version_before_the_engine_redesign_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_torch(path, {**_checkpoint({"seed": 0}), "version": 1})
    with pytest.raises(CorruptFileError) as error:
        read_checkpoint(path, {"seed": 0})
    message = str(error.value)
    assert message.startswith(f"{path}: a checkpoint of version 1") and "cannot resume it" in message
    assert "--overwrite" in message


def test_planted_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"format": FORMAT, "payload": _Planted(marker)}))
    with pytest.raises(CorruptFileError, match=r"checkpoint.pt"):
        read_checkpoint(path, {})
    assert not marker.exists()
