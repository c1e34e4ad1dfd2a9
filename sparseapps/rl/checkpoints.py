"""A run directory's files: checkpoints written while training, what resuming from one restores, and the finished
run's result, each checked against the ``MANIFEST.json`` written with it before anything is unpickled.

A checkpoint (``checkpoint/``) is written at a rollout boundary into a fresh directory and swapped in: ``model.zip``
(networks with their masks, optimizers, SB3's counters and last observation), the replay buffer, the sparsity
engines' state (``sparsity.pt``), a dense run's neuron recycler's state (``recycler.pt``: ReDo's counters, history
and generators, continual backprop's utilities and generator), the random generators (``random_state.pt``), the
environments mid-episode (``environments.pkl``), the run's settings (``run.json``) and progress. A run of other
settings is refused with the differing fields (its settings are compared before the files they require are looked
for), a damaged file with its name and how to start afresh.

Example:
    >>> differences({"steps": 64, "sparsity": {"sparsity": 0.8}}, {"steps": 64, "sparsity": {"sparsity": 0.5}},
    ...             ["steps", "sparsity"])
    {'sparsity.sparsity': (0.8, 0.5)}
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sparseapps.core.io import (
    MANIFEST,
    CorruptFileError,
    load_json,
    load_torch,
    remove_outputs,
    remove_temporaries,
    save_torch,
    verify_manifest,
    write_atomic,
    write_json,
    write_manifest,
)
from sparseapps.rl.callback import DynamicSparsityCallback
from sparseapps.rl.plasticity import ContinualBackpropCallback, ReDoCallback
from sparseapps.rl.resume import pickle_environments, random_state, restore_environments
from sparseapps.rl.run_config import ALGORITHM_CLASSES, RLRun, upgrade_run_settings

__all__ = [
    "FINAL_FILES",
    "RUN_OUTPUTS",
    "OtherRunError",
    "differences",
    "find_checkpoint",
    "read_result",
    "remove_run",
    "resume_model",
    "write_checkpoint",
]

# Files of a run directory that train_run writes (overwrite removes these, never other files).
RUN_OUTPUTS = (
    "result.json",
    "model.zip",
    "replay_buffer.pkl",
    MANIFEST,
    "checkpoint",
    "checkpoint.old",
    "checkpoint.tmp",
    "tb",
)
# A finished run's files the run directory's manifest covers (replay_buffer.pkl only when kept).
FINAL_FILES = ("model.zip", "result.json", "replay_buffer.pkl")
CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")
# Settings that do not change what a run computes: resuming with other values is allowed.
RESUMABLE_CHANGES = ("threads", "device", "checkpoint_every")


class OtherRunError(ValueError):
    """A run directory holds a run of another configuration (``overwrite`` replaces it)."""


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``{key: (saved, current)}`` where they differ; nested settings (a run's sparsity configuration, its
    hyperparameters) are compared field by field as ``key.field``."""
    found: dict[str, Any] = {}
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            fields = sorted({*old, *new})
            found |= differences(
                {f"{key}.{k}": v for k, v in old.items()},
                {f"{key}.{k}": v for k, v in new.items()},
                [f"{key}.{k}" for k in fields],
            )
        elif old != new:
            found[key] = (old, new)
    return found


def _refuse_other(path: Path, saved: Mapping[str, Any], run: RLRun) -> None:
    """Raises :class:`OtherRunError` when the settings saved at ``path`` are not ``run``'s."""
    current = run.to_dict()
    try:
        settings = upgrade_run_settings(saved)
    except (ValueError, TypeError) as error:
        raise OtherRunError(
            f"{path} holds settings this version cannot read ({error}). Use another --out directory, or pass "
            "--overwrite (overwrite=True) to retrain it."
        ) from None
    # Fields added after the run was saved take their defaults.
    defaults = RLRun(env=run.env, algo=run.algo).to_dict()
    settings = {**{k: v for k, v in defaults.items() if k not in settings}, **settings}
    keys = sorted(k for k in {*settings, *current} if k not in RESUMABLE_CHANGES)
    diff = differences(settings, current, keys)
    if diff:
        raise OtherRunError(
            f"{path} holds a run of another configuration; (saved, requested) differ in {diff}. "
            "Use another --out directory or the same settings, or pass --overwrite (overwrite=True) to retrain it."
        )


def _listed(directory: Path) -> list[str]:
    """The files a directory's manifest lists (none when it is missing or damaged: verify_manifest says which)."""
    try:
        manifest = load_json(directory / MANIFEST)
    except CorruptFileError:
        return []
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return sorted(files) if isinstance(files, dict) else []


def start_afresh(error: CorruptFileError, out: Path) -> CorruptFileError:
    """``error`` with how to start the run in ``out`` afresh."""
    return CorruptFileError(f"{error}. To start this run afresh, remove {out} or pass --overwrite")


def remove_run(out: Path) -> None:
    """Removes what train_run wrote into ``out`` (``overwrite``); other files stay."""
    remove_outputs(out, RUN_OUTPUTS)
    remove_temporaries(out)


def remove_checkpoints(out: Path) -> None:
    """Removes the checkpoints of a finished run (also those a kill right after finishing left behind)."""
    for name in CHECKPOINTS:
        shutil.rmtree(out / name, ignore_errors=True)


def read_result(out: Path, run: RLRun | None = None) -> dict[str, Any] | None:
    """The result of the finished run in ``out`` (None when it has not finished), checked against its manifest.

    Args:
        out: a run directory written by :func:`~sparseapps.rl.train.train_run`.
        run: when given, a result of another configuration is refused.

    Raises:
        CorruptFileError: ``result.json`` or ``model.zip`` is damaged or differs from the run's ``MANIFEST.json``.
        OtherRunError: the result is of another configuration than ``run`` (a ``ValueError``).
    """
    out = Path(out)
    result_path = out / "result.json"
    if not result_path.exists():
        return None
    if (out / MANIFEST).exists():
        verify_manifest(out, sorted({*_listed(out), "model.zip", "result.json"}))
    elif (out / "model.zip").exists():
        # Killed between writing result.json and its manifest (both files were written whole, atomically).
        write_manifest(out, [name for name in FINAL_FILES if (out / name).exists()])
    result = load_json(result_path, "a finished run's result")
    if not isinstance(result, dict) or not isinstance(result.get("run"), dict) or "label" not in result:
        raise CorruptFileError(f"{result_path} is not the result of a sparseapps RL run")
    if run is not None:
        _refuse_other(result_path, result["run"], run)
    return result


def find_checkpoint(out: Path) -> Path | None:
    """The run's last complete checkpoint directory, or None."""
    for name in ("checkpoint", "checkpoint.old"):
        # A checkpoint directory is swapped in only when complete; a kill between the two renames leaves the
        # previous one as checkpoint.old. verify_manifest refuses one without a manifest.
        if (out / name / "progress.json").exists():
            return out / name
    return None


def write_checkpoint(
    directory: Path,
    model: BaseAlgorithm,
    run: RLRun,
    envs: Mapping[str, VecEnv | None],
    sparsity: DynamicSparsityCallback | None,
    progress: Mapping[str, Any],
    *,
    warn: bool,
    recycler: ReDoCallback | ContinualBackpropCallback | None = None,
) -> bool:
    """Writes a checkpoint into a fresh directory beside ``directory``, then swaps it in (never a half-written one).

    Call it at the start of a rollout (SB3's ``on_rollout_start``), after the previous rollout's training: the
    state saved there is everything the rest of the run depends on.

    Args:
        progress: the run's progress (``curve``, ``episodes``, ``next_eval``, ``next_checkpoint``,
            ``train_seconds``).
        warn: warn when the environments cannot be pickled.
        recycler: the run's neuron recycler (its state is written to ``recycler.pt``), or None.

    Returns:
        whether the environments' state was saved (the resumed run is then bit for bit an uninterrupted one).
    """
    fresh = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    model.save(fresh / "model.zip")
    if isinstance(model, OffPolicyAlgorithm):
        model.save_replay_buffer(fresh / "replay_buffer.pkl")
    if sparsity is not None:
        save_torch(fresh / "sparsity.pt", sparsity.state_dict())
    if recycler is not None:
        save_torch(fresh / "recycler.pt", recycler.state_dict())
    save_torch(fresh / "random_state.pt", random_state(model))
    saved_environments = True
    try:
        environments = pickle_environments(model, envs)
    except TypeError as error:
        saved_environments = False
        if warn:
            warnings.warn(
                f"{run.env}: the checkpoints hold no environment state ({error}); resuming from one resets the "
                "environments, so the resumed run will differ from an uninterrupted one",
                stacklevel=3,
            )
    else:
        write_atomic(fresh / "environments.pkl", environments)
    write_json(fresh / "run.json", run.to_dict())
    write_json(fresh / "progress.json", dict(progress))
    write_manifest(fresh, sorted(path.name for path in fresh.iterdir() if path.is_file()))
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old, ignore_errors=True)
    return saved_environments


def resume_model(
    run: RLRun,
    checkpoint: Path,
    envs: Mapping[str, VecEnv | None],
    sparsity: DynamicSparsityCallback | None,
    tensorboard_log: str,
    recycler: ReDoCallback | ContinualBackpropCallback | None = None,
) -> tuple[BaseAlgorithm, dict[str, Any], Mapping[str, Any] | None]:
    """The model of ``checkpoint`` with the environments, the engines' and the recycler's state restored.

    Returns:
        ``(model, progress, random states)``: the random states are restored where they were saved, at the start
        of the next rollout (None for a checkpoint without them, whose resumed run differs from an
        uninterrupted one).

    Raises:
        CorruptFileError: a file is damaged or differs from the checkpoint's manifest.
        OtherRunError: the checkpoint is of another run.
    """
    algorithm = ALGORITHM_CLASSES[run.algo]
    off_policy = issubclass(algorithm, OffPolicyAlgorithm)
    required = {"model.zip", "run.json", "progress.json"}
    required |= {"replay_buffer.pkl"} if off_policy else set()
    required |= {"sparsity.pt"} if sparsity is not None else set()
    required |= {"recycler.pt"} if recycler is not None else set()
    present = {path.name for path in checkpoint.iterdir() if path.name != MANIFEST}
    # The settings first: a run of another configuration (say another recycler) is refused as such, before the
    # files its configuration requires are looked for.
    verify_manifest(checkpoint, ["run.json"])
    _refuse_other(checkpoint / "run.json", load_json(checkpoint / "run.json", "the run's settings"), run)
    # model.zip, the replay buffer and the environments are pickles: read only what this run wrote.
    verify_manifest(checkpoint, sorted(present | required | set(_listed(checkpoint))))
    progress = load_json(checkpoint / "progress.json", "the run's progress")
    if not isinstance(progress, dict) or not {"curve", "episodes", "next_eval", "next_checkpoint"} <= set(
        progress
    ):
        raise CorruptFileError(f"{checkpoint / 'progress.json'} is not the progress of a sparseapps RL run")
    exact = (checkpoint / "environments.pkl").exists() and (checkpoint / "random_state.pt").exists()
    try:
        model = algorithm.load(
            checkpoint / "model.zip",
            env=envs["train"],
            device=run.device,
            tensorboard_log=tensorboard_log,
            force_reset=not exact,
        )
        if off_policy:
            model.load_replay_buffer(checkpoint / "replay_buffer.pkl")
    except Exception as error:  # SB3 raises many types for an archive it cannot read
        raise CorruptFileError(
            f"{checkpoint / 'model.zip'} (or its replay buffer) cannot be loaded by {algorithm.__name__}: "
            f"{type(error).__name__}: {error}"
        ) from error
    states = None
    if exact:
        # After SB3's load, which reseeds the environments and the action space.
        restore_environments(model, (checkpoint / "environments.pkl").read_bytes(), envs)
        states = load_torch(checkpoint / "random_state.pt", "the run's random states")
    else:
        warnings.warn(
            f"{checkpoint} holds no environment or random state (written by an older sparseapps, or for "
            "environments that cannot be pickled): the environments restart and the resumed run will differ "
            "from an uninterrupted one",
            stacklevel=3,
        )
    if sparsity is not None:
        state = load_torch(checkpoint / "sparsity.pt", "the sparsity engines' state")
        try:
            sparsity.load_state_dict(state)
        except ValueError as error:
            raise CorruptFileError(f"{checkpoint / 'sparsity.pt'} cannot be resumed: {error}") from error
    if recycler is not None:
        state = load_torch(checkpoint / "recycler.pt", "the neuron recycler's state")
        try:
            recycler.load_state_dict(state, model=model)
        except (ValueError, TypeError) as error:
            raise CorruptFileError(f"{checkpoint / 'recycler.pt'} cannot be resumed: {error}") from error
    return model, progress, states
