"""The checkpoint of a continual run: its file names, its contents, how it is read back, and the random states.

``sparseapps continual run --out DIR`` writes ``DIR/checkpoint.pt`` after every task and every
``checkpoint_every`` optimizer steps within a task (``sparseapps.core.io.save_torch``: atomic), and reads it
back with ``load_torch`` (``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, so no
code runs from it). It holds:

- ``format``, ``version``; ``settings``: the run's settings (``ContinualRun.settings()``);
- ``completed``: tasks trained and evaluated; ``steps``: optimizer steps done in the next task (0 between tasks);
- ``model``: the model's ``state_dict`` (weights, ownership maps, masks, frozen weights, extra state);
  ``known_tasks``: the task labels Avalanche's ``MultiTaskModule`` has trained;
- ``optimizer``: the optimizer's ``state_dict``; ``plugin``: ``SparseIsolationPlugin.state_dict()`` (the
  isolation's generator, history and ITOP record, the state of the task's core engine when saved inside a task:
  step, momentum, growth region, history; and the classes of every task);
- ``evaluator``: the state Avalanche's forgetting and BWT metrics carry from one evaluation to the next;
- ``record``: ``accuracy_matrix``, ``avalanche`` (the last stream metrics), and the wall-clock
  ``train_seconds`` and ``task_elapsed_seconds`` (seconds the unfinished task had run);
- ``rng``: the states of torch's CPU generator (and CUDA's, when used), numpy's and Python's ``random``, as
  tensors and numbers.

Example:
    >>> import torch
    >>> state = rng_state()
    >>> a = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(torch.rand(2), a)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from sparseapps.core.io import CorruptFileError, OutputConflictError, load_torch
from sparseapps.core.random_state import random_state as rng_state
from sparseapps.core.random_state import set_random_state as set_rng_state

TOOL: Final = "continual run"
"""The tool name recorded in ``sparseapps-run.json``."""
CHECKPOINT: Final = "checkpoint.pt"
RESULTS: Final = "results.json"
OUTPUTS: Final = (RESULTS, CHECKPOINT, "accuracy_matrix.png", "capacity.png")
"""Everything a continual run writes in its output directory (besides ``sparseapps-run.json``)."""
DEFAULT_CHECKPOINT_EVERY: Final = 100
"""Optimizer steps between checkpoints within a task (a checkpoint follows every task as well)."""
FORMAT: Final = "sparseapps continual run checkpoint"
VERSION: Final = 2
"""2: each task trained by a core engine, whose state the checkpoint holds; 1: the isolation's own copy of the
engine's loop (such a checkpoint cannot be resumed)."""
KEYS: Final = (
    "format",
    "version",
    "settings",
    "completed",
    "steps",
    "model",
    "known_tasks",
    "optimizer",
    "plugin",
    "evaluator",
    "record",
    "rng",
)

_OVERWRITE_HINT = "pass --overwrite (overwrite=True) to start the run afresh"


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level with dotted keys.

    Example:
        >>> flatten_settings({"seed": 0, "isolation": {"sparsity": {"grow": "random"}}})
        {'seed': 0, 'isolation.sparsity.grow': 'random'}
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(
    saved: Mapping[str, Any], requested: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, requested)}`` for every field that differs; nested fields are dotted.

    Example:
        >>> settings_differences({"seed": 0, "isolation": {"sparsity": 0.9}},
        ...                      {"seed": 0, "isolation": {"sparsity": 0.8}})
        {'isolation.sparsity': (0.9, 0.8)}
    """
    old, new = flatten_settings(saved), flatten_settings(requested)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    }


def read_checkpoint(path: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Reads a continual run's checkpoint (no code runs from it) and checks that it is one of ``settings``.

    Raises:
        CorruptFileError: the file is truncated, not a torch file, holds objects other than tensors, numbers,
            strings and containers, or is not a continual run checkpoint of this version.
        OutputConflictError: the checkpoint belongs to a run of other settings (the differing fields are named).
    """
    path = Path(path)
    try:
        state = load_torch(path, "a sparseapps continual run checkpoint")
    except CorruptFileError as error:
        raise CorruptFileError(f"{error}; or {_OVERWRITE_HINT}") from error
    if isinstance(state, dict) and state.get("format") == FORMAT and state.get("version") == 1:
        raise CorruptFileError(
            f"{path}: a checkpoint of version 1, written by a sparseapps version whose continual isolation "
            f"copied the core engine's loop; this version ({VERSION}) cannot resume it. Remove it or "
            f"{_OVERWRITE_HINT}"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        found = (
            f"format {state.get('format')!r}, version {state.get('version')!r}"
            if isinstance(state, dict)
            else type(state).__name__
        )
        raise CorruptFileError(
            f"{path}: expected a {FORMAT} of version {VERSION}, got {found}; remove it or {_OVERWRITE_HINT}"
        )
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise CorruptFileError(f"{path}: the checkpoint lacks {missing}; remove it or {_OVERWRITE_HINT}")
    differences = settings_differences(state["settings"], settings)
    if differences:
        raise OutputConflictError(
            f"{path} is a checkpoint of a run of other settings; (saved, requested) differ in {differences}. "
            f"Nothing was changed. Run with the saved settings to resume it, choose another output directory, or "
            f"{_OVERWRITE_HINT}"
        )
    return state


__all__ = [
    "CHECKPOINT",
    "DEFAULT_CHECKPOINT_EVERY",
    "OUTPUTS",
    "RESULTS",
    "TOOL",
    "flatten_settings",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "settings_differences",
]
