"""Benchmark of sparse embedding tables (DSL) against dense and sparse baselines, in one run.

Part 1, ML-100K (RecBole's protocol: every rating a positive, per-user random 80/10/10, full ranking), for MF-BPR
and LightGCN, each row over several seeds (mean ± std of the test metrics of the model selected on validation):

- dense at dim 64; dense at the reduced dims 13 and 16 (the parameters of density 0.2 and 0.25);
- a static random mask at 0.2; magnitude pruning after dense training, then fine-tuning, at 0.2; PEP at 0.2
  (learned per-row soft thresholds find a mask, then the tables rewound to step 0 are retrained under it);
- DSL at 0.5 / 0.25 / 0.2 / 0.1 (defaults: nested initial masks, momentum growth), each with its ITOP rate (the
  fraction of table entries ever active);
- MF only, at 0.2, the variants behind the defaults: DSL as published (random masks, current-batch gradient
  growth), random masks with momentum growth, prefix masks, nested masks with gradient growth, a static
  nested mask;
- NeuMF (GMF + MLP over one table per side, BPR): dense at dims 64 and 13, DSL at 0.5 and 0.2.

- the storage axis: DSL 0.2 with growth by gradient in masked and in compact storage, for MF-BPR, NeuMF and
  LightGCN (``--storage-only`` runs just these rows).

Part 2, step cost: dense vs DSL MF steps on ML-100K timed in the same process, interleaved.

Part 3, scale: MF-BPR on a synthetic MovieLens-25M-sized data set (162,541 users, 59,047 items, 25M
interactions, Zipf item popularity), dense vs DSL at 0.2 (momentum growth, the published gradient growth, and
gradient growth with compact tables), each in a fresh process: training samples/s (topology updates included),
each update step's time, bytes of the tables and their optimizer state, peak RSS while training (and above the
loaded data), and Recall@20 on a sample of validation users. ``--scale-dim 256`` runs a larger table, and
``--memory-cap-mb`` states a peak-RSS cap each mode is reported against.

Usage:
    .venv/bin/python scripts/bench_recsys.py --out runs/bench_recsys            # everything (hours on 2 cores)
    .venv/bin/python scripts/bench_recsys.py --quick --out runs/bench_quick     # minutes: a smoke run

Runs are cached under ``--out/runs/<name>/`` (each a ``sparseapps recsys train`` output directory), so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseapps.recsys.data import BPRSampler, DataConfig, UserItemLists, load_split
from sparseapps.recsys.dsl import SparseEmbeddings, make_compact
from sparseapps.recsys.metrics import evaluate_ranking
from sparseapps.recsys.models import ModelConfig, build_model
from sparseapps.recsys.train import (
    TrainConfig,
    make_optimizer,
    train,
    write_json,
)

RECBOLE_REFERENCE = {"dense 64": 0.3647, "dense 16": 0.3496, "dense 13": 0.3334}
SCALE_MODES: dict[str, dict[str, Any]] = {
    "dense": {},
    "dsl": {},
    "dsl gradient growth": {"grow": "gradient"},
    "dsl compact": {"grow": "gradient", "storage": "compact"},
    "static compact": {"method": "static", "storage": "compact"},
}
#: Part 1's storage comparison: masked vs compact DSL (growth by gradient, the criterion compact storage runs).
STORAGE_MODELS = ("mf", "neumf", "lightgcn")


def storage_rows(quick: bool) -> list[tuple[str, TrainConfig]]:
    """``(row name, config)`` of the masked-vs-compact rows: DSL 0.2 with gradient growth, per model."""
    rows = []
    for model in STORAGE_MODELS:
        base = TrainConfig.tuned(model, method="dsl", density=0.2, grow="gradient")
        if quick:
            base = base.replace(epochs=12, patience=3)
        rows += [
            (f"{model} dsl 0.2 gradient {storage}", base.replace(storage=storage))
            for storage in ("masked", "compact")
        ]
    return rows


def build_scale_model(
    mode: str, split: Any, base: TrainConfig, total_steps: int, *, dim: int = 64, **overrides: Any
) -> tuple[torch.nn.Module, torch.optim.Optimizer, SparseEmbeddings | None]:
    """MF-BPR of ``mode`` (a :data:`SCALE_MODES` key): the model, Adam and, for DSL modes, the sparse tables
    (compact ones converted before Adam is built, as ``train`` does)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="mf", dim=dim), split.n_users, split.n_items)
    if mode == "dense":
        return model, make_optimizer(model, base.lr), None
    settings = {"method": "dsl", "density": 0.2, "dim": dim, **SCALE_MODES[mode], **overrides}
    config = base.replace(**settings).dsl_config()
    popularity = dict(user_popularity=split.user_activity(), item_popularity=split.item_popularity())
    if config.storage == "compact":
        make_compact(model, config, **popularity)
    optimizer = make_optimizer(model, base.lr)
    return model, optimizer, SparseEmbeddings(model, optimizer, config, total_steps=total_steps, **popularity)


def table_state_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, sparse: SparseEmbeddings | None = None
) -> dict[str, int]:
    """Bytes of the embedding tables (values or dense weights, index buffers, masks) and of their optimizer state,
    the engine's per-table state (momentum averages, mask multipliers) counted with the tables."""
    tables = model.tables  # type: ignore[attr-defined]
    table_bytes = state_bytes = 0
    for module in tables.table_modules.values():
        for tensor in [*module.parameters(), *module.buffers()]:
            table_bytes += tensor.numel() * tensor.element_size()
        for param in module.parameters():
            state_bytes += sum(
                v.numel() * v.element_size()
                for v in optimizer.state.get(param, {}).values()
                if isinstance(v, torch.Tensor) and v.dim() > 0
            )
    if sparse is not None:
        engine = sparse.engine
        extra = [*engine.momentum.values(), *(engine._multiplier_cache or [])]
        table_bytes += sum(t.numel() * t.element_size() for t in extra)
    return {"tables": table_bytes, "optimizer_state": state_bytes, "total": table_bytes + state_bytes}


def table_rows(quick: bool) -> list[tuple[str, TrainConfig]]:
    """``(row name, config)`` for every row of part 1 (seed 0; other seeds replace it)."""
    rows: list[tuple[str, TrainConfig]] = []
    for model in ("mf", "lightgcn"):
        base = TrainConfig.tuned(model)
        if quick:
            base = base.replace(epochs=12, patience=3)
        rows.append((f"{model} dense 64", base.replace(method="dense")))
        if quick:
            rows.append((f"{model} dsl 0.2", base.replace(method="dsl", density=0.2)))
            continue
        rows += [
            (f"{model} dense 16", base.replace(method="dense", dim=16)),
            (f"{model} dense 13", base.replace(method="dense", dim=13)),
            (f"{model} static random 0.2", base.replace(method="static", density=0.2, init="random")),
            (f"{model} prune 0.2", base.replace(method="prune", density=0.2)),
            (f"{model} pep 0.2", base.replace(method="pep", density=0.2)),
        ]
        rows += [(f"{model} dsl {d:g}", base.replace(method="dsl", density=d)) for d in (0.5, 0.25, 0.2, 0.1)]
        if model == "mf":
            rows += [
                (
                    "mf dsl 0.2 published",
                    base.replace(method="dsl", density=0.2, init="random", grow="gradient"),
                ),
                ("mf dsl 0.2 random+momentum", base.replace(method="dsl", density=0.2, init="random")),
                ("mf dsl 0.2 prefix", base.replace(method="dsl", density=0.2, init="prefix")),
                ("mf dsl 0.2 nested+gradient", base.replace(method="dsl", density=0.2, grow="gradient")),
                ("mf static nested 0.2", base.replace(method="static", density=0.2)),
            ]
        else:
            rows.append(("lightgcn dsl 0.2 prefix", base.replace(method="dsl", density=0.2, init="prefix")))
        rows.append(
            (f"{model} dsl 0.2 rescale init", base.replace(method="dsl", density=0.2, rescale_init=True))
        )
    rows += storage_rows(quick)
    neumf = TrainConfig.tuned("neumf")
    if quick:
        neumf = neumf.replace(epochs=12, patience=3)
    rows.append(("neumf dense 64", neumf.replace(method="dense")))
    if not quick:
        rows += [
            ("neumf dense 13", neumf.replace(method="dense", dim=13)),
            ("neumf dsl 0.5", neumf.replace(method="dsl", density=0.5)),
        ]
    rows.append(("neumf dsl 0.2", neumf.replace(method="dsl", density=0.2)))
    return rows


def _run_one(job: tuple[str, dict[str, Any], str]) -> dict[str, Any]:
    name, config_dict, out = job
    config = TrainConfig.from_dict(config_dict)
    results = train(config, out, resume=True, progress=False, threads=1)
    return {
        "name": name,
        **{k: v for k, v in results.items() if k != "history"},
        "curve": [h["valid"]["recall@20"] for h in results["history"] if "valid" in h],
    }


def run_table(
    out: Path, seeds: int, workers: int, quick: bool, rows: list[tuple[str, TrainConfig]] | None = None
) -> list[dict[str, Any]]:
    jobs = []
    for name, config in table_rows(quick) if rows is None else rows:
        for seed in range(seeds):
            folder = out / "runs" / f"{name.replace(' ', '_').replace('+', '_')}-seed{seed}"
            jobs.append((name, config.replace(seed=seed).to_dict(), str(folder)))
    print(f"part 1: {len(jobs)} training runs on {workers} worker(s)", flush=True)
    results = []
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with context.Pool(workers) as pool:
        for index, result in enumerate(pool.imap_unordered(_run_one, jobs), start=1):
            results.append(result)
            print(
                f"  [{index}/{len(jobs)}] {result['name']} seed {result['seed']}: test recall@20 "
                f"{result['test']['recall@20']:.4f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        pool.close()
        pool.join()
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One row per name: mean ± std over seeds of the test metrics, plus size and time."""
    rows = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        row: dict[str, Any] = {"name": name, "seeds": len(runs)}
        for part in ("test", "valid"):
            for metric in ("recall@20", "ndcg@20"):
                row[f"{part} {metric}"] = _mean_std([r[part][metric] for r in runs])
        row["parameters"] = runs[0]["parameters"]
        row["bytes"] = runs[0]["bytes"]
        row["dense64_bytes"] = 4 * 64 * (runs[0]["data"]["n_users"] + runs[0]["data"]["n_items"])
        row["seconds_per_epoch"] = statistics.median(r["seconds_per_epoch"] for r in runs)
        row["step_ms"] = statistics.median(r["step_ms"] for r in runs)
        row["best_epoch"] = statistics.median(r["best_epoch"] for r in runs)
        row["serving_max_abs_difference"] = max(r["serving"]["max_abs_difference"] for r in runs)
        itop = [
            r["itop_rate"] for r in runs if r.get("itop_rate") is not None
        ]  # drop/grow runs (and not cached
        row["itop_rate"] = statistics.fmean(itop) if itop else None  # by a version that did not record it)
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | test Recall@20 | test NDCG@20 | Recall vs dense | NDCG vs dense | valid Recall@20 | parameters "
        "| bytes | bytes / dense-64 fp32 | ITOP rate | s/epoch | best epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["name"].split()[0]: r for r in rows if r["name"].endswith("dense 64")}
    for r in rows:
        reference = dense.get(r["name"].split()[0])
        ratio_recall = r["test recall@20"][0] / reference["test recall@20"][0] if reference else math.nan
        ratio_ndcg = r["test ndcg@20"][0] / reference["test ndcg@20"][0] if reference else math.nan
        itop = f"{r['itop_rate']:.3f}" if r.get("itop_rate") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['test recall@20'][0]:.4f} ± {r['test recall@20'][1]:.4f} "
            f"| {r['test ndcg@20'][0]:.4f} ± {r['test ndcg@20'][1]:.4f} | {ratio_recall:.3f} | {ratio_ndcg:.3f} "
            f"| {r['valid recall@20'][0]:.4f} | {r['parameters']:,} | {r['bytes']:,} "
            f"| {r['bytes'] / r['dense64_bytes']:.3f} | {itop} | {r['seconds_per_epoch']:.2f} | {r['best_epoch']:g} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Part 2: step cost


def time_steps(
    steps: int,
    rounds: int,
    *,
    dataset: str = "ml-100k",
    batch_size: int | None = None,
    threads: int = 1,
    modes: tuple[str, ...] = ("dense", "dsl"),
    update_interval: int | None = None,
) -> dict[str, Any]:
    """MF-BPR steps of each mode in the same process, interleaved rounds, update steps included.

    Per mode the median over rounds of the mean step time; ``ratio`` is that of the second mode to dense.
    """
    torch.set_num_threads(threads)
    split = load_split(DataConfig(dataset=dataset), progress=False)
    base = TrainConfig.tuned("mf")
    batch_size = batch_size or base.batch_size
    sampler = BPRSampler(split, batch_size=batch_size, seed=0)
    batches = list(itertools.islice(sampler.iter_epoch(0), steps))
    setups = {}
    for mode in modes:
        overrides = {} if update_interval is None else {"update_interval": update_interval}
        setups[mode] = build_scale_model(mode, split, base, 10 * steps * rounds, **overrides)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, (model, optimizer, _sparse) in setups.items():
            tick = time.perf_counter()
            for step in range(steps):
                users, positives, negatives = batches[step % len(batches)]
                optimizer.zero_grad(set_to_none=True)
                model.loss(users, positives, negatives, reg_weight=base.reg_weight).backward()
                optimizer.step()
            seconds[mode].append((time.perf_counter() - tick) / steps)
    step_ms = {mode: 1e3 * statistics.median(values) for mode, values in seconds.items()}
    return {
        "dataset": dataset,
        "batch_size": batch_size,
        "threads": threads,
        "steps_per_round": steps,
        "rounds": rounds,
        "step_ms": step_ms,
        "dense_step_ms": step_ms["dense"],
        "dsl_step_ms": step_ms[modes[1]],
        "ratio": step_ms[modes[1]] / step_ms["dense"],
        "ratios": {mode: ms / step_ms["dense"] for mode, ms in step_ms.items()},
        "topology_updates": {
            mode: len(sparse.engine.history) for mode, (_, _, sparse) in setups.items() if sparse is not None
        },
        "all_rounds_ms": {k: [1e3 * v for v in values] for k, values in seconds.items()},
        # the median of each round's own ratio: a slow phase of the machine hits both modes of a round alike
        "paired_ratios": {
            mode: statistics.median(a / b for a, b in zip(values, seconds["dense"], strict=True))
            for mode, values in seconds.items()
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Part 3: scale


def _memory_mb(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak_memory() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux ``clear_refs``), so the peak of one phase can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _scale_child(job: tuple[str, str, int, int, int, float, int, int]) -> dict[str, Any]:
    """One mode of the scale run in a fresh process (so its memory is its own)."""
    mode, dataset, steps, batch_size, eval_users, density, threads, dim = job
    torch.set_num_threads(threads)
    tick = time.perf_counter()
    split = load_split(DataConfig(dataset=dataset), progress=False)
    load_seconds = time.perf_counter() - tick
    peak_loading = _memory_mb("VmHWM")
    rss_before = _memory_mb("VmRSS")
    reset = _reset_peak_memory()
    base = TrainConfig.tuned("mf")
    model, optimizer, sparse = build_scale_model(
        mode, split, base, steps, dim=dim, density=density, update_interval=max(1, steps // 4)
    )
    rss_built = _memory_mb("VmRSS")
    peak_building = _memory_mb("VmHWM") if reset else math.nan
    reset = reset and _reset_peak_memory()
    peak_steps = math.nan  # the peak of the steps before the first topology update
    sampler = BPRSampler(split, batch_size=batch_size, seed=0)
    batches = itertools.chain.from_iterable(sampler.iter_epoch(epoch) for epoch in itertools.count())
    step_seconds, update_seconds = [], []
    for _ in range(steps):
        users, positives, negatives = next(batches)
        updates = len(sparse.engine.history) if sparse is not None else 0
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss(users, positives, negatives, reg_weight=base.reg_weight).backward()
        optimizer.step()
        seconds = time.perf_counter() - tick
        updated = sparse is not None and len(sparse.engine.history) > updates
        (update_seconds if updated else step_seconds).append(seconds)
        if reset and not update_seconds:
            peak_steps = _memory_mb("VmHWM")
    peak_training = max(_memory_mb("VmHWM"), peak_building) if reset else math.nan
    state = table_state_bytes(model, optimizer, sparse)
    rng = np.random.default_rng(0)
    sample = rng.choice(split.n_users, size=min(eval_users, split.n_users), replace=False)
    chosen = np.isin(split.valid[:, 0], sample)
    targets = UserItemLists.from_pairs(split.valid[chosen], n_users=split.n_users, n_items=split.n_items)
    model.eval()
    recall = evaluate_ranking(model.scorer(), targets, split.train_items, ks=(20,), metrics=("recall",))
    timed = step_seconds[min(5, len(step_seconds) - 1) :]  # the first steps warm up allocators
    return {
        "mode": mode,
        "dim": dim,
        "dataset": dataset,
        "n_users": split.n_users,
        "n_items": split.n_items,
        "n_train": len(split.train),
        "data_seconds": load_seconds,
        "steps": steps,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        # every step, topology updates included (what a run costs) ...
        "step_ms": 1e3 * statistics.fmean(timed + update_seconds),
        "samples_per_second": batch_size / statistics.fmean(timed + update_seconds),
        # ... and apart: the steps between updates, and each update step
        "plain_step_ms": 1e3 * statistics.fmean(timed),
        "update_step_ms": [1e3 * t for t in update_seconds],
        "table_bytes": state["tables"],
        "optimizer_state_bytes": state["optimizer_state"],
        "table_and_state_bytes": state["total"],
        "rss_after_building_mb": rss_built,
        "peak_rss_building_mb": peak_building,
        "peak_rss_steps_before_first_update_mb": peak_steps,
        "topology_updates": len(sparse.engine.history) if sparse is not None else 0,
        "density": sparse.density if sparse is not None else 1.0,
        "peak_rss_loading_mb": peak_loading,
        "rss_before_training_mb": rss_before,
        "peak_rss_training_mb": peak_training,
        "peak_rss_process_mb": max(peak_loading, peak_training),  # loading included: what a memory cap sees
        "training_memory_mb": peak_training - rss_before,
        "valid_recall@20_sampled_users": recall["recall@20"],
        "eval_users": int(recall["n_users"]),
    }


def run_scale(
    dataset: str,
    steps: int,
    batch_size: int,
    eval_users: int,
    threads: int,
    rounds: int = 1,
    *,
    modes: tuple[str, ...] = tuple(SCALE_MODES),
    dim: int = 64,
) -> list[dict[str, Any]]:
    """Each mode in a fresh process, the modes alternated over ``rounds``; per mode the median round's step time.

    On a shared machine the load changes between processes; alternating the modes and taking medians keeps
    it from deciding the ratio.
    """
    context = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_index in range(rounds):
        for mode in modes:
            with context.Pool(1) as pool:
                job = (mode, dataset, steps, batch_size, eval_users, 0.2, threads, dim)
                r = pool.apply(_scale_child, (job,))
                pool.close()
                pool.join()
            runs[mode].append(r)
            print(
                f"  round {round_index + 1}/{rounds} {mode}: {r['samples_per_second']:,.0f} samples/s "
                f"({r['step_ms']:.1f} ms/step, {r['threads']} thread(s)); peak RSS while training "
                f"{r['peak_rss_training_mb']:,.0f} MB, of which {r['training_memory_mb']:,.0f} MB above the "
                f"loaded data (building {r['peak_rss_building_mb']:,.0f} MB, steps before the first update "
                f"{r['peak_rss_steps_before_first_update_mb']:,.0f} MB); tables + optimizer state "
                f"{r['table_and_state_bytes'] / 2**20:,.1f} MiB; update "
                f"steps {', '.join(f'{t:.0f}' for t in r['update_step_ms'])} ms; sampled valid recall@20 "
                f"{r['valid_recall@20_sampled_users']:.4f}",
                flush=True,
            )
    rows = []
    for mode_runs in runs.values():
        step_ms = statistics.median(r["step_ms"] for r in mode_runs)
        row = dict(mode_runs[0])
        row.update(
            step_ms=step_ms,
            samples_per_second=batch_size / (step_ms / 1e3),
            step_ms_rounds=[r["step_ms"] for r in mode_runs],
            peak_rss_training_mb=max(r["peak_rss_training_mb"] for r in mode_runs),
            peak_rss_process_mb=max(r["peak_rss_process_mb"] for r in mode_runs),
            training_memory_mb=max(r["training_memory_mb"] for r in mode_runs),
            rounds=rounds,
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def goals(
    rows: list[dict[str, Any]],
    step: dict[str, Any] | None,
    scale: list[dict[str, Any]],
    scale_step: dict[str, Any] | None = None,
) -> list[str]:
    """The issue's goals, each with the measured numbers and whether it was met."""
    by_name = {r["name"]: r for r in rows}
    lines = []

    def ratio(name: str, reference: str, metric: str) -> float | None:
        if name in by_name and reference in by_name:
            return by_name[name][f"test {metric}"][0] / by_name[reference][f"test {metric}"][0]
        return None

    for model in ("mf", "lightgcn"):
        recall = ratio(f"{model} dsl 0.2", f"{model} dense 64", "recall@20")
        ndcg = ratio(f"{model} dsl 0.2", f"{model} dense 64", "ndcg@20")
        if recall is not None and ndcg is not None:
            met = recall >= 0.97 and ndcg >= 0.97
            lines.append(
                f"{model}: DSL 0.2 keeps >= 97% of dense Recall@20 and NDCG@20: {recall:.3f} / {ndcg:.3f} -> "
                f"{'met' if met else 'NOT met'}"
            )
    if "mf dsl 0.25" in by_name and "mf dense 16" in by_name:
        a, b = by_name["mf dsl 0.25"]["test recall@20"][0], by_name["mf dense 16"]["test recall@20"][0]
        lines.append(f"mf: DSL 0.25 ({a:.4f}) beats dense dim 16 ({b:.4f}): {'met' if a > b else 'NOT met'}")
    if "lightgcn dense 64" in by_name and "mf dense 64" in by_name:
        a, b = by_name["lightgcn dense 64"]["test recall@20"][0], by_name["mf dense 64"]["test recall@20"][0]
        lines.append(f"LightGCN dense ({a:.4f}) beats MF dense ({b:.4f}): {'met' if a > b else 'NOT met'}")
    recall = ratio("neumf dsl 0.2", "neumf dense 64", "recall@20")
    ndcg = ratio("neumf dsl 0.2", "neumf dense 64", "ndcg@20")
    if recall is not None and ndcg is not None:
        lines.append(
            f"neumf: DSL 0.2 keeps {recall:.3f} / {ndcg:.3f} of dense Recall@20 / NDCG@20 (reported)"
        )
    for model in ("mf", "lightgcn"):
        if f"{model} dsl 0.2" in by_name:
            r = by_name[f"{model} dsl 0.2"]
            fraction = r["bytes"] / r["dense64_bytes"]
            lines.append(
                f"{model}: exported tables at 0.2 take {fraction:.3f} of dense fp32 bytes (<= 0.30): "
                f"{'met' if fraction <= 0.30 else 'NOT met'}"
            )
    for model in STORAGE_MODELS:
        masked, compact = (
            by_name.get(f"{model} dsl 0.2 gradient masked"),
            by_name.get(f"{model} dsl 0.2 gradient compact"),
        )
        if masked is None or compact is None:
            continue
        gaps = [abs(compact[f"test {m}"][0] / masked[f"test {m}"][0] - 1.0) for m in ("recall@20", "ndcg@20")]
        lines.append(
            f"{model}: compact DSL 0.2 vs masked, test Recall@20 {compact['test recall@20'][0]:.4f} vs "
            f"{masked['test recall@20'][0]:.4f}, NDCG@20 {compact['test ndcg@20'][0]:.4f} vs "
            f"{masked['test ndcg@20'][0]:.4f} (within 1%): {'met' if max(gaps) <= 0.01 else 'NOT met'}"
        )
    if step is not None:
        lines.append(
            f"DSL step {step['dsl_step_ms']:.2f} ms vs dense {step['dense_step_ms']:.2f} ms on ML-100K = "
            f"{step['ratio']:.2f}x (<= 1.2x): {'met' if step['ratio'] <= 1.2 else 'NOT met'}"
        )
    if scale_step is not None:
        for mode, ratio_ in scale_step["ratios"].items():
            if mode != "dense":
                lines.append(
                    f"DSL step at scale ({scale_step['dataset']}, {mode}) = {ratio_:.2f}x dense (<= 1.2x, "
                    f"interleaved in one process): {'met' if ratio_ <= 1.2 else 'NOT met'}"
                )
    scale_by_mode = {r["mode"]: r for r in scale}
    dense, compact = scale_by_mode.get("dense"), scale_by_mode.get("dsl compact")
    if dense is not None and compact is not None:
        state = compact["table_and_state_bytes"] / dense["table_and_state_bytes"]
        peak = compact["peak_rss_training_mb"] / dense["peak_rss_training_mb"]
        speed = compact["samples_per_second"] / dense["samples_per_second"]
        update = max(compact["update_step_ms"], default=math.nan) / dense["plain_step_ms"]
        lines += [
            f"compact at scale: tables + optimizer state {state:.3f}x dense (<= 0.3x): "
            f"{'met' if state <= 0.3 else 'NOT met'}",
            f"compact at scale: peak RSS while training {peak:.3f}x dense, data included (<= 0.6x): "
            f"{'met' if peak <= 0.6 else 'NOT met'}",
            f"compact at scale: {speed:.2f}x dense samples/s, updates included (>= 1.0x): "
            f"{'met' if speed >= 1.0 else 'NOT met'}",
            f"compact at scale: slowest topology update = {update:.1f} dense steps (<= 5): "
            f"{'met' if update <= 5 else 'NOT met'}",
        ]
    if scale:
        for r in scale:
            lines.append(
                f"scale ({r['dataset']}) {r['mode']}: {r['samples_per_second']:,.0f} samples/s "
                f"(own process, median of {r['rounds']} alternated round(s)), peak RSS while training "
                f"{r['peak_rss_training_mb']:,.0f} MB (+{r['training_memory_mb']:,.0f} MB over the data)"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_recsys"), help="output directory")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row")
    parser.add_argument("--workers", type=int, default=2, help="training runs in parallel (one thread each)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: one seed, few epochs, smaller scale run"
    )
    parser.add_argument("--skip-table", action="store_true", help="skip part 1")
    parser.add_argument("--skip-scale", action="store_true", help="skip part 3")
    parser.add_argument("--scale-steps", type=int, default=300, help="training steps per mode in part 3")
    parser.add_argument("--scale-batch", type=int, default=8192, help="batch size in part 3")
    parser.add_argument("--scale-threads", type=int, default=2, help="torch threads in part 3")
    parser.add_argument(
        "--scale-rounds",
        type=int,
        default=1,
        help="part 3: fresh-process runs of each mode, alternated (medians)",
    )
    parser.add_argument("--skip-steps", action="store_true", help="skip part 2")
    parser.add_argument(
        "--skip-scale-runs", action="store_true", help="part 3: skip the fresh-process runs, keep part 3b"
    )
    parser.add_argument(
        "--scale-step-rounds", type=int, default=3, help="part 3b: interleaved rounds per mode (medians)"
    )
    parser.add_argument("--skip-scale-step-time", action="store_true", help="part 3: skip part 3b")
    parser.add_argument("--scale-step-steps", type=int, default=200, help="part 3b: steps per round")
    parser.add_argument(
        "--storage-only",
        action="store_true",
        help="part 1: only the masked-vs-compact rows (DSL 0.2, gradient)",
    )
    parser.add_argument(
        "--scale-modes",
        default="dense,dsl,dsl gradient growth,dsl compact",
        help=f"part 3: comma-separated modes of {', '.join(SCALE_MODES)}",
    )
    parser.add_argument("--scale-dim", type=int, default=64, help="part 3: embedding dimension D")
    parser.add_argument(
        "--memory-cap-mb",
        type=float,
        default=None,
        help="part 3: a stated peak-RSS cap; each mode's peak while training is reported against it",
    )
    args = parser.parse_args(argv)
    scale_modes = tuple(mode.strip() for mode in args.scale_modes.split(",") if mode.strip())
    unknown = [mode for mode in scale_modes if mode not in SCALE_MODES]
    if unknown or not scale_modes:
        print(
            f"error: --scale-modes must name modes of {', '.join(SCALE_MODES)}, got {args.scale_modes!r}",
            file=sys.stderr,
        )
        return 2
    counts = (args.seeds, args.workers, args.scale_steps, args.scale_rounds)
    if min(*counts, args.scale_step_rounds, args.scale_step_steps) < 1:
        print(
            "error: --seeds, --workers, --scale-steps, --scale-rounds, --scale-step-rounds and "
            "--scale-step-steps must be >= 1",
            file=sys.stderr,
        )
        return 2
    seeds = 1 if args.quick else args.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seeds": seeds, "quick": args.quick, "recbole_reference": RECBOLE_REFERENCE}

    rows: list[dict[str, Any]] = []
    if not args.skip_table:
        chosen = storage_rows(args.quick) if args.storage_only else table_rows(args.quick)
        results = run_table(args.out, seeds, args.workers, args.quick, chosen)
        names = [name for name, _ in chosen]
        rows = summarize(results, names)
        report["table"] = rows
        report["runs"] = results
        text = format_rows(rows)
        print(
            f"\nML-100K, test metrics of the model selected on validation, mean ± std over {seeds} seed(s)\n"
        )
        print(text)
        (args.out / "table.md").write_text(text + "\n")

    step = None
    if not args.skip_steps:
        print("\npart 2: dense vs DSL step time (MF-BPR, ML-100K, 1 thread, interleaved)", flush=True)
        step = time_steps(steps=100 if args.quick else 400, rounds=3 if args.quick else 7)
        print(
            f"  dense {step['dense_step_ms']:.2f} ms, DSL {step['dsl_step_ms']:.2f} ms: {step['ratio']:.2f}x "
            f"(medians of {step['rounds']} interleaved rounds)"
        )
        report["step_time"] = step

    scale: list[dict[str, Any]] = []
    if not args.skip_scale:
        dataset = "synthetic-ml-1m" if args.quick else "synthetic-ml-25m"
        steps = 20 if args.quick else args.scale_steps
        if not args.skip_scale_runs:
            print(
                f"\npart 3: scale run on {dataset}, {steps} steps of {args.scale_batch} per mode", flush=True
            )
            scale = run_scale(
                dataset,
                steps,
                args.scale_batch,
                eval_users=2000,
                threads=args.scale_threads,
                rounds=1 if args.quick else args.scale_rounds,
                modes=scale_modes,
                dim=args.scale_dim,
            )
            report["scale"] = scale
            if args.memory_cap_mb is not None:
                report["memory_cap_mb"] = args.memory_cap_mb
                for r in scale:
                    fits = r["peak_rss_process_mb"] <= args.memory_cap_mb
                    print(
                        f"  cap {args.memory_cap_mb:,.0f} MB: {r['mode']} (D = {r['dim']}) peaked at "
                        f"{r['peak_rss_process_mb']:,.0f} MB, loading included (training "
                        f"{r['peak_rss_training_mb']:,.0f}) -> {'fits' if fits else 'does NOT fit'}"
                    )
        if not args.skip_scale_step_time:
            print(f"\npart 3b: step time on {dataset}, the modes in one process, interleaved", flush=True)
            scale_step = time_steps(
                steps=10 if args.quick else args.scale_step_steps,
                rounds=3 if args.quick else args.scale_step_rounds,
                dataset=dataset,
                batch_size=args.scale_batch,
                threads=args.scale_threads,
                modes=("dense", *(mode for mode in scale_modes if mode != "dense")),
                update_interval=5 if args.quick else None,  # the default interval (200 steps)
            )
            for mode, ms in scale_step["step_ms"].items():
                rounds_ms = " ".join(f"{v:.0f}" for v in scale_step["all_rounds_ms"][mode])
                print(
                    f"  {mode}: {ms:.1f} ms/step ({scale_step['ratios'][mode]:.2f}x dense, median of per-round "
                    f"ratios {scale_step['paired_ratios'][mode]:.2f}x); rounds: {rounds_ms} ms"
                )
            report["scale_step_time"] = scale_step

    report["goals"] = goals(rows, step, scale, report.get("scale_step_time"))
    print("\ngoals:")
    for line in report["goals"]:
        print(f"  {line}")
    write_json(args.out / "results.json", report)
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
