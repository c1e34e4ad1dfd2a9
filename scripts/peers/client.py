"""Drive a peer library's worker in its side environment from the package's own interpreter (standard library only).

    from peers import PeerProcess, available, setup_peers        # from scripts/ (bench_training.py's sys.path)

    if not available():
        setup_peers()                                              # builds .peers-venv (about a minute), or raises
    with PeerProcess() as peer:                                    # starts sparseprop_worker.py in .peers-venv
        peer.build(model="mlp", widths=[784, 256, 256, 10], batch=64, sparsity=0.9, threads=1, seed=0)
        ms = peer.steps(5)                                         # per-step milliseconds, timed in the worker
        print(peer.memory())                                       # params / grads / optimizer / structure bytes

The worker holds models by ``name``: one process can build a dense and a SparseProp model and step them in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VENV = REPO / ".peers-venv"
SETUP_SCRIPT = HERE / "setup_peers.sh"
WORKERS = {"sparseprop": HERE / "sparseprop_worker.py"}

__all__ = ["PeerError", "PeerProcess", "available", "default_venv", "peer_python", "setup_peers"]


class PeerError(RuntimeError):
    """A peer worker failed: it answered an error, died, timed out, or its environment is missing."""


def default_venv() -> Path:
    """``$PEERS_VENV`` if set, else ``.peers-venv`` at the repository root."""
    return Path(os.environ["PEERS_VENV"]) if os.environ.get("PEERS_VENV") else DEFAULT_VENV


def peer_python(venv: str | os.PathLike[str] | None = None) -> Path:
    return Path(venv or default_venv()) / "bin" / "python"


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without what would leak the main venv into the side one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def available(
    venv: str | os.PathLike[str] | None = None, library: str = "sparseprop", timeout: float = 120
) -> bool:
    """Whether the side environment exists and imports torch and ``library`` (a subprocess, a few seconds)."""
    python = peer_python(venv)
    if not python.is_file():
        return False
    try:
        done = subprocess.run(
            [str(python), "-c", f"import torch, {library}.modules"],
            env=_clean_env(),
            capture_output=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def setup_peers(
    venv: str | os.PathLike[str] | None = None, log: str | os.PathLike[str] | None = None, quiet: bool = False
) -> Path:
    """Create or update the side environment with ``setup_peers.sh`` (idempotent, ~1 s when already done).

    Returns the venv path; raises :class:`PeerError` with the installer's output tail if it fails.
    """
    path = Path(venv or default_venv())
    env = _clean_env({"PEERS_VENV": str(path), **({"PEERS_LOG": str(log)} if log else {})})
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], env=env, capture_output=True, text=True)
    if not quiet and done.stdout:
        print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise PeerError(f"could not set up the peer environment {path} (exit {done.returncode}):\n{tail}")
    return path


class PeerProcess:
    """One worker process in the side environment, answering JSON requests line by line.

    Args:
        library: which worker (``"sparseprop"``).
        venv: the side environment (default :func:`default_venv`).
        timeout: seconds to wait for each answer (``None``: forever); a worker past it is killed.
        env: extra environment variables for the worker.
    """

    def __init__(
        self,
        library: str = "sparseprop",
        venv: str | os.PathLike[str] | None = None,
        timeout: float | None = 600.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if library not in WORKERS:
            raise ValueError(f"unknown peer {library!r}; expected one of {sorted(WORKERS)}")
        python = peer_python(venv)
        if not python.is_file():
            raise PeerError(
                f"no peer environment at {python.parent.parent}: run `bash {SETUP_SCRIPT.relative_to(REPO)}` "
                "(or peers.setup_peers()) first"
            )
        self.library = library
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (open for the worker's lifetime)
        self._proc = subprocess.Popen(
            [str(python), str(WORKERS[library])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=_clean_env(env),
            cwd=str(REPO),
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of stream: the worker exited

    def stderr_tail(self, lines: int = 30) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _died(self, what: str) -> PeerError:
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return PeerError(
            f"{self.library} worker {what} (exit code {code}); its stderr ends with:\n"
            f"{self.stderr_tail() or '(nothing)'}"
        )

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send ``{"op": op, **fields}`` and return the answer (without ``ok``); raises :class:`PeerError`."""
        if self._proc.poll() is not None:
            raise self._died("is not running")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(f"died before {op!r}") from None
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self._proc.kill()
            raise self._died(f"gave no answer to {op!r} within {self.timeout} s and was killed") from None
        if not line:
            raise self._died(f"died during {op!r}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeerError(
                f"{self.library} worker answered {op!r} with a line that is not JSON: {line[:200]!r}"
            ) from exc
        if not answer.pop("ok", False):
            raise PeerError(
                f"{self.library} worker failed on {op!r}: {answer.get('error')}\n"
                f"{answer.get('traceback', '')}".rstrip()
            )
        return answer

    def build(self, **fields: Any) -> dict[str, Any]:
        """Build a model (see the worker's docstring for the fields); returns its layers."""
        return self.request("build", **fields)

    def steps(self, n: int = 1, **fields: Any) -> list[float]:
        """Run ``n`` training steps; per-step milliseconds as the worker timed them."""
        return self.request("steps", n=n, **fields)["ms"]

    def memory(self, **fields: Any) -> dict[str, int]:
        return self.request("memory", **fields)

    def info(self) -> dict[str, Any]:
        return self.request("info")

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not within 10 s."""
        if self._proc.poll() is None:
            with contextlib.suppress(PeerError):
                self.request("quit")
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._stderr.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
