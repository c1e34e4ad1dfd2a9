"""Choosing a layer's form: a one-time measurement per shape (cached), or a cost model.

A *candidate* is a ready module (condensed, CSR or dense-active) together with the way it runs a batch
(the lane-blocked path or the row path for sparse forms). ``measure`` times every candidate on random
inputs of each planned batch size, interleaved and repeated, and keeps the fastest time (other processes on
the machine only ever add time, so the minimum is the steadiest estimate of a candidate's own cost); results
are cached per
(form, path, mask statistics, batch, threads, dtype, device), in memory and optionally in a JSON file, so
the 12 identical blocks of a transformer are measured once. ``cost_model`` estimates the same times from
bytes moved and multiply-adds with rates measured once on an AMD EPYC (Zen 4) core; it needs no timing
and is deterministic, but only ranks forms roughly.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseapps.core.io import write_atomic
from sparseapps.core.kernels.formats import MaskStats

# Rates of one core (AMD EPYC Zen 4, fp32), used by the cost model only.
_DENSE_GEMV_BYTES_PER_S = 70e9
_DENSE_GEMM_FLOPS = 80e9
_GATHER_NNZ_PER_S = 3e9
_BLOCKED_NNZ_PER_S = 9e9
_TILE_FLOPS = 60e9
_TRANSPOSE_BYTES_PER_S = 10e9
_CALL_SECONDS = 5e-6


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to run a layer: ``module`` in mode ``path`` (``"blocked"``, ``"rows"`` or ``"dense"``); the
    lane-blocked path runs on at most ``threads`` threads (0: torch's thread count)."""

    form: str
    path: str
    module: nn.Module
    threads: int = 0


def cost_seconds(form: str, path: str, stats: MaskStats, batch: int, threads: int) -> float:
    """Estimated seconds for one forward of ``batch`` rows (see module docstring for the constants)."""
    scale = 1.0 / max(1, threads)
    if path == "dense":
        rows, columns = max(stats.active_rows, 1), max(stats.active_columns, 1)
        if batch == 1:
            work = rows * columns * 4 / _DENSE_GEMV_BYTES_PER_S
        else:
            work = 2 * rows * columns * batch / _DENSE_GEMM_FLOPS
        return _CALL_SECONDS + work * scale
    stored = stats.active_rows * stats.max_fan_in if form == "padded" else stats.nnz
    if path == "blocked":
        return _CALL_SECONDS + stored * max(1.0, 0.6 * batch) / _BLOCKED_NNZ_PER_S * scale
    if batch == 1:
        return _CALL_SECONDS + stored / _GATHER_NNZ_PER_S * scale
    padded_batch = (batch + 15) // 16 * 16
    tile = 2 * stored * padded_batch / _TILE_FLOPS
    transposes = (stats.in_features + stats.out_features) * padded_batch * 4 / _TRANSPOSE_BYTES_PER_S
    return _CALL_SECONDS + (tile + transposes) * scale


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Planner:
    """Times candidates once per key and remembers the result.

    Args:
        method: ``"measure"`` or ``"cost_model"``.
        repeats: timed calls per candidate and batch size (the fastest is kept).
        cache_path: optional JSON file that keeps measurements across processes.

    Example:
        >>> planner = Planner(method="cost_model")
        >>> planner.method
        'cost_model'
    """

    def __init__(self, *, method: str = "measure", repeats: int = 7, cache_path: str | None = None) -> None:
        if method not in ("measure", "cost_model"):
            raise ValueError(f"expected method in ('measure', 'cost_model'), got {method!r}")
        if repeats < 1:
            raise ValueError(f"expected repeats >= 1, got {repeats}")
        self.method = method
        self.repeats = repeats
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, float] = {}
        if self.cache_path is not None and self.cache_path.exists():
            try:
                self._cache.update(
                    {str(k): float(v) for k, v in json.loads(self.cache_path.read_text()).items()}
                )
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read the plan cache {self.cache_path}: {error}") from error

    def _key(self, candidate: Candidate, stats: MaskStats, batch: int, extra: str) -> str:
        module = candidate.module
        tensor = next(itertools.chain(module.buffers(), module.parameters()), None)
        dtype = str(tensor.dtype) if tensor is not None else "none"
        device = str(tensor.device) if tensor is not None else "cpu"
        return (
            f"{candidate.form}/{candidate.path}/threads{candidate.threads}/in{stats.in_features}/out{stats.out_features}/"
            f"r{stats.active_rows}/c{stats.active_columns}/nnz{stats.nnz}/k{stats.min_fan_in}-{stats.max_fan_in}/"
            f"b{batch}/t{torch.get_num_threads()}/{dtype}/{device}/{extra}"
        )

    def choose(
        self,
        candidates: list[Candidate],
        stats: MaskStats,
        batch_sizes: tuple[int, ...],
        make_input: Callable[[int], torch.Tensor],
        *,
        extra: str = "",
    ) -> dict[int, Candidate]:
        """The fastest candidate for each batch size.

        Args:
            candidates: ways to run the layer; their modules must already be in the configuration the path
                names (``run`` switches the lane-blocked path on or off).
            stats: mask statistics (part of the cache key).
            batch_sizes: batch sizes to plan for.
            make_input: ``batch -> input tensor`` of the layer's dtype and device.
            extra: more text for the cache key (e.g. a convolution's spatial size).
        """
        threads = torch.get_num_threads()
        seconds: dict[tuple[int, int], float] = {}
        for batch in batch_sizes:
            pending: list[int] = []
            for index, candidate in enumerate(candidates):
                key = self._key(candidate, stats, batch, extra)
                if self.method == "cost_model":
                    used = min(candidate.threads or threads, threads)
                    seconds[(batch, index)] = cost_seconds(candidate.form, candidate.path, stats, batch, used)
                elif key in self._cache:
                    seconds[(batch, index)] = self._cache[key]
                else:
                    pending.append(index)
            if pending:
                measured = self._measure([candidates[i] for i in pending], make_input(batch))
                for index, value in zip(pending, measured, strict=True):
                    seconds[(batch, index)] = value
                    self._cache[self._key(candidates[index], stats, batch, extra)] = value
        self._save()
        return {
            batch: candidates[min(range(len(candidates)), key=lambda i, b=batch: seconds[(b, i)])]
            for batch in batch_sizes
        }

    def _measure(self, candidates: list[Candidate], x: torch.Tensor) -> list[float]:
        """Fastest seconds per candidate; candidates alternate inside each repeat so drift hits all alike."""
        times: list[list[float]] = [[] for _ in candidates]
        with torch.inference_mode():
            for candidate in candidates:
                run(candidate, x)
                run(candidate, x)
            for _ in range(self.repeats):
                for index, candidate in enumerate(candidates):
                    _synchronize(x.device)
                    start = time.perf_counter()
                    run(candidate, x)
                    _synchronize(x.device)
                    times[index].append(time.perf_counter() - start)
        return [min(t) for t in times]

    def _save(self) -> None:
        if self.cache_path is None:
            return
        write_atomic(self.cache_path, (json.dumps(self._cache, indent=1, sort_keys=True) + "\n").encode())


def run(candidate: Candidate, x: torch.Tensor) -> torch.Tensor:
    """Runs ``candidate`` on ``x`` in its path (the lane-blocked path only where the path says so)."""
    module = candidate.module
    if candidate.path in ("blocked", "rows") and hasattr(module, "blocked_max_batch"):
        saved = module.blocked_max_batch, module.blocked_threads
        module.blocked_max_batch = x.numel() // max(1, x.shape[-1]) if candidate.path == "blocked" else 0
        module.blocked_threads = candidate.threads
        try:
            return module(x)
        finally:
            module.blocked_max_batch, module.blocked_threads = saved
    return module(x)
