"""The process's random generators (torch, numpy, Python's ``random``) as a checkpoint can hold them.

Every value is a tensor, a number or a string, so the state round-trips through ``torch.save`` and
``torch.load(weights_only=True)`` (no pickled objects): an interrupted run restores exactly the generators an
uninterrupted one would have.

Example:
    >>> import random
    >>> state = random_state()
    >>> first = (torch.rand(1), random.random())
    >>> set_random_state(state)
    >>> (torch.rand(1), random.random()) == first
    True
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["random_state", "set_random_state"]


def random_state() -> dict[str, Any]:
    """The torch (CPU, and CUDA where available), numpy and Python generators' states, weights_only-safe."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Mapping[str, Any]) -> None:
    """Restores :func:`random_state`.

    Raises:
        ValueError: the state holds CUDA generators of another number of devices than this machine has.
    """
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"the state holds the random generators of {len(state['cuda'])} CUDA device(s), this machine has "
                f"{torch.cuda.device_count()}: resume it where it was written"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
