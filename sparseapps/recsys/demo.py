"""``make demo``'s recsys job: ML-100K, dense vs DSL at densities 0.5 / 0.2 / 0.1 for MF-BPR and LightGCN."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseapps.core.config import ConfigMismatchError
from sparseapps.core.io import claim_output, write_atomic, write_json
from sparseapps.core.validation import check_bool, check_int
from sparseapps.recsys.config import TrainConfig
from sparseapps.recsys.output import RESULTS
from sparseapps.recsys.plots import plot_recall_curve

DEMO_DENSITIES = (0.5, 0.2, 0.1)
DEMO_MODELS = ("mf", "lightgcn")


def demo_configs(seed: int = 0) -> list[TrainConfig]:
    """The runs of ``make demo``: dense vs DSL at densities 0.5 / 0.2 / 0.1, for MF-BPR and LightGCN."""
    configs = []
    for model in DEMO_MODELS:
        base = TrainConfig.tuned(model, dataset="ml-100k", seed=seed)
        configs.append(base.replace(method="dense"))
        configs.extend(base.replace(method="dsl", density=d) for d in DEMO_DENSITIES)
    return configs


def format_table(rows: Sequence[dict[str, Any]], k: int = 20) -> str:
    """A plain-text table of runs: test Recall@K, NDCG@K, ratio to the dense run of the same model, parameters,
    bytes and time."""
    header = (
        f"{'model':<9} {'method':<7} {'density':>7} {f'Recall@{k}':>9} {f'NDCG@{k}':>8} {'vs dense':>8} "
        f"{'params':>8} {'bytes':>9} {'bytes/dense':>11} {'s/epoch':>7} {'seconds':>7}"
    )
    lines = [header, "-" * len(header)]
    dense_recall: dict[str, float] = {}
    for row in rows:
        config = row["config"]
        recall = row["test"][f"recall@{k}"]
        if config["method"] == "dense":
            dense_recall[config["model"]] = recall
        ratio = recall / dense_recall[config["model"]] if config["model"] in dense_recall else float("nan")
        density = f"{config['density']:g}" if config["method"] != "dense" else "1"
        lines.append(
            f"{config['model']:<9} {config['method']:<7} {density:>7} {recall:>9.4f} "
            f"{row['test'][f'ndcg@{k}']:>8.4f} {ratio:>8.3f} {row['parameters']:>8d} {row['bytes']:>9d} "
            f"{row['bytes'] / row['dense_bytes']:>11.3f} {row['seconds_per_epoch']:>7.2f} {row['total_seconds']:>7.1f}"
        )
    return "\n".join(lines)


def _demo_job(job: tuple[dict[str, Any], str, bool]) -> dict[str, Any]:
    from sparseapps.recsys.train import train  # here, not above: train.py re-exports this module's names

    config_dict, folder, overwrite = job
    try:
        return train(
            TrainConfig.from_dict(config_dict),
            folder,
            resume=True,
            overwrite=overwrite,
            progress=False,
            threads=1,
        )
    except ConfigMismatchError as error:  # a run left by other settings (an older version's defaults)
        raise ConfigMismatchError(
            f"{error}. The demo reuses the finished runs in {Path(folder).parent}; that directory holds a run "
            "made with other settings: move it away, pass another --out, or pass --overwrite to replace it "
            "(nothing was overwritten)"
        ) from error


def demo_run_name(config: TrainConfig) -> str:
    """The folder of one demo run, e.g. ``mf-dense`` or ``lightgcn-dsl-0.2``."""
    name = f"{config.model}-{config.method}"
    return name if config.method == "dense" else f"{name}-{config.density:g}"


def run_demo(out: Path, *, workers: int = 2, overwrite: bool = False) -> list[dict[str, Any]]:
    """``make demo``'s recsys job: ML-100K, dense vs DSL at 0.5 / 0.2 / 0.1 for MF-BPR and LightGCN.

    Prints a table of test Recall@20, NDCG@20, parameters, bytes and time; writes ``out/results.json``,
    ``out/table.txt``, ``out/recall_vs_epoch_<model>.png`` and, per run, ``out/<run>/`` with its own results,
    checkpoint and plots (embedding size vs popularity among them). ``out`` and each run's folder are claimed
    (:func:`~sparseapps.core.io.claim_output`): runs found there are resumed (finished ones reused), and a
    directory holding anything else is refused unless ``overwrite``.

    Args:
        out: output directory.
        workers: runs trained at once, each in its own process on one thread.
        overwrite: replace what ``out`` and the run folders hold that is not this demo's (its summary files are
            rewritten; runs of the demo's settings are still resumed, and any other run folder is replaced).

    Raises:
        FileExistsError: ``out`` holds another tool's files (:class:`~sparseapps.core.io.OutputConflictError`).
        ValueError: a run folder holds a run of other settings (:class:`ConfigMismatchError`).
    """
    check_int("workers", workers, low=1)
    check_bool("overwrite", overwrite)
    out = Path(out)
    configs = demo_configs()
    names = [demo_run_name(config) for config in configs]
    claim_output(
        out,
        tool="recsys demo",
        settings={"runs": names},
        outputs=[RESULTS, "table.txt", *(f"recall_vs_epoch_{model}.png" for model in DEMO_MODELS)],
        overwrite=overwrite,
    )
    jobs = [
        (config.to_dict(), str(out / name), overwrite) for config, name in zip(configs, names, strict=True)
    ]
    print(f"recsys demo: {len(jobs)} runs on ML-100K, {workers} at a time", flush=True)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        rows = []
        for row in pool.imap(_demo_job, jobs):
            rows.append(row)
            config = row["config"]
            print(
                f"  {TrainConfig.from_dict(config).label()}: test recall@20 {row['test']['recall@20']:.4f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        pool.close()
        pool.join()
    table = format_table(rows)
    print(f"\nML-100K test split, model selected on validation Recall@20 (seed 0)\n{table}")
    write_json(out / RESULTS, {"rows": [{k: v for k, v in r.items() if k != "history"} for r in rows]})
    write_atomic(out / "table.txt", (table + "\n").encode())
    for model in DEMO_MODELS:
        plot_recall_curve(
            [r for r in rows if r["config"]["model"] == model],
            out / f"recall_vs_epoch_{model}.png",
            title=f"{model}: validation recall@20 per epoch (dotted: topology frozen)",
        )
    print(f"\nwrote {out / RESULTS}, {out / 'table.txt'} and plots under {out}")
    return rows
