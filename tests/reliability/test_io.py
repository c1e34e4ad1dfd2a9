"""The trust boundary of files the package reads back: no code runs from a planted checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.io import (
    CorruptFileError,
    load_json,
    load_torch,
    remove_temporaries,
    save_torch,
    verify_manifest,
    write_atomic,
    write_manifest,
)


class _Planted:
    """Unpickling it would create the file named by its argument."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    planted = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "payload": _Planted(marker)}, planted)
    with pytest.raises(CorruptFileError, match=r"checkpoint.pt"):
        load_torch(planted)
    assert not marker.exists()


def test_truncated_files_name_themselves(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_torch(path, {"a": torch.arange(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptFileError, match=r"state.pt"):
        load_torch(path)
    broken = tmp_path / "progress.json"
    broken.write_text('{"step": 1')
    with pytest.raises(CorruptFileError, match=r"progress.json"):
        load_json(broken)


def test_manifest_refuses_a_changed_file_and_an_unlisted_one(tmp_path: Path) -> None:
    (tmp_path / "model.zip").write_bytes(b"written by this run")
    write_manifest(tmp_path, ["model.zip"])
    verify_manifest(tmp_path, ["model.zip"])
    (tmp_path / "model.zip").write_bytes(pickle.dumps("replaced"))
    with pytest.raises(CorruptFileError, match=r"model.zip differs"):
        verify_manifest(tmp_path, ["model.zip"])
    (tmp_path / "extra.pkl").write_bytes(b"x")
    with pytest.raises(CorruptFileError, match=r"does not list extra.pkl"):
        verify_manifest(tmp_path, ["extra.pkl"])


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_atomic(target, b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    (tmp_path / ".results.json.abc.sparseapps-tmp").write_bytes(b"left by SIGKILL")
    assert [p.name for p in remove_temporaries(tmp_path)] == [".results.json.abc.sparseapps-tmp"]


def test_a_checkpoint_cannot_claim_a_sparsity_it_does_not_have() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SparsityConfig.preset("rigl", sparsity=0.8)
    sparsity = DynamicSparsity(model, optimizer, config, total_steps=100)
    state = sparsity.state_dict()
    state["masks"] = {fqn: torch.ones_like(mask) for fqn, mask in state["masks"].items()}
    with pytest.raises(ValueError, match="more than the budget"):
        sparsity.load_state_dict(state)
    state = sparsity.state_dict()
    state["budgets"] = {fqn: mask.numel() for fqn, mask in state["masks"].items()}
    with pytest.raises(ValueError, match="budgets"):
        sparsity.load_state_dict(state)
    sparsity.load_state_dict(sparsity.state_dict())  # its own checkpoint still loads


def test_an_rl_checkpoint_without_a_manifest_is_refused_not_retrained_over(tmp_path: Path) -> None:
    from sparseapps.rl.train import RLRun, train_run

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "progress.json").write_text("{}")
    (checkpoint / "model.zip").write_bytes(b"older checkpoint")
    with pytest.raises(CorruptFileError, match=r"MANIFEST\.json"):
        train_run(RLRun(env="CartPole-v1", algo="ppo", steps=64), tmp_path)
    assert (checkpoint / "model.zip").read_bytes() == b"older checkpoint"


def test_claim_output_refuses_other_settings_tools_and_foreign_files(tmp_path: Path) -> None:
    from sparseapps.core.io import OWNER_FILE, OutputConflictError, claim_output

    out = tmp_path / "run"
    outputs = ["results.json", "checkpoint.pt"]
    assert claim_output(out, tool="recsys train", settings={"seed": 0}, outputs=outputs) is False
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    assert claim_output(out, tool="recsys train", settings={"seed": 0}, outputs=outputs) is True
    with pytest.raises(OutputConflictError, match=r"differ in \{'seed': \(0, 1\)\}"):
        claim_output(out, tool="recsys train", settings={"seed": 1}, outputs=outputs)
    with pytest.raises(OutputConflictError, match=r"sparseapps recsys train.*not `sparseapps rl train`"):
        claim_output(out, tool="rl train", settings={"seed": 0}, outputs=outputs)
    assert (out / "results.json").read_text() == "{}"  # refusals change nothing
    # --overwrite removes the tool's outputs and record, never the user's other files
    assert (
        claim_output(out, tool="recsys train", settings={"seed": 1}, outputs=outputs, overwrite=True) is False
    )
    assert not (out / "results.json").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert load_json(out / OWNER_FILE)["settings"] == {"seed": 1}
    # a directory with the tool's outputs but no record (another program, an older version) is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pt").write_bytes(b"not ours")
    with pytest.raises(OutputConflictError, match=r"checkpoint.pt but no sparseapps-run.json"):
        claim_output(foreign, tool="recsys train", settings={}, outputs=outputs)
    assert (foreign / "checkpoint.pt").read_bytes() == b"not ours"


def test_check_output_refuses_as_claim_output_does_and_writes_nothing(tmp_path: Path) -> None:
    from sparseapps.core.io import OutputConflictError, check_output, claim_output

    out = tmp_path / "run"
    assert check_output(out, tool="recsys train", settings={"seed": 0}, outputs=["results.json"]) is False
    assert not out.exists()
    claim_output(out, tool="recsys train", settings={"seed": 0}, outputs=["results.json"])
    before = sorted(p.name for p in out.iterdir())
    assert check_output(out, tool="recsys train", settings={"seed": 0}, outputs=["results.json"]) is True
    with pytest.raises(OutputConflictError, match=r"differ in \{'seed': \(0, 1\)\}"):
        check_output(out, tool="recsys train", settings={"seed": 1}, outputs=["results.json"])
    assert check_output(out, tool="rl train", settings={}, outputs=[], overwrite=True) is False
    assert sorted(p.name for p in out.iterdir()) == before
