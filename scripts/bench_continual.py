"""Per-task isolated sparse subnetworks against Avalanche's Naive, EWC, LwF and PackNet, in one run.

Part 1 (comparison), on Split-Digits (5 tasks x 2 classes) and Permuted-Digits (10 tasks x 10 classes), for each
seed, every method runs through the same Avalanche loop (``train_and_evaluate``: train an experience, evaluate
every task seen so far) with the same MLP shape, optimizer (Adam), epochs and batch size:

- ``ours``: ``IsolatedMLP`` + ``SparseIsolationPlugin`` at sparsity ``1 - 1/T`` per task (the network shared
  equally, as PackNet shares it), strict isolation; ``ours+transfer``: the same with forward transfer.
- ``naive``, ``ewc`` (lambda 100, untuned), ``lwf`` (alpha 1, temperature 2: Avalanche's defaults): a dense
  backbone shared by all tasks with a head per task (``DenseMultiHeadMLP``).
- ``packnet``: Avalanche's ``PackNet`` on the same dense MLP with one shared head (``PackNetModel``), each task
  keeping an equal share (prune ``1 - 1/(T - k)`` of the free weights after task ``k``'s first
  ``epochs - post_prune_epochs`` epochs).
- ``dense-per-task``: an independent dense MLP per task, its width chosen so that all of them together hold at
  most the parameters of ``ours``' network ("one dense model per task with the same total parameters").

Reported: ACC (mean final accuracy over tasks), BWT, and the median training seconds per task; ours' time as a
ratio to Naive's on the same stream and seed (the same loop; Naive trains a dense model of the same shape).

Part 2 (sweep): ERK vs uniform at 80 / 90 / 95% sparsity per task (``--sweep-sparsities``) x grow criterion
random / unfired / gradient / momentum (``--sweep-grow``), on both streams, in two regimes:

- ``strict``: strict isolation with ``capacity='redistribute'`` (a layer gives a task at most its fair share of
  the free weights, the surplus goes to the other layers). When ``n_tasks`` targets exceed the network (80% with
  5 tasks and ERK, 80-90% with 10 tasks) every task ends up with about ``1/T`` of each layer, ERK or not.
- ``reuse``: ``capacity='free'`` with forward transfer, the closest to Yildirim et al.'s code: each task takes
  ``density_l`` of the free weights of layer ``l`` (ERK / uniform profile) and reads earlier tasks' frozen ones.

The sweep also runs on Split-MNIST-1D (5 tasks x 2 classes) and Permuted-MNIST-1D (10 tasks x 10 classes)
(``--sweep-streams``; MNIST-1D generated offline and cached, see ``make_benchmark``), with the same MLP on the
flattened 40-point signals. Its table gives ERK - uniform paired by seed: the mean and a 95% t interval.

Part 3 (time): Naive and ours interleaved on the first three Permuted-Digits tasks, median seconds per task.

    .venv/bin/python scripts/bench_continual.py --quick     # one seed, two epochs, a small sweep (a few minutes)
    .venv/bin/python scripts/bench_continual.py             # 3 seeds, the full sweep (about an hour on 2 cores)

Writes ``--out``/results.json with every run (accuracy matrices included; ours with its ITOP rate, the share of
the isolated weights ever active).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from avalanche.models.packnet import PackNetModel
from avalanche.training import EWC, LwF, Naive, PackNet
from torch import nn

from sparseapps.continual.benchmarks import Benchmark, make_benchmark
from sparseapps.continual.config import IsolationConfig
from sparseapps.continual.loop import train_and_evaluate
from sparseapps.continual.models import (
    DenseMultiHeadMLP,
    DensePerTaskMLP,
    IsolatedMLP,
    count_parameters,
    dense_mlp,
    mlp_width_for_parameters,
)
from sparseapps.continual.plugin import SparseIsolationPlugin, continual_evaluator
from sparseapps.core import SparsityConfig
from sparseapps.core.io import write_json
from sparseapps.core.stats import paired_interval

METHODS = ("ours", "ours+transfer", "naive", "ewc", "lwf", "packnet", "dense-per-task")
STREAMS = ("split-digits", "permuted-digits")
SWEEP_STREAMS = (*STREAMS, "split-mnist1d", "permuted-mnist1d")
SWEEP_SPARSITIES = (0.8, 0.9, 0.95)
SWEEP_GROW = ("random", "unfired", "gradient", "momentum")
SWEEP_DISTRIBUTIONS = ("erk", "uniform")
SWEEP_REGIMES: dict[str, dict[str, Any]] = {
    # strict separation; a layer gives each task at most its fair share of what is free, the surplus moves
    "strict": {"capacity": "redistribute", "forward_transfer": False},
    # closest to Yildirim et al.'s code: new weights at the density of the free capacity, earlier tasks reused
    "reuse": {"capacity": "free", "forward_transfer": True},
}


@dataclass(frozen=True, kw_only=True)
class Setting:
    """What every method of one stream shares."""

    stream: str
    epochs: int
    hidden: tuple[int, ...]
    batch_size: int = 32
    lr: float = 1e-3


def update_interval(benchmark: Benchmark, setting: Setting) -> int:
    """About six topology updates per task: an eighth of its steps (updates stop at 75% of them)."""
    steps = setting.epochs * math.ceil(len(benchmark.train_stream[0].dataset) / setting.batch_size)
    return max(1, steps // 8)


def isolation_config(
    sparsity: float, distribution: str, grow: str, interval: int, seed: int, **isolation: Any
) -> IsolationConfig:
    """Ours' configuration: the core's SparsityConfig for each task, plus the capacity regime."""
    core = SparsityConfig(
        sparsity=sparsity, distribution=distribution, grow=grow, update_interval=interval, seed=seed
    )
    return IsolationConfig(sparsity=core, **isolation)


def _optimizer(model: nn.Module, setting: Setting) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=setting.lr)


def _common(setting: Setting) -> dict[str, Any]:
    return dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=setting.batch_size,
        train_epochs=setting.epochs,
        eval_mb_size=512,
        device="cpu",
        evaluator=continual_evaluator(),
    )


def isolated_model(benchmark: Benchmark, setting: Setting) -> IsolatedMLP:
    return IsolatedMLP(
        input_shape=benchmark.input_shape,
        n_outputs=benchmark.n_outputs,
        n_tasks=benchmark.n_tasks,
        hidden=setting.hidden,
    )


def build(
    method: str, benchmark: Benchmark, setting: Setting, seed: int, isolation: IsolationConfig | None = None
) -> tuple[Any, nn.Module, SparseIsolationPlugin | None]:
    """The strategy of ``method`` (and its model, and the plugin for ours)."""
    torch.manual_seed(seed)
    n_tasks, shape, n_outputs = benchmark.n_tasks, benchmark.input_shape, benchmark.n_outputs
    if method in ("ours", "ours+transfer"):
        config = isolation or isolation_config(
            1.0 - 1.0 / n_tasks,
            "uniform",
            "random",
            update_interval(benchmark, setting),
            seed,
            forward_transfer=method == "ours+transfer",
        )
        model: nn.Module = isolated_model(benchmark, setting)
        plugin = SparseIsolationPlugin(config, n_tasks=n_tasks)
        strategy = Naive(
            model=model, optimizer=_optimizer(model, setting), plugins=[plugin], **_common(setting)
        )
        return strategy, model, plugin
    if method in ("naive", "ewc", "lwf"):
        model = DenseMultiHeadMLP(
            input_shape=shape, n_outputs=n_outputs, n_tasks=n_tasks, hidden=setting.hidden
        )
        optimizer = _optimizer(model, setting)
        if method == "naive":
            return Naive(model=model, optimizer=optimizer, **_common(setting)), model, None
        if method == "ewc":
            return EWC(model=model, optimizer=optimizer, ewc_lambda=100.0, **_common(setting)), model, None
        return (
            LwF(model=model, optimizer=optimizer, alpha=1.0, temperature=2.0, **_common(setting)),
            model,
            None,
        )
    if method == "packnet":
        model = PackNetModel(dense_mlp(shape, n_outputs, setting.hidden))
        strategy = PackNet(
            model=model,
            optimizer=_optimizer(model, setting),
            post_prune_epochs=max(1, setting.epochs // 4),
            prune_proportion=lambda k: 1.0 - 1.0 / (n_tasks - k),  # type: ignore[arg-type]
            **_common(setting),
        )
        return strategy, model, None
    if method == "dense-per-task":
        budget = count_parameters(isolated_model(benchmark, setting))
        width = mlp_width_for_parameters(
            budget,
            n_inputs=int(torch.tensor(shape).prod()),
            n_outputs=n_outputs,
            n_hidden_layers=len(setting.hidden),
            n_networks=n_tasks,
        )
        hidden = (width,) * len(setting.hidden)
        torch.manual_seed(seed)
        model = DensePerTaskMLP(input_shape=shape, n_outputs=n_outputs, n_tasks=n_tasks, hidden=hidden)
        return Naive(model=model, optimizer=_optimizer(model, setting), **_common(setting)), model, None
    raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


def run_one(
    method: str, benchmark: Benchmark, setting: Setting, seed: int, isolation: IsolationConfig | None = None
) -> dict[str, Any]:
    strategy, model, plugin = build(method, benchmark, setting, seed, isolation)
    result = train_and_evaluate(strategy, benchmark, progress=False)
    row: dict[str, Any] = {
        "method": method,
        "stream": setting.stream,
        "seed": seed,
        "acc": result["acc"],
        "bwt": result["bwt"],
        "bwt_exact_zero": result["bwt_exact_zero"],
        "avalanche": result["avalanche"],
        "seconds_per_task": statistics.median(result["train_seconds"]),
        "train_seconds": result["train_seconds"],
        "parameters": count_parameters(model),
        "accuracy_matrix": result["accuracy_matrix"],
    }
    if plugin is not None and plugin.isolation is not None:
        capacity = plugin.isolation.capacity()
        row["capacity_fraction_per_task"] = [t["fraction"] for t in capacity["tasks"]]
        row["target_weights_per_task"] = sum(capacity["target"].values())
        row["weights_per_task"] = [t["weights"] for t in capacity["tasks"]]
        row["itop"] = plugin.isolation.itop()
    return row


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(rows: list[dict[str, Any]], streams: list[str], methods: list[str]) -> list[dict[str, Any]]:
    summary = []
    for stream in streams:
        for method in methods:
            runs = [r for r in rows if r["stream"] == stream and r["method"] == method]
            if not runs:
                continue
            naive = {r["seed"]: r for r in rows if r["stream"] == stream and r["method"] == "naive"}
            ratios = [
                r["seconds_per_task"] / naive[r["seed"]]["seconds_per_task"]
                for r in runs
                if r["seed"] in naive
            ]
            summary.append(
                {
                    "stream": stream,
                    "method": method,
                    "acc": [r["acc"] for r in runs],
                    "bwt": [r["bwt"] for r in runs],
                    "bwt_exact_zero": all(r["bwt_exact_zero"] for r in runs),
                    "seconds_per_task": statistics.median(r["seconds_per_task"] for r in runs),
                    "time_vs_naive": statistics.median(ratios) if ratios else None,
                    "parameters": runs[0]["parameters"],
                }
            )
    return summary


def format_summary(summary: list[dict[str, Any]]) -> str:
    lines = [
        f"{'stream':<16} {'method':<15} {'ACC':>17} {'BWT':>17} {'BWT==0':>6} {'s/task':>7} {'vs naive':>8} "
        f"{'params':>8}"
    ]
    for s in summary:
        ratio = f"{s['time_vs_naive']:.2f}" if s["time_vs_naive"] is not None else "-"
        lines.append(
            f"{s['stream']:<16} {s['method']:<15} {_mean_std(s['acc']):>17} {_mean_std(s['bwt']):>17} "
            f"{'yes' if s['bwt_exact_zero'] else 'no':>6} {s['seconds_per_task']:>7.2f} {ratio:>8} "
            f"{s['parameters']:>8}"
        )
    return "\n".join(lines)


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """One line per (stream, regime, sparsity, grow): both ACCs, and ERK - uniform paired by seed with its 95%
    t interval (over the seeds both distributions ran)."""
    lines = [
        f"{'stream':<16} {'regime':<7} {'sparsity':>8} {'grow':<9} {'ERK ACC':>17} {'uniform ACC':>17} "
        f"{'ERK - uniform':>13} {'95% CI':>19}"
    ]
    groups = sorted({(r["stream"], r["regime"], r["sparsity"], r["grow"]) for r in rows})
    for stream, regime, sparsity, grow in groups:
        cell = {
            dist: {
                r["seed"]: r["acc"]
                for r in rows
                if (r["stream"], r["regime"], r["sparsity"], r["grow"], r["distribution"])
                == (stream, regime, sparsity, grow, dist)
            }
            for dist in SWEEP_DISTRIBUTIONS
        }
        seeds = sorted(cell["erk"].keys() & cell["uniform"].keys())
        if not seeds:
            continue
        differences = [cell["erk"][seed] - cell["uniform"][seed] for seed in seeds]
        interval = paired_interval(differences)
        shown = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval is not None else "-"
        lines.append(
            f"{stream:<16} {regime:<7} {sparsity:>8.2f} {grow:<9} "
            f"{_mean_std([cell['erk'][seed] for seed in seeds]):>17} "
            f"{_mean_std([cell['uniform'][seed] for seed in seeds]):>17} "
            f"{statistics.fmean(differences):>+13.4f} {shown:>19}"
        )
    return "\n".join(lines)


def time_against_naive(stream: str, epochs: int, hidden: tuple[int, ...], *, rounds: int) -> dict[str, Any]:
    """Training seconds per task of Naive and ours, interleaved (naive, ours, ours, naive, ...) so that noise
    from other processes lands on both; medians over ``rounds`` x 3 tasks."""
    benchmark = make_benchmark(stream, n_tasks=3, seed=0)
    setting = Setting(stream=stream, epochs=epochs, hidden=hidden)
    seconds: dict[str, list[float]] = {"naive": [], "ours": []}
    for index in range(rounds):
        order = ("naive", "ours") if index % 2 == 0 else ("ours", "naive")
        for method in order:
            config = isolation_config(0.9, "uniform", "gradient", update_interval(benchmark, setting), index)
            strategy, _, _ = build(method, benchmark, setting, index, config if method == "ours" else None)
            for experience in benchmark.train_stream:
                start = time.perf_counter()
                strategy.train(experience, eval_streams=[])
                seconds[method].append(time.perf_counter() - start)
    naive, ours = statistics.median(seconds["naive"]), statistics.median(seconds["ours"])
    return {
        "rounds": rounds,
        "tasks": 3,
        "naive": naive,
        "ours": ours,
        "ratio": ours / naive,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs, a reduced sweep")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method and stream")
    parser.add_argument("--epochs-split", type=int, default=10, help="epochs per task on Split-Digits")
    parser.add_argument("--epochs-permuted", type=int, default=5, help="epochs per task on Permuted-Digits")
    parser.add_argument(
        "--epochs-split-mnist1d", type=int, default=10, help="epochs per task on Split-MNIST-1D (sweep only)"
    )
    parser.add_argument(
        "--epochs-permuted-mnist1d",
        type=int,
        default=5,
        help="epochs per task on Permuted-MNIST-1D (sweep only)",
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="MLP hidden widths")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=STREAMS, help="streams")
    parser.add_argument("--no-compare", action="store_true", help="skip part 1 (the comparison)")
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip part 2 (the ERK / uniform x growth sweep)"
    )
    parser.add_argument("--sweep-seeds", type=int, help="seeds of the sweep (default: --seeds)")
    parser.add_argument(
        "--sweep-streams",
        nargs="+",
        default=list(STREAMS),
        choices=SWEEP_STREAMS,
        help="streams of the sweep",
    )
    parser.add_argument(
        "--sweep-sparsities",
        type=float,
        nargs="+",
        help=f"sparsities per task of the sweep, in (0, 1) (default {SWEEP_SPARSITIES}; --quick: 0.8 0.95)",
    )
    parser.add_argument(
        "--sweep-grow", nargs="+", choices=SWEEP_GROW, help="grow criteria of the sweep (default: all four)"
    )
    parser.add_argument(
        "--sweep-regimes", nargs="+", default=list(SWEEP_REGIMES), choices=SWEEP_REGIMES, help="sweep regimes"
    )
    parser.add_argument("--timing-rounds", type=int, default=6, help="interleaved Naive / ours timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_continual"), help="output folder")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    bad_sparsities = [s for s in args.sweep_sparsities or () if not 0.0 < s < 1.0]
    if bad_sparsities:
        print(f"error: --sweep-sparsities must lie in (0, 1), got {bad_sparsities}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    # the capacity each task got is recorded per run (weights_per_task); the policy's notice is not needed
    warnings.filterwarnings("ignore", message="capacity='redistribute'", category=UserWarning)
    seeds = 1 if args.quick else args.seeds
    sweep_seeds = 1 if args.quick else (args.sweep_seeds or args.seeds)
    epochs = {
        "split-digits": args.epochs_split,
        "permuted-digits": args.epochs_permuted,
        "split-mnist1d": args.epochs_split_mnist1d,
        "permuted-mnist1d": args.epochs_permuted_mnist1d,
    }
    if args.quick:
        epochs = {stream: 2 for stream in epochs}
    hidden = tuple(args.hidden)
    started = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for stream in [] if args.no_compare else args.streams:
        setting = Setting(stream=stream, epochs=epochs[stream], hidden=hidden)
        for seed in range(seeds):
            benchmark = make_benchmark(stream, seed=seed)
            for method in args.methods:
                row = run_one(method, benchmark, setting, seed)
                rows.append(row)
                print(
                    f"{stream:<16} seed {seed} {method:<15} ACC {row['acc']:.4f} BWT {row['bwt']:+.4f} "
                    f"{row['seconds_per_task']:.2f} s/task",
                    flush=True,
                )
    summary = summarize(rows, args.streams, args.methods)
    if summary:
        table = format_summary(summary)
        print(f"\nmean ± std over {seeds} seed(s); s/task = median training seconds per task\n{table}")

    sweep_rows: list[dict[str, Any]] = []
    if not args.no_sweep:
        sparsities = args.sweep_sparsities or ((0.8, 0.95) if args.quick else SWEEP_SPARSITIES)
        grows = args.sweep_grow or (("random", "gradient") if args.quick else SWEEP_GROW)
        for stream in args.sweep_streams:
            setting = Setting(stream=stream, epochs=epochs[stream], hidden=hidden)
            for seed in range(sweep_seeds):
                benchmark = make_benchmark(stream, seed=seed)
                for regime in args.sweep_regimes:
                    for sparsity, grow, distribution in itertools.product(
                        sparsities, grows, SWEEP_DISTRIBUTIONS
                    ):
                        interval = update_interval(benchmark, setting)
                        config = isolation_config(
                            sparsity, distribution, grow, interval, seed, **SWEEP_REGIMES[regime]
                        )
                        row = run_one("ours", benchmark, setting, seed, config)
                        row.update(regime=regime, sparsity=sparsity, grow=grow, distribution=distribution)
                        sweep_rows.append(row)
                        print(
                            f"sweep {stream} seed {seed} {regime} {sparsity} {grow:<9} {distribution:<8} "
                            f"ACC {row['acc']:.4f} weights/task {row['weights_per_task']}",
                            flush=True,
                        )
        print(
            f"\nsweep, mean ± std over {sweep_seeds} seed(s); ERK - uniform paired by seed, 95% t interval\n"
            f"{format_sweep(sweep_rows)}"
        )

    timing: dict[str, Any] = {}
    if args.timing_rounds > 0:
        timing = time_against_naive(
            "permuted-digits",
            epochs["permuted-digits"],
            hidden,
            rounds=2 if args.quick else args.timing_rounds,
        )
        print(
            f"\ntraining seconds per task, interleaved over {timing['rounds']} rounds (permuted-digits, "
            f"{timing['tasks']} tasks each): naive {timing['naive']:.3f}, ours {timing['ours']:.3f}, "
            f"ratio {timing['ratio']:.3f}"
        )

    elapsed = time.perf_counter() - started
    path = args.out / "results.json"
    write_json(
        path,
        {
            "settings": {
                "quick": args.quick,
                "seeds": seeds,
                "sweep_seeds": sweep_seeds,
                "epochs": epochs,
                "hidden": list(hidden),
                "threads": args.threads,
                "seconds": elapsed,
            },
            "summary": summary,
            "runs": rows,
            "sweep": sweep_rows,
            "timing": timing,
        },
    )
    print(f"\nwrote {path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
