"""Files the package writes and reads back: atomic writes, tensor-only loading, and SHA-256 manifests.

The trust boundary:

- ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a
  planted file cannot run code. A file that needs more is refused and named.
- Files in a format that can run code when it is read (Stable-Baselines3's ``model.zip`` and replay buffers, which
  are cloudpickle) are read only after :func:`verify_manifest` has matched the SHA-256 of every file against the
  ``MANIFEST.json`` that the same run wrote next to them. Only your own checkpoints can be resumed that way: a
  manifest is an integrity check against damage and mix-ups, not a signature. A file from someone else is as
  trustworthy as its sender.

Every file is written through :func:`write_atomic`: a temporary file in the same directory, ``fsync``, then
``os.replace``, so a reader sees the old file or the new one, never a half-written one. Temporary files left by a
killed run match :data:`TEMPORARY_GLOB` and are removed by :func:`remove_temporaries` on the next start.

Every output directory is claimed through :func:`claim_output`: it records which tool and settings wrote it
(``sparseapps-run.json``) and refuses a run of another tool or other settings into it, naming the directory, the
file and what differs, unless the user passes ``overwrite`` (which removes only the files that tool writes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST",
    "OWNER_FILE",
    "TEMPORARY_GLOB",
    "CorruptFileError",
    "OutputConflictError",
    "check_output",
    "claim_output",
    "load_json",
    "load_torch",
    "remove_outputs",
    "remove_temporaries",
    "save_torch",
    "sha256",
    "verify_manifest",
    "write_atomic",
    "write_json",
    "write_manifest",
]

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
TEMPORARY_SUFFIX = ".sparseapps-tmp"
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"
OWNER_FILE = "sparseapps-run.json"
# Formats whose reading can run code (pickle, cloudpickle inside SB3's zip archives).
UNSAFE_SUFFIXES = (".pkl", ".zip", ".pickle")
OWNER_VERSION = 1


class CorruptFileError(ValueError):
    """A file the package wrote is damaged, foreign, or does not match its run's manifest (a ``ValueError``)."""


class OutputConflictError(FileExistsError):
    """An output directory holds results that a run would overwrite (another tool, other settings, or foreign)."""


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_DEFAULT_MODE = _default_mode()  # what open() would give a new file (mkstemp alone gives 0o600)


@contextlib.contextmanager
def _temporary_beside(path: Path, mode: int) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_atomic(
    path: str | os.PathLike[str], data: bytes | Callable[[Path], None], *, mode: int | None = None
) -> None:
    """Writes ``data`` (bytes, or a function that writes a given path) to ``path`` atomically.

    A temporary file in the same directory is written, flushed to disk and renamed over ``path``; on any error
    ``path`` keeps its old contents and the temporary file is removed. ``mode`` sets the permission bits
    (default: those of a new file under the process's umask).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_atomic(target, b"hello")
        >>> target.read_bytes()
        b'hello'
    """
    with _temporary_beside(Path(path), _DEFAULT_MODE if mode is None else mode) as temporary:
        if isinstance(data, bytes | bytearray | memoryview):
            temporary.write_bytes(data)
        else:
            data(temporary)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def load_torch(path: str | os.PathLike[str], what: str = "a sparseapps checkpoint") -> Any:
    """Reads a ``torch.save`` file with ``weights_only=True`` (no code runs); a bad file raises :class:`CorruptFileError`.

    Raises:
        CorruptFileError: the file is missing, truncated, not a torch file, or holds objects other than tensors,
            numbers, strings and containers (a pickle that would run code is refused, not run).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CorruptFileError(f"{path}: no such file (expected {what})") from error
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle of objects at all: damaged
            raise _damaged(path, what, error) from error
        # a pickled object beyond tensors: refused by the restricted unpickler, never built
        raise CorruptFileError(
            f"{path} holds Python objects ({found.group(1)}) that only an unrestricted unpickler could read "
            f"(expected {what}: "
            "tensors, numbers and strings only); reading them can run code, so the file was refused and nothing "
            "in it ran. Only checkpoints written by your own runs can be resumed; remove it or choose another "
            "output directory to start afresh"
        ) from error
    except Exception as error:  # torch raises many types for a damaged file
        raise _damaged(path, what, error) from error


def _damaged(path: Path, what: str, error: Exception) -> CorruptFileError:
    text = str(error)
    # torch's weights_only message opens with advice to load unsafely; quote only what went wrong
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    detail = found.group(1) if found else (text.splitlines() or [""])[0]
    return CorruptFileError(
        f"{path} is not a readable file of {what}: {type(error).__name__}: {detail}. "
        "sparseapps reads only tensors, numbers and strings from .pt files (weights_only=True) and never runs "
        "code from them; if this is your run's file, it is damaged: remove it or choose another output "
        "directory to start afresh"
    )


def load_json(path: str | os.PathLike[str], what: str = "a sparseapps file") -> Any:
    """``json.loads`` of ``path``; a missing, truncated or non-JSON file raises :class:`CorruptFileError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CorruptFileError(f"{path}: no such file (expected {what})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(
            f"{path} is not valid JSON ({what}): {error}; it is damaged (a run killed while writing it, or "
            "edited by hand): remove it or choose another output directory to start afresh"
        ) from error


def sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Writes ``MANIFEST.json`` in ``directory``: the SHA-256 and size of each named file there."""
    directory = Path(directory)
    files = {
        name: {"sha256": sha256(directory / name), "bytes": (directory / name).stat().st_size}
        for name in names
    }
    write_json(directory / MANIFEST, {"version": MANIFEST_VERSION, "files": files})


def verify_manifest(directory: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Checks that each named file in ``directory`` matches the ``MANIFEST.json`` written with it.

    Call it before reading any file whose format can run code (pickle, cloudpickle).

    Raises:
        CorruptFileError: the manifest is missing or damaged, does not list a file, or a file's hash differs.
    """
    directory = Path(directory)
    manifest = load_json(
        directory / MANIFEST,
        "the manifest of SHA-256 hashes that sparseapps writes with every checkpoint; a checkpoint without one "
        "was written before version checks existed or by another tool, and is not read",
    )
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise CorruptFileError(
            f"{directory / MANIFEST} is not a sparseapps manifest of version {MANIFEST_VERSION}"
        )
    for name in names:
        path = directory / name
        entry = listed.get(name)
        if not isinstance(entry, dict):
            raise CorruptFileError(f"{directory / MANIFEST} does not list {name}; refusing to read {path}")
        if not path.is_file():
            raise CorruptFileError(f"{path}: no such file, though {directory / MANIFEST} lists it")
        if sha256(path) != entry.get("sha256"):
            unsafe = path.suffix in UNSAFE_SUFFIXES
            raise CorruptFileError(
                f"{path} differs from the SHA-256 recorded in {directory / MANIFEST} when this run wrote it, so it "
                "is not read"
                + (
                    " (its format can run code: only checkpoints written by your own runs can be resumed)"
                    if unsafe
                    else " (damaged, or changed after the run wrote it)"
                )
                + "; remove the directory or choose another output directory to start afresh"
            )


def remove_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporary files a killed run left in ``directory`` (not recursive); returns what it removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [path for path in directory.glob(TEMPORARY_GLOB) if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        key: (saved.get(key), requested.get(key))
        for key in sorted(set(saved) | set(requested))
        if saved.get(key) != requested.get(key)
    }


def claim_output(
    directory: str | os.PathLike[str],
    *,
    tool: str,
    settings: Mapping[str, Any],
    outputs: Iterable[str],
    overwrite: bool = False,
) -> bool:
    """Claims ``directory`` for a run of ``tool`` with ``settings``; refuses to write over anything else.

    The directory is created if needed, temporary files of a killed run are removed, and ``sparseapps-run.json``
    records ``tool`` and ``settings`` (JSON values). A later claim with the same tool and settings finds the run
    (the caller resumes or reuses it); any other claim raises :class:`OutputConflictError`, as does a directory
    that holds one of ``outputs`` without the record (another program's files, or a run of a sparseapps version
    that wrote none).

    Args:
        directory: the output directory.
        tool: which command writes it, e.g. ``"recsys train"``.
        settings: everything that changes what the run computes (seed, method, configuration), JSON values.
        outputs: the names of the files and folders ``tool`` writes there; ``overwrite`` removes these only.
        overwrite: replace a conflicting run: remove its ``outputs`` and record, keep any other file.

    Returns:
        ``True`` when the directory already held a run of ``tool`` with ``settings``, ``False`` when it is new
        (or was just cleared by ``overwrite``).

    Raises:
        OutputConflictError: the directory holds results of another tool or other settings, or foreign outputs.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> claim_output(out, tool="demo", settings={"seed": 0}, outputs=["results.json"])
        False
        >>> claim_output(out, tool="demo", settings={"seed": 0}, outputs=["results.json"])
        True
        >>> try:
        ...     claim_output(out, tool="demo", settings={"seed": 1}, outputs=["results.json"])
        ... except OutputConflictError as error:
        ...     print(str(error).split("; ")[1].split(".")[0])
        (saved, requested) differ in {'seed': (0, 1)}
    """
    directory = Path(directory)
    outputs = list(outputs)
    requested = _as_json(settings)
    remove_temporaries(directory)
    problem, held = _inspect(directory, tool, requested, outputs)
    if problem is not None:
        if not overwrite:
            raise _conflict(problem)
        remove_outputs(directory, outputs)
        (directory / OWNER_FILE).unlink(missing_ok=True)
    if not held:
        write_json(directory / OWNER_FILE, {"version": OWNER_VERSION, "tool": tool, "settings": requested})
    return held


def check_output(
    directory: str | os.PathLike[str],
    *,
    tool: str,
    settings: Mapping[str, Any],
    outputs: Iterable[str],
    overwrite: bool = False,
) -> bool:
    """What :func:`claim_output` would do, writing nothing: raises its refusal, returns whether the run is there.

    For a command that checks ``--out`` first and claims it only once the cheap work (loading data) succeeded.
    """
    directory = Path(directory)
    problem, held = _inspect(directory, tool, _as_json(settings), list(outputs))
    if problem is not None and not overwrite:
        raise _conflict(problem)
    return held


def _as_json(settings: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(settings)))  # compare as JSON would store it (tuples -> lists)


def _conflict(problem: str) -> OutputConflictError:
    return OutputConflictError(
        f"{problem}. Nothing was changed. Choose another output directory, or pass --overwrite "
        f"(overwrite=True) to replace it"
    )


def _inspect(directory: Path, tool: str, requested: Any, outputs: list[str]) -> tuple[str | None, bool]:
    """``(problem, held)``: why a run of ``tool`` with ``requested`` settings may not write ``directory``
    (``None`` if it may), and whether the directory already holds that run."""
    record = directory / OWNER_FILE
    if record.exists():
        saved = load_json(record, "the record of which sparseapps tool and settings wrote this directory")
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            return f"{record} is not a sparseapps run record", False
        if saved.get("tool") != tool:
            return (
                f"{directory} holds a run of `sparseapps {saved.get('tool')}` ({record}), not `sparseapps {tool}`",
                False,
            )
        differences = _differences(saved["settings"], requested)
        if differences:
            return (
                f"{directory} holds a run of other settings ({record}); (saved, requested) differ in {differences}",
                False,
            )
        return None, True
    present = [name for name in outputs if (directory / name).exists()]
    if present:
        return (
            f"{directory} holds {directory / present[0]} but no {OWNER_FILE}: it was written by another program "
            "or by a sparseapps version that did not record its settings",
            False,
        )
    return None, False


def remove_outputs(directory: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Removes the named files and folders of ``directory`` (what a tool wrote there); anything else stays."""
    directory = Path(directory)
    for name in names:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
