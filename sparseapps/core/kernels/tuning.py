"""Kernel parameters chosen by measurement on the CPU that runs them, cached per CPU model.

The compiled kernels have three knobs whose best values depend on the CPU's caches and instruction set, not on
the model (the third, ``grow_block_entries``, the block of a compact topology update's growth scan, is timed on
its own workload after the first two): ``tile_bytes`` (the byte budget of one column tile of transposed activations in the batched forward,
input-gradient and weight-gradient kernels: about half an L2 is a guess that is wrong by 2x on some CPUs) and
``gather_max_batch`` (small batches up to this size take the gather path instead of tiles). :func:`tune` times a
fixed set of compact training and inference workloads under every candidate value (interleaved rounds, medians,
one thread) and keeps the set with the lowest geometric mean of times relative to the best per workload.

Results are cached in ``_build/tuning.json`` beside the library, one entry per CPU model, instruction set and
library build, so a checkout moved to another kind of machine re-tunes once there. :func:`apply_tuning` runs
when the library loads: a cached entry is applied; without one the kernels are tuned then (a few seconds, once
per machine kind) unless ``SPARSEAPPS_TUNE=off`` is set (the defaults are used and ``kernel_status`` says so).
``python -m sparseapps.core.kernels.tuning`` (the install script runs it) re-measures and prints the table.

Timings taken while other processes hold the CPU can pick worse values. :func:`tune` records the share of a core
its thread got (thread CPU time over wall time); the command says when that was below :data:`BUSY_SHARE`, and
``sparseapps info`` shows it. Such an entry is not replaced behind the user's back: the parameters change the
kernels' floating-point summation order, so a run resumed under other values is not bitwise identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparseapps.core.io import write_json

TUNE_VARIABLE = "SPARSEAPPS_TUNE"
TILE_BYTES = (128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20)
GATHER_MAX_BATCH = (1, 2, 4)
#: Entries of the dense gradient ``dy^T x`` formed per block by ``grow_select`` (a compact topology update): the
#: product of small blocks runs below the GEMM's speed, large ones fall out of L2 before the scan reads them.
GROW_BLOCK_ENTRIES = (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20)
GROW_BLOCK_DEFAULT = 1 << 18
#: Below this share of a core (thread CPU time / wall time) a measurement is taken as made under load.
BUSY_SHARE = 0.9
_grow_block = GROW_BLOCK_DEFAULT


def grow_block_entries() -> int:
    """The ``block_entries`` of ``grow_select`` chosen for this CPU (the default until tuning has run)."""
    return _grow_block


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """One machine kind's chosen parameters and how they were found."""

    cpu: str
    isa: str
    library: str
    tile_bytes: int
    gather_max_batch: int
    grow_block_entries: int = GROW_BLOCK_DEFAULT
    measured: dict[str, dict[str, float]]
    seconds: float
    cpu_share: float = 1.0  # the tuning thread's CPU time / wall time: below BUSY_SHARE, measured under load


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's description elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_file() -> Path:
    """``_build/tuning.json`` beside the compiled library."""
    from sparseapps.core.kernels import library

    return library.BUILD_DIR / "tuning.json"


def _key(isa: str) -> str:
    from sparseapps.core.kernels import library

    return f"{cpu_model()} | {isa} | {library.fingerprint()['sources'][:16]}"


def _read_cache() -> dict[str, Any]:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-measurement; it is rewritten whole
    return data if isinstance(data, dict) else {}


def _workloads() -> dict[str, Callable[[], None]]:
    """Small versions of what users run: compact layers forward + backward at batch 64 and 256 (wide and
    narrow inputs, so the tile size matters both ways) and sparse inference forwards at batch 2 and 4."""
    from sparseapps.core.compact.layer import CompactLinear
    from sparseapps.core.kernels import formats

    generator = torch.Generator().manual_seed(0)
    work: dict[str, Callable[[], None]] = {}
    for out_features, in_features, batch in ((512, 4096, 256), (768, 3072, 64), (1024, 768, 256)):
        weight = torch.randn(out_features, in_features, generator=generator)
        mask = torch.rand(out_features, in_features, generator=generator) < 0.1
        layer = CompactLinear(weight, mask, torch.zeros(out_features))
        x = torch.randn(batch, in_features, generator=generator, requires_grad=True)

        def step(layer: CompactLinear = layer, x: torch.Tensor = x) -> None:
            layer(x).sum().backward()

        work[f"train {out_features}x{in_features} b{batch}"] = step
    weight = torch.randn(3072, 768, generator=generator)
    mask = torch.rand(3072, 768, generator=generator) < 0.1
    rows = torch.arange(3072)
    row_ptr, values, indices = formats.csr_arrays(weight * mask, mask, rows, torch.int16)
    for batch in (2, 4):
        x = torch.randn(batch, 768, generator=generator)

        def forward(x: torch.Tensor = x) -> None:
            torch.ops.sparseapps.csr_linear(x, row_ptr, values, indices, None, None, 3072)

        work[f"infer 3072x768 b{batch}"] = forward
    return work


def tune(*, rounds: int = 5, verbose: bool = False) -> Tuning:
    """Measures every candidate (``TILE_BYTES`` x ``GATHER_MAX_BATCH``) on :func:`_workloads` at one thread and
    returns the best; the library is left configured with it.

    Raises:
        RuntimeError: the compiled library is not loaded (nothing to tune).
    """
    from sparseapps.core.kernels import library

    if not library.ensure_loaded().compiled:
        raise RuntimeError("the compiled kernels are not loaded: nothing to tune")
    # the first kernel use may come inside no_grad or inference_mode (an evaluation): the workloads need autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _tune(rounds, verbose)


def _tune(rounds: int, verbose: bool) -> Tuning:
    start, start_cpu = time.perf_counter(), time.thread_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    candidates = [(tile, gather) for tile in TILE_BYTES for gather in GATHER_MAX_BATCH]
    times: dict[str, dict[tuple[int, int], list[float]]] = {}
    try:
        work = _workloads()
        for round_index in range(rounds + 1):  # round 0 warms caches and pages up, untimed
            for tile, gather in candidates:
                torch.ops.sparseapps._configure("", gather, tile)
                for name, run in work.items():
                    begin = time.perf_counter()
                    run()
                    elapsed = time.perf_counter() - begin
                    if round_index:
                        times.setdefault(name, {}).setdefault((tile, gather), []).append(elapsed)
        medians = {name: {c: statistics.median(v) for c, v in per.items()} for name, per in times.items()}
        best = {name: min(per.values()) for name, per in medians.items()}

        def score(candidate: tuple[int, int]) -> float:
            return math.fsum(math.log(medians[name][candidate] / best[name]) for name in medians)

        tile, gather = min(candidates, key=lambda c: (score(c), c))
        description = torch.ops.sparseapps._configure("", gather, tile)
        grow_times = _time_grow_blocks(rounds)
        block = min(GROW_BLOCK_ENTRIES, key=lambda b: (grow_times[b], b))
    finally:
        torch.set_num_threads(threads)
    isa = str(description).split(";")[0].removeprefix("isa=")
    result = Tuning(
        cpu=cpu_model(),
        isa=isa,
        library=_key(isa),
        tile_bytes=tile,
        gather_max_batch=gather,
        grow_block_entries=block,
        measured={
            **{
                name: {f"tile={c[0] >> 10}K gather={c[1]}": round(t * 1e3, 4) for c, t in per.items()}
                for name, per in medians.items()
            },
            "grow_select 2048x2048 b64": {
                f"block={b >> 10}K": round(t * 1e3, 4) for b, t in grow_times.items()
            },
        },
        seconds=round(time.perf_counter() - start, 2),
        cpu_share=round(min(1.0, (time.thread_time() - start_cpu) / (time.perf_counter() - start)), 3),
    )
    if verbose:
        for name, per in result.measured.items():
            line = "  ".join(f"{k}: {v:.2f}" for k, v in per.items())
            print(f"[tuning] {name} (ms): {line}")
    return result


def _time_grow_blocks(rounds: int) -> dict[int, float]:
    """Median seconds of one growth scan (a 2048 x 2048 layer's ``|dy^T x|`` from batch-64 factors, 10% active,
    the best 1% grown) per block size, interleaved."""
    generator = torch.Generator().manual_seed(1)
    dy, x = torch.randn(64, 2048, generator=generator), torch.randn(64, 2048, generator=generator)
    excluded = torch.randperm(2048 * 2048, generator=generator)[: 2048 * 2048 // 10].sort().values
    times: dict[int, list[float]] = {b: [] for b in GROW_BLOCK_ENTRIES}
    for round_index in range(rounds + 1):
        for block in GROW_BLOCK_ENTRIES:
            begin = time.perf_counter()
            torch.ops.sparseapps.grow_select(None, dy, x, 2048, 2048, excluded, 40_000, 7, 1e-5, False, block)
            if round_index:
                times[block].append(time.perf_counter() - begin)
    return {b: statistics.median(t) for b, t in times.items()}


def save(result: Tuning) -> Path:
    """Adds ``result`` to the cache file (other machine kinds' entries are kept)."""
    data = _read_cache()
    data[result.library] = asdict(result)
    path = cache_file()
    write_json(path, data)
    return path


def apply_tuning() -> dict[str, Any]:
    """Configures the loaded library for this CPU: the cached entry, else a fresh measurement (saved), else the
    built-in defaults when ``SPARSEAPPS_TUNE=off`` or when the measurement fails (it never stops the caller).
    Returns ``{"source": "cache" | "measured" | "defaults", "tile_bytes": ..., "gather_max_batch": ...}``."""
    from sparseapps.core.kernels import library

    described = str(torch.ops.sparseapps.kernel_info())
    before = library._parse_info(described)
    entry = _read_cache().get(_key(str(before["isa"])))
    global _grow_block
    if isinstance(entry, dict) and {"tile_bytes", "gather_max_batch"} <= entry.keys():
        torch.ops.sparseapps._configure("", int(entry["gather_max_batch"]), int(entry["tile_bytes"]))
        _grow_block = int(entry.get("grow_block_entries", GROW_BLOCK_DEFAULT))
        return {
            "source": "cache",
            "tile_bytes": entry["tile_bytes"],
            "gather_max_batch": entry["gather_max_batch"],
            "measured_under_load": float(entry.get("cpu_share", 1.0)) < BUSY_SHARE,
        }
    if os.environ.get(TUNE_VARIABLE, "").lower() in {"off", "0", "no"}:
        return {"source": "defaults", "reason": f"{TUNE_VARIABLE}=off", "description": described}
    try:
        result = tune()
    except Exception as error:  # a failed measurement must not stop the user's run: the defaults
        torch.ops.sparseapps._configure("", int(before["gather_max_batch"]), int(before["tile_bytes"]))
        info = str(torch.ops.sparseapps.kernel_info())
        return {"source": "defaults", "reason": f"tuning failed: {error}", "description": info}
    _grow_block = result.grow_block_entries
    with contextlib.suppress(OSError):  # a read-only checkout: the measurement holds for this process
        save(result)
    return {
        "source": "measured",
        "tile_bytes": result.tile_bytes,
        "gather_max_batch": result.gather_max_batch,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m sparseapps.core.kernels.tuning``: measures, saves and prints the choice."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (medians kept)")
    args = parser.parse_args(argv)
    from sparseapps.core.kernels import library

    if not library.ensure_loaded().compiled:
        print("[tuning] the compiled kernels are not loaded: nothing to tune")
        return 1
    result = tune(rounds=args.rounds, verbose=True)
    path = save(result)
    # one line (the install script shows the last): the choice, and whether it was measured under load
    load = (
        f" (measured under load: this thread got {result.cpu_share:.0%} of a core; run this again on a quiet "
        "machine, between runs: other values change the kernels' summation order)"
        if result.cpu_share < BUSY_SHARE
        else ""
    )
    print(
        f"[tuning] {result.cpu} ({result.isa}): tile_bytes={result.tile_bytes >> 10}K "
        f"gather_max_batch={result.gather_max_batch} grow_block_entries={result.grow_block_entries >> 10}K "
        f"in {result.seconds:.1f} s -> {path}{load}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
