"""Probe: where the resident memory of the ML-25M-scale recsys run goes, phase by phase, for one storage mode.

Issue 16 asks for a peak RSS <= 0.6x dense's at ML-25M scale. ``bench_recsys.py`` measures the peaks; this probe
splits a run of the same model (MF-BPR, batch 8,192, density 0.2, the same ``build_scale_model``) into what each
phase adds to the process's RSS, so the fixed costs every mode pays can be told apart from the tables' own:

1. ``imported``: torch, torchrec and the package imported;
2. ``data``: the synthetic ML-25M split generated and loaded (its peak is not training's);
3. ``built``: the scale model, its optimizer and (DSL) the engine (the first model also pays the first-use costs
   of torch's and torchrec's code, the same in every mode);
4. ``sampler``: the BPR sampler's first batch (the user -> items lists it searches and the epoch's permutation);
5. ``steps``: ``--steps`` training steps, topology updates included.

Each phase prints the RSS after it (and its two parts: anonymous memory, and pages of mapped files such as torch's
libraries) and the peak (``VmHWM``, reset at the start of the phase) within it; the peak
while training is the largest of the last three, as ``bench_recsys.py`` reports it. Run one mode per process (the
memory is the process's). glibc's allocator keeps freed chunks below its mmap threshold in
the heap; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment fixes the threshold, which shows how much of a
peak is freed memory the allocator kept.

    .venv/bin/python scripts/probe_recsys_memory.py dense --dim 256
    .venv/bin/python scripts/probe_recsys_memory.py "dsl compact" --dim 256
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python scripts/probe_recsys_memory.py "static compact" --dim 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recsys import SCALE_MODES, _memory_mb, _reset_peak_memory, build_scale_model

from sparseapps.core.io import write_json
from sparseapps.recsys.config import TrainConfig
from sparseapps.recsys.data import BPRSampler, DataConfig, load_split

TRAINING_PHASES = ("built", "sampler", "steps")


def run(
    mode: str, dataset: str, dim: int, steps: int, batch_size: int, phase: Callable[[str], None]
) -> tuple[Any, ...]:
    """Loads ``dataset``, builds ``mode``'s model and trains ``steps`` steps, calling ``phase(name)`` after each
    part; returns the split, model, optimizer and engine (alive until the caller drops them)."""
    split = load_split(DataConfig(dataset=dataset), progress=False)
    phase("data")
    base = TrainConfig.tuned("mf")
    model, optimizer, sparse = build_scale_model(
        mode, split, base, steps, dim=dim, density=0.2, update_interval=max(1, steps // 4)
    )
    phase("built")
    sampler = BPRSampler(split, batch_size=batch_size, seed=0)
    batches = itertools.chain.from_iterable(sampler.iter_epoch(epoch) for epoch in itertools.count())
    first = next(batches)
    phase("sampler")
    for step in range(steps):
        users, positives, negatives = first if step == 0 else next(batches)
        optimizer.zero_grad(set_to_none=True)
        model.loss(users, positives, negatives, reg_weight=base.reg_weight).backward()
        optimizer.step()
    phase("steps")
    return split, model, optimizer, sparse


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(SCALE_MODES))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="training steps (updates every steps / 4)")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--dataset", default="synthetic-ml-25m")
    parser.add_argument("--json", type=Path, help="also write the phases here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    phases: list[dict[str, Any]] = []

    def phase(name: str) -> None:
        row = {"phase": name, "rss_mb": _memory_mb("VmRSS"), "peak_mb": _memory_mb("VmHWM")}
        row |= {"anon_mb": _memory_mb("RssAnon"), "file_mb": _memory_mb("RssFile")}
        phases.append(row)
        print(
            f"{name:<10} RSS {row['rss_mb']:8,.0f} MB (anonymous {row['anon_mb']:6,.0f}, files "
            f"{row['file_mb']:5,.0f}), peak within {row['peak_mb']:8,.0f} MB"
        )
        _reset_peak_memory()

    phase("imported")
    *_, sparse = run(args.mode, args.dataset, args.dim, args.steps, args.batch_size, phase)
    result = {
        "mode": args.mode,
        "dim": args.dim,
        "steps": args.steps,
        "topology_updates": len(sparse.engine.history) if sparse is not None else 0,
        "phases": phases,
        "peak_training_mb": max(row["peak_mb"] for row in phases if row["phase"] in TRAINING_PHASES),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))
    if args.json is not None:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
