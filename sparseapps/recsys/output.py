"""The files of a training run: checkpoints, and what an output directory may hold before a run writes there.

:func:`plan_output` reads ``--out`` (its record, checkpoints and results) against a configuration and returns an
:class:`OutputPlan`: the state to resume from, or the refusal. The refusals of a directory that another tool, other
settings or another program wrote are :func:`~sparseapps.core.io.claim_output`'s own, found by
:func:`~sparseapps.core.io.check_output` (the same checks, writing nothing), so nothing is written to ``--out``
until :meth:`OutputPlan.claim` runs, once the data has loaded.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseapps.core.config import ConfigMismatchError
from sparseapps.core.io import (
    OWNER_FILE,
    CorruptFileError,
    check_output,
    claim_output,
    load_json,
    load_torch,
    save_torch,
    write_atomic,
)
from sparseapps.recsys.config import TrainConfig

CHECKPOINT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
PEP_CHECKPOINT = "pep_search.pt"
RESULTS = "results.json"
COMPACT = "compact.pt"
RECALL_PLOT = "recall_vs_epoch.png"
SIZE_PLOT = "embedding_size_vs_popularity.png"
TOOL = "recsys train"
# Every file :func:`~sparseapps.recsys.train.train` writes to its output directory (``overwrite`` removes these, and
# only these).
OUTPUTS = (CHECKPOINT, PEP_CHECKPOINT, RESULTS, COMPACT, RECALL_PLOT, SIZE_PLOT)
# Test hook: seconds to pause halfway through writing each checkpoint, so that a kill lands inside the write.
SLOW_CHECKPOINT_VARIABLE = "SPARSEAPPS_TEST_SLOW_CHECKPOINT"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`train` (tensors and plain data only: no code runs from it).

    Raises:
        CorruptFileError: a damaged or foreign file, or one that holds anything but tensors and plain data.
    """
    state = load_torch(path, "a checkpoint written by sparseapps recsys train")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CorruptFileError(
            f"{path} is not a sparseapps recsys checkpoint of version {CHECKPOINT_VERSION} "
            f"(expected a dict with 'version': {CHECKPOINT_VERSION})"
        )
    return state


def config_differences(saved: dict[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for every field on which a saved config differs from ``current``.

    A field the saved config lacks (written before the field existed) counts as its default value, and PEP's
    ``pep_*`` settings count only when one of the two runs is a PEP run (no other method reads them).
    """
    now, defaults = current.to_dict(), type(current)().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    differences = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v} | {
        k: (v, None) for k, v in saved.items() if k not in now
    }
    if "pep" not in (saved.get("method"), current.method):
        differences = {k: v for k, v in differences.items() if not k.startswith("pep_")}
    return differences


def _read_record(out_dir: Path, *, overwrite: bool) -> tuple[bool, str | None, dict[str, Any] | None]:
    """``(present, tool, settings)`` of the record in ``out_dir``: ``(False, None, None)`` when there is none, a
    ``None`` tool and settings for a record that is not a sparseapps one (damaged: an error unless ``overwrite``)."""
    record = out_dir / OWNER_FILE
    if not record.exists():
        return False, None, None
    try:
        saved = load_json(record, "the record of which sparseapps tool and settings wrote this directory")
    except CorruptFileError:
        if overwrite:
            return True, None, None
        raise
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return True, None, None
    return True, saved.get("tool"), saved["settings"]


@dataclass(frozen=True)
class OutputPlan:
    """What :func:`plan_output` found in an output directory and what :meth:`claim` will do there.

    Attributes:
        checkpoint: the saved training state to continue from, or ``None`` to start.
        search: the saved PEP search state to continue from, or ``None``.
        settings: the settings to record (the recorded ones when they equal the configuration's).
        replace: remove the files of the run there first (``overwrite``, or a record with nothing else).
        adopt: record a run of a version that recorded no settings (its checkpoint matched).
    """

    checkpoint: dict[str, Any] | None
    search: dict[str, Any] | None
    settings: dict[str, Any]
    replace: bool
    adopt: bool

    def claim(self, out_dir: Path) -> None:
        """Records the run in ``out_dir`` (:func:`~sparseapps.core.io.claim_output`), first removing the files
        of the run it replaces."""
        if self.replace:  # without a record, claim_output(overwrite=True) removes every file of a run
            (out_dir / OWNER_FILE).unlink(missing_ok=True)
        claim_output(
            out_dir,
            tool=TOOL,
            settings=self.settings,
            outputs=() if self.adopt else OUTPUTS,
            overwrite=self.replace,
        )

    def check(self, out_dir: Path) -> None:
        """Raises what :meth:`claim` would raise in ``out_dir``, writing nothing there."""
        if not self.replace:  # replacing: claim removes the run there, whatever it is
            check_output(out_dir, tool=TOOL, settings=self.settings, outputs=() if self.adopt else OUTPUTS)


def plan_output(out_dir: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> OutputPlan:
    """Checks what ``out_dir`` holds against a run of ``config``, writing nothing; returns what to resume.

    A directory holding a run of ``config`` is continued with ``resume`` and refused without it; one holding
    anything else (another configuration, another tool's run, files without a record) is refused, naming what
    differs, unless ``overwrite``, which removes the files :func:`~sparseapps.recsys.train.train` writes
    (:data:`OUTPUTS`) and starts afresh. ``resume`` into an empty or missing directory simply starts, as does any
    run into a directory that holds only the record of a run that wrote nothing. A configuration that differs only
    in fields added since the run was recorded (at their defaults), or in PEP settings that neither run reads,
    counts as the same. A run of a version that recorded no settings is continued (and recorded) when its
    checkpoint's configuration matches. Training checks first and claims (:meth:`OutputPlan.claim`) once the data
    has loaded, so a run that fails before it starts leaves the directory as it was.

    Raises:
        ConfigMismatchError: the run there (its record or checkpoint) has another configuration (a ValueError).
        FileExistsError: a run is there and ``resume`` is False, or results but no checkpoint to resume from;
            :class:`~sparseapps.core.io.OutputConflictError` for another tool's run or foreign files.
        CorruptFileError: a damaged checkpoint or record (a ValueError).
    """
    has_record, tool, recorded = _read_record(out_dir, overwrite=overwrite)
    present = [name for name in (CHECKPOINT, PEP_CHECKPOINT, RESULTS) if (out_dir / name).exists()]
    written = [name for name in OUTPUTS if (out_dir / name).exists()]
    if tool != TOOL:
        recorded = None
    settings: dict[str, Any] = config.to_dict()
    states: dict[str, dict[str, Any]] = {}
    empty_run = recorded is not None and not written
    if (recorded is not None or not has_record) and not empty_run:
        differences = config_differences(recorded, config) if recorded is not None else {}
        if differences and not overwrite:
            raise ConfigMismatchError(
                f"{out_dir} holds a run of another configuration ({out_dir / OWNER_FILE}); (saved, current) "
                f"differ in {differences}. Nothing was changed: choose another output directory, or pass "
                "--overwrite (overwrite=True) to replace it"
            )
        if recorded is not None and not differences:
            settings = recorded  # equal to config, up to fields added since and PEP settings no run reads
        if present and not resume and not overwrite:
            what = (
                "a run"
                if has_record
                else f"{', '.join(present)} but no {OWNER_FILE} (a run of a sparseapps version that did not "
                "record its settings, or another program's files)"
            )
            raise FileExistsError(
                f"{out_dir} already holds {what}; pass resume=True (--resume) to continue it, overwrite=True "
                "(--overwrite) to replace it, or choose another output directory"
            )
        if present and resume and not differences:
            paths = [out_dir / name for name in (CHECKPOINT, PEP_CHECKPOINT) if (out_dir / name).exists()]
            if not paths and not overwrite:
                raise FileExistsError(
                    f"{out_dir} holds {RESULTS} but no {CHECKPOINT} to resume from; refusing to retrain over "
                    "those results: choose another output directory, move them away or pass --overwrite"
                )
            for path in paths:
                saved = load_checkpoint(path)
                mismatch = config_differences(saved["config"], config)
                if mismatch and not overwrite:
                    raise ConfigMismatchError(
                        f"{path} was made with another configuration; (saved, current) differ in {mismatch}. "
                        "Nothing was changed: choose another output directory, or pass --overwrite "
                        "(overwrite=True) to replace it"
                    )
                if mismatch:
                    states = {}
                    break
                states[path.name] = saved
    plan = OutputPlan(
        checkpoint=states.get(CHECKPOINT),
        search=states.get(PEP_CHECKPOINT),
        settings=settings,
        replace=(overwrite and not states) or empty_run,
        adopt=bool(states) and not has_record,
    )
    plan.check(out_dir)  # another tool's run, a foreign record or files: claim_output's refusals
    return plan


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``save_torch`` (atomic); with ``$SPARSEAPPS_TEST_SLOW_CHECKPOINT`` set, pauses that many seconds halfway
    through writing the temporary file (a test hook: a kill then lands inside the write)."""
    pause = os.environ.get(SLOW_CHECKPOINT_VARIABLE)
    if not pause:
        save_torch(path, state)
        return
    try:
        seconds = float(pause)
    except ValueError:
        raise ValueError(f"${SLOW_CHECKPOINT_VARIABLE} must be a number of seconds, got {pause!r}") from None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()

    def write_slowly(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data[: len(data) // 2])
            stream.flush()
            time.sleep(seconds)
            stream.write(data[len(data) // 2 :])

    write_atomic(path, write_slowly)
