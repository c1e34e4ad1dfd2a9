"""Training MF-BPR, LightGCN and NeuMF, dense or with sparse embedding tables, on a MovieLens split.

One :class:`TrainConfig` describes a run; :func:`train` reads it top to bottom: load and split the data, build the
model and Adam, attach :class:`~sparseapps.recsys.dsl.SparseEmbeddings` (DSL, a static mask or pruning), then
epochs of BPR steps, each followed by a full-ranking evaluation on the validation split. The model is selected on
validation Recall@20 only, and only once the topology has settled (after the last drop/grow update, or after
pruning): an update with a large ζ briefly costs accuracy, and stopping there would select a half-rewired model.
Early stopping counts evaluations without improvement from that point on.

With an output directory, a run writes ``checkpoint.pt`` after every epoch (atomically), ``results.json``
(with the ITOP rate of drop/grow runs: the fraction of table entries ever active), ``compact.pt`` (the tables in
compact storage), ``recall_vs_epoch.png`` and ``embedding_size_vs_popularity.png``; ``resume=True`` continues from
the checkpoint and refuses one made with another configuration. The directory is claimed
(:func:`~sparseapps.core.io.claim_output`, ``sparseapps-run.json``): a run of other settings, another tool's run or
foreign files there are refused unless ``overwrite=True``, which removes only :data:`OUTPUTS`.

The parts live by job, and every name is importable from here: :class:`TrainConfig` (``config.py``), checkpoints
and the output directory (``output.py``), plots (``plots.py``) and the demo (``demo.py``).

``method="pep"`` first runs PEP's threshold search (:func:`~sparseapps.recsys.pep.search_masks`, its state in
``pep_search.pt``), then trains the tables rewound to step 0 under the mask it found, as a static mask.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseapps.core.io import save_torch, write_json
from sparseapps.core.options import torch_threads
from sparseapps.core.validation import check_int
from sparseapps.recsys.compact import CompactScorer, export_compact
from sparseapps.recsys.config import ENGINE_FIELDS, METHODS, MODEL_DEFAULTS, Method, TrainConfig
from sparseapps.recsys.data import BPRSampler, InteractionSplit, load_split
from sparseapps.recsys.demo import (
    DEMO_DENSITIES,
    DEMO_MODELS,
    demo_configs,
    demo_run_name,
    format_table,
    run_demo,
)
from sparseapps.recsys.dsl import SparseEmbeddings, make_compact
from sparseapps.recsys.metrics import evaluate_split
from sparseapps.recsys.models import build_model
from sparseapps.recsys.output import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    COMPACT,
    OUTPUTS,
    PEP_CHECKPOINT,
    RECALL_PLOT,
    RESULTS,
    SIZE_PLOT,
    SLOW_CHECKPOINT_VARIABLE,
    TOOL,
    OutputPlan,
    config_differences,
    load_checkpoint,
    plan_output,
    save_checkpoint,
)
from sparseapps.recsys.pep import search_masks
from sparseapps.recsys.plots import plot_recall_curve, plot_row_sizes

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_VERSION",
    "COMPACT",
    "DEMO_DENSITIES",
    "DEMO_MODELS",
    "ENGINE_FIELDS",
    "METHODS",
    "MODEL_DEFAULTS",
    "OUTPUTS",
    "PEP_CHECKPOINT",
    "RECALL_PLOT",
    "RESULTS",
    "SIZE_PLOT",
    "SLOW_CHECKPOINT_VARIABLE",
    "TOOL",
    "Method",
    "OutputPlan",
    "TrainConfig",
    "config_differences",
    "demo_configs",
    "demo_run_name",
    "format_table",
    "load_checkpoint",
    "make_optimizer",
    "plan_output",
    "plot_recall_curve",
    "plot_row_sizes",
    "run_demo",
    "save_checkpoint",
    "train",
    "write_json",
]


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters, fused (one kernel per tensor) where torch supports it.

    The fused kernel computes the same update as the default loop (to float32 rounding) and is faster here,
    most of all for masked tables: the default loop's vectorized ``sqrt`` is several times slower on the zeros
    that inactive entries keep in ``exp_avg_sq`` (measured: 2.3 ms vs 1.1 ms per MF step at density 0.2).
    """
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(model.parameters(), lr=lr)


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _seconds_summary(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def train(
    config: TrainConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split: InteractionSplit | None = None,
    stop_after: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Trains one model and returns its results (also written to ``out/results.json`` when ``out`` is given).

    Args:
        config: the run.
        out: output directory, or ``None`` to keep everything in memory.
        resume: continue the run in ``out`` from its checkpoint (a run of another configuration is refused); an
            empty or missing ``out`` simply starts.
        overwrite: replace whatever run ``out`` holds (another configuration, another tool's, foreign files):
            the files ``train`` writes there are removed first, other files are kept. With ``resume``, a run of
            the same configuration is continued and anything else replaced.
        progress: show a tqdm bar.
        split: an already loaded split of ``config``'s data (skips loading; must match ``config.seed``).
        stop_after: stop (as if interrupted) once this many epochs are done in total, leaving the checkpoint to
            resume from; the returned dict then has ``"finished": False``.
        threads: torch intra-op threads during the run (restored afterwards); ``None`` leaves them. The default
            is 1: the steps are many small ops, which lose far more to thread synchronization than they gain
            from a second thread, badly so on a busy machine (measured: 2 ms vs 120 ms per MF step).

    Returns:
        ``config``, ``valid`` and ``test`` metrics of the selected model, ``best_epoch``, ``parameters``,
        ``bytes`` (compact storage), ``dense_bytes``, ``seconds_per_epoch``, ``history`` and more.

    Raises:
        FileExistsError: ``out`` already holds a run and ``resume`` is False, or holds another tool's run or
            foreign files (:class:`~sparseapps.core.io.OutputConflictError`), and ``overwrite`` is False.
        ValueError: a run of another configuration in ``out`` (unless ``overwrite``), a damaged checkpoint, or a
            K above the number of items.
        DataNotFoundError: no local copy of the data and the download failed (a ``FileNotFoundError``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if threads is not None:
        check_int("threads", threads, low=1)
    with torch_threads(threads):
        return _train(
            config,
            out,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            split=split,
            stop_after=stop_after,
        )


def _train(
    config: TrainConfig,
    out: str | os.PathLike[str] | None,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    split: InteractionSplit | None,
    stop_after: int | None,
) -> dict[str, Any]:
    out_dir = Path(out) if out is not None else None
    plan = plan_output(out_dir, config, resume=resume, overwrite=overwrite) if out_dir is not None else None
    state = plan.checkpoint if plan is not None else None
    search_state = plan.search if plan is not None else None
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if split is None:
        split = load_split(config.data_config(), progress=progress)
    too_large = [k for k in config.ks if k > split.n_items]
    if too_large:
        raise ValueError(
            f"every K in ks must be at most the number of items ({split.n_items}), got {too_large}"
        )
    if plan is not None and out_dir is not None:
        plan.claim(out_dir)

    model = build_model(config.model_config(), split.n_users, split.n_items, split.train)
    sampler = BPRSampler(split, batch_size=config.batch_size, seed=config.seed)
    steps_per_epoch = len(sampler)
    total_steps = config.epochs * steps_per_epoch
    search = None
    if config.method == "pep":  # phase 1: the threshold search; its mask is the retrain's static mask

        def save_search(values: dict[str, Any]) -> None:
            assert out_dir is not None  # only passed with an output directory
            save_checkpoint(
                out_dir / PEP_CHECKPOINT,
                {"version": CHECKPOINT_VERSION, "config": config.to_dict(), **values},
            )

        def evaluate_valid() -> dict[str, float]:
            model.eval()
            return evaluate_split(model.scorer(), split, "valid", ks=config.ks)

        search = search_masks(
            model,
            make_optimizer(model, config.lr),
            BPRSampler(split, batch_size=config.batch_size, seed=config.seed),
            config.pep_config(),
            lr=config.lr,
            reg_weight=config.reg_weight,
            planned_steps=total_steps,
            state=search_state,
            save=save_search if out_dir is not None else None,
            stop_after=stop_after,
            evaluate=evaluate_valid,
            progress=progress,
            description=f"{config.model} pep {config.density:g} search",
        )
        if not search.done:
            return {"config": config.to_dict(), "finished": False, "epoch": search.epochs, "history": []}
        if stop_after is not None:
            stop_after -= search.epochs
    if config.storage == "compact":  # the tables become compact before the optimizer holds their values
        make_compact(
            model,
            config.dsl_config(),
            user_popularity=split.user_activity(),
            item_popularity=split.item_popularity(),
            initial_masks=search.masks if search is not None else None,
        )
    optimizer = make_optimizer(model, config.lr)
    sparse = None
    if config.method != "dense":
        sparse = SparseEmbeddings(
            model,
            optimizer,
            config.dsl_config(),
            total_steps,
            user_popularity=split.user_activity(),
            item_popularity=split.item_popularity(),
            initial_masks=search.masks if search is not None else None,
        )
    settle_step = sparse.settle_step if sparse is not None else 0
    settle_epoch = math.ceil(settle_step / steps_per_epoch)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "score": -math.inf, "model": None}
    bad_evals, epoch, train_seconds, finished = 0, 0, [], False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if sparse is not None:
            sparse.load_state_dict(state["sparse"])
        sampler.load_state_dict(state["sampler"])
        history, best, bad_evals = state["history"], state["best"], state["bad_evals"]
        epoch, train_seconds, finished = state["epoch"], state["train_seconds"], state["finished"]

    bar = tqdm(
        total=total_steps,
        initial=epoch * steps_per_epoch,
        disable=not progress,
        desc=f"{config.model} {config.method}" + (f" {config.density:g}" if sparse is not None else ""),
        unit="step",
        dynamic_ncols=True,
    )
    metric = config.selection_metric
    while not finished and epoch < config.epochs:
        if stop_after is not None and epoch >= stop_after:
            break
        model.train()
        tick, losses = time.perf_counter(), []
        for users, positives, negatives in sampler.iter_epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(users, positives, negatives, reg_weight=config.reg_weight)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update()
        train_seconds.append(time.perf_counter() - tick)
        epoch += 1
        sampler.set_epoch(epoch)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": statistics.fmean(losses),
            "seconds": train_seconds[-1],
            "density": sparse.density if sparse is not None else 1.0,
        }
        last = epoch == config.epochs
        if epoch % config.eval_every == 0 or last:
            model.eval()
            valid = evaluate_split(model.scorer(), split, "valid", ks=config.ks)
            entry["valid"] = valid
            if epoch * steps_per_epoch >= settle_step:
                if valid[metric] > best["score"]:
                    best = {"epoch": epoch, "score": valid[metric], "model": _copy_state(model)}
                    bad_evals = 0
                else:
                    bad_evals += 1
            bar.set_postfix(loss=f"{entry['loss']:.4f}", **{f"valid_{metric}": f"{valid[metric]:.4f}"})
        history.append(entry)
        finished = last or bad_evals >= config.patience
        if out_dir is not None:
            save_checkpoint(
                out_dir / CHECKPOINT,
                {
                    "version": CHECKPOINT_VERSION,
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparse": sparse.state_dict() if sparse is not None else None,
                    "sampler": sampler.state_dict(),
                    "history": history,
                    "best": best,
                    "bad_evals": bad_evals,
                    "train_seconds": train_seconds,
                    "finished": finished,
                },
            )
    bar.close()
    if not finished:
        return {"config": config.to_dict(), "finished": False, "epoch": epoch, "history": history}

    if best["model"] is not None:
        model.load_state_dict(best["model"])
    model.eval()
    valid = evaluate_split(model.scorer(), split, "valid", ks=config.ks)
    test = evaluate_split(model.scorer(), split, "test", ks=config.ks)
    compact = export_compact(model)
    serving = _serving_check(compact, model, split)
    if sparse is not None:
        user_sizes, item_sizes = sparse.row_sizes()
    else:
        user_sizes = torch.full((split.n_users,), config.dim)
        item_sizes = torch.full((split.n_items,), config.dim)
    dense_numel = (split.n_users + split.n_items) * config.dim
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "finished": True,
        "seed": config.seed,
        "data": split.summary(),
        "valid": valid,
        "test": test,
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "stopped_early": epoch < config.epochs,
        "selection": {"metric": metric, "settle_epoch": settle_epoch, "patience": config.patience},
        "parameters": compact.nnz if sparse is not None else dense_numel,
        "dense_parameters": dense_numel,
        "density": compact.nnz / dense_numel if sparse is not None else 1.0,
        "bytes": compact.nbytes if sparse is not None else 4 * dense_numel,
        "compact_bytes": compact.nbytes,
        "dense_bytes": 4 * dense_numel,
        "seconds_per_epoch": _seconds_summary(train_seconds),
        "step_ms": 1e3 * sum(train_seconds) / max(1, len(train_seconds) * steps_per_epoch),
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": sum(train_seconds),
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": _peak_rss_mb(),
        "topology_updates": len(sparse.engine.history) if sparse is not None else 0,
        "itop_rate": sparse.engine.report().itop_rate if sparse is not None else None,
        "row_sizes": {
            "users": _size_summary(user_sizes),
            "items": _size_summary(item_sizes),
        },
        "serving": serving,
        "history": history,
    }
    if search is not None:
        results["pep"] = search.summary
    if out_dir is not None:
        write_json(out_dir / RESULTS, results)
        save_torch(out_dir / COMPACT, compact.to_dict())
        plot_recall_curve([results], out_dir / RECALL_PLOT, metric=metric)
        plot_row_sizes(
            user_sizes.numpy(),
            item_sizes.numpy(),
            split.user_activity(),
            split.item_popularity(),
            out_dir / SIZE_PLOT,
            title=config.label(),
        )
    return results


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _size_summary(sizes: torch.Tensor) -> dict[str, float]:
    sizes = sizes.to(torch.float64)
    return {
        "mean": float(sizes.mean()),
        "min": float(sizes.min()),
        "median": float(sizes.median()),
        "max": float(sizes.max()),
        "zero_rows": int((sizes == 0).sum()),
    }


def _serving_check(compact: Any, model: Any, split: InteractionSplit) -> dict[str, float]:
    """Scores of the compact scorer against the masked dense model on up to 256 users."""
    scorer = CompactScorer(compact, split.train if compact.model == "lightgcn" else None)
    users = torch.arange(min(256, split.n_users))
    with torch.no_grad():
        difference = (scorer(users) - model.scorer()(users)).abs().max()
    return {"users_checked": len(users), "max_abs_difference": float(difference)}
