"""The peer client (``scripts/peers``): JSON-lines protocol, errors, and SparseProp where its side venv exists."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from scripts.peers import client
from scripts.peers.client import PeerError, PeerProcess

FAKE_WORKER = textwrap.dedent(
    """
    import json, sys, time
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "die":
            print("fake worker: dying on purpose", file=sys.stderr, flush=True)
            sys.exit(3)
        if req["op"] == "sleep":
            time.sleep(30)
        if req["op"] == "bad":
            print(json.dumps({"ok": False, "error": "ValueError: bad request"}), flush=True)
            continue
        print(json.dumps({"ok": True, "echo": req}), flush=True)
        if req["op"] == "quit":
            break
    """
)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A side "venv" whose python is this interpreter, running a fake worker under the name ``fake``."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    monkeypatch.setitem(client.WORKERS, "fake", worker)
    return tmp_path / "venv"


def test_requests_round_trip(fake: Path) -> None:
    with PeerProcess("fake", venv=fake, timeout=30) as peer:
        assert peer.request("build", model="mlp", widths=[4, 2]) == {
            "echo": {"op": "build", "model": "mlp", "widths": [4, 2]}
        }
        with pytest.raises(PeerError, match="failed on 'bad': ValueError: bad request"):
            peer.request("bad")
        assert peer.request("again")["echo"]["op"] == "again"  # an error answer does not end the worker


def test_dead_worker_reports_its_stderr(fake: Path) -> None:
    with PeerProcess("fake", venv=fake, timeout=30) as peer:
        with pytest.raises(PeerError, match=r"(?s)died during 'die' \(exit code 3\).*dying on purpose"):
            peer.request("die")
        with pytest.raises(PeerError, match="is not running"):
            peer.request("build")


def test_silent_worker_is_killed_after_the_timeout(fake: Path) -> None:
    with (
        PeerProcess("fake", venv=fake, timeout=0.5) as peer,
        pytest.raises(PeerError, match=r"no answer to 'sleep' within 0\.5 s"),
    ):
        peer.request("sleep")


def test_missing_side_venv(tmp_path: Path) -> None:
    assert not client.available(tmp_path / "nowhere")
    with pytest.raises(PeerError, match="no peer environment"):
        PeerProcess(venv=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown peer"):
        PeerProcess("nope")


@pytest.mark.skipif(
    not client.available(), reason="no SparseProp side venv (bash scripts/peers/setup_peers.sh)"
)
def test_sparseprop_quick_mlp() -> None:
    point = dict(model="mlp", widths=[784, 64, 64, 10], batch=16, sparsity=0.9, threads=1, seed=0)
    with PeerProcess(timeout=300) as peer:
        layers = peer.build(name="sparse", **point)["layers"]
        assert [layer["shape"] for layer in layers] == [[64, 784], [64, 64], [10, 64]]
        assert layers[0]["sparseprop"] and layers[1]["sparseprop"]
        peer.build(name="dense", dense=True, **point)
        for name in ("sparse", "dense"):
            ms = peer.steps(2, name=name)
            assert len(ms) == 2 and all(t > 0 for t in ms)
        sparse, dense = peer.memory(name="sparse"), peer.memory(name="dense")
        assert sparse["nnz"] == sum(layer["nnz"] for layer in layers if layer["sparseprop"])
        assert sparse["params"] < 0.25 * dense["params"] and sparse["optimizer"] < 0.25 * dense["optimizer"]
