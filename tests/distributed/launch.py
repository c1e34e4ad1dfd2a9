"""Runs a function in N local gloo processes (``torch.multiprocessing.spawn``) and collects what each returns.

Each worker gets ``(rank, world_size, *args)``, runs after ``init_process_group("gloo")`` on 127.0.0.1 and a
free port, with one thread, and its return value is saved to a file the parent loads. An exception in a worker
is returned as ``{"error": type name, "message": text, "traceback": text}`` instead of failing the spawn, so tests can check the
messages of expected errors. The process group has a timeout; the tests do not.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
    try:
        try:
            result = fn(rank, world_size, *args)
        except Exception as error:  # reported to the parent, which decides whether it was expected
            result = {
                "error": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exc(),
            }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: torchrec/fbgemm thread pools sometimes abort in their destructors
    # ("terminate called without an active exception") after the work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """``[fn(0, world_size, *args), fn(1, world_size, *args), ...]``, each run in its own gloo process."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world_size, free_port(), out, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
