"""Finding, loading and describing the compiled kernels; the reference path when they are not there.

The extension is compiled ahead of time by ``python -m sparseapps.core.kernels.build`` (the install script runs
it) into ``sparseapps/core/kernels/_build/``. Loading here never compiles: it opens that library when its
recorded fingerprint (torch version + source digest) matches, and otherwise defines the same operators in
Python over the reference twins, so ``torch.ops.sparseapps.condensed_linear``, ``csr_linear``,
``blocked_linear`` and ``csr_sddmm`` always exist and a model condensed on one machine runs (more slowly) on
another. ``kernel_status()`` says which happened.

Set ``SPARSEAPPS_KERNELS=reference`` to skip the compiled library on purpose.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseapps.core.kernels import reference

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
BUILD_DIR = PACKAGE_DIR / "_build"
LIBRARY_NAME = "sparseapps_kernels"
LIBRARY_FILE = BUILD_DIR / f"{LIBRARY_NAME}.so"
INFO_FILE = BUILD_DIR / "build_info.json"
BUILD_COMMAND = "python -m sparseapps.core.kernels.build"
DISABLE_VARIABLE = "SPARSEAPPS_KERNELS"

CONDENSED_SCHEMA = "condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, Tensor? rows, int out_features) -> Tensor"
BLOCKED_SCHEMA = (
    "blocked_linear(Tensor x, Tensor values, Tensor lanes, Tensor chunks, Tensor group_ptr, Tensor? lane_rows, "
    "Tensor? bias, int out_features, int max_threads=0) -> Tensor"
)
CSR_SCHEMA = (
    "csr_linear(Tensor x, Tensor row_ptr, Tensor values, Tensor indices, Tensor? bias, Tensor? rows, "
    "int out_features) -> Tensor"
)
SDDMM_SCHEMA = "csr_sddmm(Tensor x, Tensor dy, Tensor row_ptr, Tensor indices) -> Tensor"


def source_files() -> list[Path]:
    """The C++ sources and headers the library is built from, in a fixed order."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in {".cpp", ".h"})


def source_digest() -> str:
    """SHA-256 over the names and contents of :func:`source_files`."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint() -> dict[str, str]:
    """What a built library must match to be loaded: the torch version and the sources."""
    return {"torch": torch.__version__, "sources": source_digest()}


@dataclass(frozen=True, kw_only=True)
class LoadState:
    """Outcome of loading: which implementation backs ``torch.ops.sparseapps``."""

    compiled: bool
    state: str
    reason: str | None


_lock = threading.RLock()
_state: LoadState | None = None
_ready = False
_tuning: dict[str, Any] | None = None
_libraries: list[torch.library.Library] = []


def _try_compiled() -> LoadState:
    if os.environ.get(DISABLE_VARIABLE, "").lower() == "reference":
        return LoadState(compiled=False, state="disabled", reason=f"{DISABLE_VARIABLE}=reference is set")
    if not LIBRARY_FILE.exists():
        return LoadState(
            compiled=False, state="not built", reason=f"{LIBRARY_FILE} does not exist; run `{BUILD_COMMAND}`"
        )
    try:
        recorded = json.loads(INFO_FILE.read_text())
    except (OSError, ValueError) as error:
        return LoadState(compiled=False, state="stale", reason=f"cannot read {INFO_FILE} ({error}); rebuild")
    expected = fingerprint()
    for key, value in expected.items():
        if recorded.get(key) != value:
            return LoadState(
                compiled=False,
                state="stale",
                reason=f"built for {key}={recorded.get(key)!r}, running with {value!r}; run `{BUILD_COMMAND}`",
            )
    try:
        torch.ops.load_library(str(LIBRARY_FILE))
    except (OSError, RuntimeError) as error:
        return LoadState(compiled=False, state="failed", reason=f"loading {LIBRARY_FILE} failed: {error}")
    return LoadState(compiled=True, state="loaded", reason=None)


def _define_reference_ops() -> None:
    library = torch.library.Library("sparseapps", "DEF")
    library.define(CONDENSED_SCHEMA)
    library.define(CSR_SCHEMA)
    library.define(BLOCKED_SCHEMA)
    library.define(SDDMM_SCHEMA)
    library.impl("condensed_linear", reference.condensed_linear_reference, "CPU")
    library.impl("csr_linear", reference.csr_linear_reference, "CPU")
    library.impl("blocked_linear", reference.blocked_linear_reference, "CPU")
    library.impl("csr_sddmm", reference.csr_sddmm_reference, "CPU")
    _libraries.append(library)


def _condensed_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    if x.dtype != values.dtype:
        raise TypeError(f"expected x of dtype {values.dtype} (the weights'), got {x.dtype}")
    if values.dim() != 2 or indices.shape != values.shape:
        raise ValueError(
            f"expected values and indices of one shape [R, k], got {values.shape} and {indices.shape}"
        )
    return x.new_empty((*x.shape[:-1], out_features))


def _csr_fake(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    if x.dtype != values.dtype:
        raise TypeError(f"expected x of dtype {values.dtype} (the weights'), got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def _blocked_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    lanes: torch.Tensor,
    chunks: torch.Tensor,
    group_ptr: torch.Tensor,
    lane_rows: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    max_threads: int = 0,
) -> torch.Tensor:
    if x.dtype != values.dtype:
        raise TypeError(f"expected x of dtype {values.dtype} (the weights'), got {x.dtype}")
    return x.new_empty((*x.shape[:-1], out_features))


def _sddmm_fake(
    x: torch.Tensor, dy: torch.Tensor, row_ptr: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    if x.dtype != dy.dtype:
        raise TypeError(f"expected dy of dtype {x.dtype} (the inputs'), got {dy.dtype}")
    return x.new_empty((indices.shape[0],))


def _register_common() -> None:
    from sparseapps.core.kernels import gpu

    library = torch.library.Library("sparseapps", "IMPL")
    library.impl("condensed_linear", gpu.condensed_linear_cuda, "CUDA")
    library.impl("csr_linear", gpu.csr_linear_cuda, "CUDA")
    library.impl("blocked_linear", reference.blocked_linear_reference, "CUDA")
    library.impl("csr_sddmm", gpu.csr_sddmm_cuda, "CUDA")
    _libraries.append(library)
    torch.library.register_fake("sparseapps::condensed_linear", _condensed_fake)
    torch.library.register_fake("sparseapps::csr_linear", _csr_fake)
    torch.library.register_fake("sparseapps::blocked_linear", _blocked_fake)
    torch.library.register_fake("sparseapps::csr_sddmm", _sddmm_fake)


def ensure_loaded() -> LoadState:
    """Loads the compiled library (or defines the reference operators) once per process; cheap afterwards.

    A compiled library is then configured for this CPU (``tuning.apply_tuning``: cached per CPU model, measured
    once where there is no entry yet); other threads wait until that is done.
    """
    global _state, _ready, _tuning
    if _ready:
        assert _state is not None
        return _state
    with _lock:  # re-entrant: the tuning's own kernel calls come back here while it runs
        if _state is None:
            state = _try_compiled()
            if not state.compiled:
                _define_reference_ops()
            _register_common()
            _state = state
            if state.compiled:
                from sparseapps.core.kernels import tuning

                _tuning = tuning.apply_tuning()
            _ready = True
    return _state


def tuning_status() -> dict[str, Any] | None:
    """How this process's kernel parameters were chosen (see ``tuning.apply_tuning``), or None (reference)."""
    ensure_loaded()
    return _tuning


def configure_kernels(isa: str = "", gather_max_batch: int = -1, tile_bytes: int = -1) -> str:
    """Tests and tuning only: picks the compiled instruction set and the two tuning knobs.

    Args:
        isa: ``"avx512"``, ``"avx2"``, ``"generic"``, or ``""`` for the best this CPU has.
        gather_max_batch: batches up to this size use the gather path (1..4); ``-1`` keeps the current value.
        tile_bytes: byte budget of one column tile of transposed activations; ``-1`` keeps the current value.

    Returns:
        The library's description after the change.
    """
    if not ensure_loaded().compiled:
        raise RuntimeError(f"the compiled kernels are not loaded ({_state.reason if _state else 'unknown'})")
    return str(torch.ops.sparseapps._configure(isa, gather_max_batch, tile_bytes))


def loaded_parameters() -> dict[str, Any] | None:
    """The compiled kernels' instruction set and tuning knobs in this process (they set the kernels' summation
    order, so a run resumed under others is not bitwise identical), or None when the compiled library has not been
    loaded (nothing is loaded or measured by asking).

    Example:
        >>> parameters = loaded_parameters()
        >>> parameters is None or sorted(parameters) == ["gather_max_batch", "isa", "tile_bytes"]
        True
    """
    if not _ready or _state is None or not _state.compiled:
        return None
    info = _parse_info(str(torch.ops.sparseapps.kernel_info()))
    return {key: info.get(key) for key in ("isa", "gather_max_batch", "tile_bytes")}


def _parse_info(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        parsed[key] = int(value) if value.lstrip("-").isdigit() else value
    return parsed


def kernel_status() -> dict[str, Any]:
    """What backs the sparse operators here, for ``sparseapps info``.

    Returns:
        A JSON-serializable dict: ``compiled`` (bool), ``state`` (``loaded``, ``not built``, ``stale``, ``failed``
        or ``disabled``), ``reason`` (why the compiled path is not used, or None), ``library`` (its path),
        ``isa`` (instruction set of the kernels in use, or ``reference``), ``threads`` (torch's thread count),
        ``bf16`` (bfloat16 weights supported), ``gpu`` (the GPU path, or why there is none), ``build_command``.
    """
    state = ensure_loaded()
    status: dict[str, Any] = {
        "compiled": state.compiled,
        "state": state.state,
        "reason": state.reason,
        "library": str(LIBRARY_FILE),
        "threads": torch.get_num_threads(),
        "build_command": BUILD_COMMAND,
    }
    if state.compiled:
        info = _parse_info(str(torch.ops.sparseapps.kernel_info()))
        status.update(
            isa=info.get("isa"),
            gather_max_batch=info.get("gather_max_batch"),
            tile_bytes=info.get("tile_bytes"),
            tuning=(_tuning or {}).get("source"),
            tuned_under_load=bool((_tuning or {}).get("measured_under_load", False)),
            bf16=True,
        )
    else:
        status.update(isa="reference", bf16=True)
    if not torch.cuda.is_available():
        status["gpu"] = "unavailable (no CUDA device)"
    elif importlib.util.find_spec("triton") is None:
        status["gpu"] = "reference (triton is not installed)"
    else:
        status["gpu"] = "triton"
    return status
