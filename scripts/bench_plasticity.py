"""Benchmark: the long-drift plasticity suite (issue 19) — dense, dense + ReDo, dense + continual backprop, static,
SET, RigL and dormant-aware RigL at 90% sparsity, each facing 8 shifts; registered comparisons with Holm's correction.

The suite (environments, methods, seeds, budgets) is ``sparseapps.rl.plasticity_suite``; its registration is
``docs/plasticity_registration.md``. Each (environment, method, seed) cell trains one agent on one thread and writes
``--out/<env>/<method>/seed<k>.json`` (per-phase returns, steps to recover, area under the curve, end-of-phase
dormant fraction, srank and weight norm). A cell whose JSON exists is skipped, so the suite resumes after an
interruption and several processes may split the cells between them (``--cells``). After training (or alone, with
``--summarize``) every cell under ``--out`` is read and ``summary.json`` / ``summary.md`` hold the per-method means
and each registered comparison: paired mean difference over seeds, its 95% interval, a Bonferroni interval, the
paired t-test p-value and its Holm adjustment across the family.

    python scripts/bench_plasticity.py                      # the registered suite (hours; see the registration)
    python scripts/bench_plasticity.py --cells 'cartpole-*/rigl*/*' --out runs/plasticity
    python scripts/bench_plasticity.py --summarize --out runs/plasticity   # + summary.png: per-phase curves
    python scripts/bench_plasticity.py --quick              # every mechanism on budgets of seconds: a smoke run
"""

from __future__ import annotations

import fnmatch
import functools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseapps.core.options import parse_config
from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.core.stats import confidence_half_width, standard_error
from sparseapps.rl.cells import run_or_read, write_summary
from sparseapps.rl.plasticity_suite import (
    ENVS,
    METHODS,
    QUICK_ENVS,
    SEEDS,
    cell_settings,
    compare,
    comparison_table,
    format_number,
    registered_comparisons,
    run_cell,
)

SUMMARY_METRICS = (
    "mean_final_return",
    "mean_auc",
    "mean_steps_to_recover",
    "recovered_fraction",
    "mean_dormant_fraction",
    "final_dormant_fraction",
)


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_plasticity", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={"help": "the suite's shifts on budgets of seconds, seeds 0 and 1, into a separate folder"},
    )
    envs: tuple[str, ...] = field(default=tuple(ENVS), metadata={"help": f"among {', '.join(ENVS)}"})
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={"help": f"among {', '.join(METHODS)}"})
    seeds: tuple[int, ...] = field(default=SEEDS, metadata={"help": "seeds (the registered ones by default)"})
    cells: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "only the cells matching one of these env/method/seed patterns (fnmatch), e.g. 'pendulum-*/*/10?'"
        },
    )
    summarize: bool = field(
        default=False, metadata={"help": "train nothing: summarize the cells under --out"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads per cell"})

    def __post_init__(self) -> None:
        for name, chosen, known in (("envs", self.envs, ENVS), ("methods", self.methods, METHODS)):
            unknown = sorted(set(chosen) - set(known))
            if not chosen or unknown:
                raise ValueError(f"expected {name} among {list(known)}, got {list(chosen)}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"expected seeds >= 0, got {self.seeds}")
        if self.threads < 1:
            raise ValueError(f"expected threads >= 1, got {self.threads}")


QUICK: dict[str, Any] = {"seeds": (0, 1), "out": "runs/bench_plasticity_quick"}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args`; ``--quick`` first applies :data:`QUICK`, then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


def cell_path(out: Path, env: str, method: str, seed: int) -> Path:
    return out / env / method / f"seed{seed}.json"


def planned_cells(args: Args) -> list[tuple[str, str, int]]:
    """The (env, method, seed) cells to run, seed by seed (a run cut short leaves whole seeds)."""
    cells = [(env, method, seed) for seed in args.seeds for env in args.envs for method in args.methods]
    if args.cells:
        cells = [c for c in cells if any(fnmatch.fnmatch(f"{c[0]}/{c[1]}/{c[2]}", p) for p in args.cells)]
        if not cells:
            raise ValueError(f"no cell matches --cells {list(args.cells)}; cells are named env/method/seed")
    return cells


def run(args: Args) -> list[dict[str, Any]]:
    """Runs the planned cells that have no result yet; returns every planned cell's result."""
    out = Path(args.out)
    envs = QUICK_ENVS if args.quick else ENVS
    results = []
    for env, method, seed in planned_cells(args):
        path = cell_path(out, env, method, seed)
        settings = cell_settings(envs[env], METHODS[method])
        started = time.perf_counter()
        result, trained = run_or_read(
            path,
            settings,
            functools.partial(run_cell, envs[env], METHODS[method], seed, threads=args.threads),
        )
        if trained:
            summary = result["summary"]
            print(
                f"  {env:<18} {method:<13} seed {seed:>3}: final {summary['mean_final_return']}, dormant "
                f"{summary['mean_dormant_fraction']}, {time.perf_counter() - started:.1f}s "
                f"({result['steps_per_second']:.0f} steps/s)",
                flush=True,
            )
        results.append(result)
    return results


def _describe(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "ci95": confidence_half_width(values) if len(values) >= 2 else None,
    }


def _snapshot_numbers(snapshot: dict[str, Any]) -> tuple[float, float]:
    """``(srank fraction, L2 norm)`` of one snapshot: each hidden layer's srank over its width, averaged over the
    layers of every network, and the norm of all the networks' parameters together."""
    fractions = [
        rank / network["width"][layer]
        for network in snapshot.values()
        for layer, rank in network["effective_rank"].items()
    ]
    norm = sum(network["weight_norm"] ** 2 for network in snapshot.values()) ** 0.5
    return statistics.fmean(fractions), norm


def by_env_and_method(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{env: {method: cells}}``: environments in the order met, methods in the suite's order, none empty."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for env in dict.fromkeys(r["env"] for r in results):
        for method in METHODS:
            runs = [r for r in results if r["env"] == env and r["method"] == method]
            if runs:
                grouped.setdefault(env, {})[method] = runs
    return grouped


def diagnostics(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per (env, method), means over seeds of what the registration reports beside the comparisons: the dormant
    fraction, srank fraction and weight norm at the first snapshot (phase 0) and the last (end of the run), the
    topology updates of all networks and the neurons recycled."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for env, methods in by_env_and_method(results).items():
        for method, runs in methods.items():
            row: dict[str, float | None] = {"seeds": len(runs)}
            for when, index in (("first", 0), ("last", -1)):
                numbers = [_snapshot_numbers(r["phases"][index]["snapshot"]) for r in runs]
                row[f"dormant_{when}"] = statistics.fmean(
                    r["phases"][index]["dormant_fraction"] for r in runs
                )
                row[f"srank_{when}"] = statistics.fmean(n[0] for n in numbers)
                row[f"norm_{when}"] = statistics.fmean(n[1] for n in numbers)
            updates = [sum(r["topology_updates"].values()) for r in runs if r.get("topology_updates")]
            recycled = [r["recycled"] for r in runs if r.get("recycled") is not None]
            row["topology_updates"] = statistics.fmean(updates) if updates else None
            row["recycled"] = statistics.fmean(recycled) if recycled else None
            table.setdefault(env, {})[method] = row
    return table


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (env, method): mean and 95% half-width of each summary metric over seeds; the registered comparisons."""
    grouped = by_env_and_method(results)
    table = {
        env: {
            method: {
                metric: _describe(
                    [r["summary"][metric] for r in runs if r["summary"].get(metric) is not None]
                )
                for metric in SUMMARY_METRICS
            }
            for method, runs in methods.items()
        }
        for env, methods in grouped.items()
    }
    comparisons = compare(results, registered_comparisons([e for e in ENVS if e in grouped]))
    return {
        "methods": table,
        "comparisons": comparisons,
        "diagnostics": diagnostics(results),
        "n_cells": len(results),
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| env | method | seeds | mean final return | mean AUC | steps to recover | dormant fraction |"]
    lines.append("|---|---|---|---|---|---|---|")
    for env, methods in summary["methods"].items():
        for method, metrics in methods.items():
            cells = [
                f"{format_number(metrics[m]['mean'], 1)} ± {format_number(metrics[m]['ci95'], 1)}"
                for m in ("mean_final_return", "mean_auc", "mean_steps_to_recover")
            ]
            dormant = metrics["mean_dormant_fraction"]
            lines.append(
                f"| {env} | {method} | {metrics['mean_final_return']['n']} | {' | '.join(cells)} | "
                f"{format_number(dormant['mean'])} ± {format_number(dormant['ci95'])} |"
            )
    lines += ["", *comparison_table(summary["comparisons"], lambda row: row["comparison"])]
    lines += [
        "",
        "Diagnostics (means over seeds; first = after phase 0's first rollout, last = end of the run; srank as a "
        "fraction of the layer's width, averaged over hidden layers; norm of all parameters):",
        "",
        "| env | method | dormant first → last | srank first → last | weight norm first → last | topology updates "
        "| neurons recycled |",
        "|---|---|---|---|---|---|---|",
    ]
    for env, methods in summary["diagnostics"].items():
        for method, row in methods.items():
            lines.append(
                f"| {env} | {method} | {format_number(row['dormant_first'])} → {format_number(row['dormant_last'])} "
                f"| {format_number(row['srank_first'])} → {format_number(row['srank_last'])} "
                f"| {format_number(row['norm_first'], 1)} → {format_number(row['norm_last'], 1)} "
                f"| {format_number(row['topology_updates'], 0)} | {format_number(row['recycled'], 0)} |"
            )
    return "\n".join(lines) + "\n"


PLOT_PANELS = (
    ("final_return", "final return of the phase"),
    ("dormant_fraction", "dormant fraction after the shift"),
)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Per environment (rows): each method's final return per phase and dormant fraction at each snapshot (the
    shift's first rollout end; the last one is the end of the run), mean over seeds with one standard error shaded
    (the registered intervals are in the tables). Dense baselines dashed, sparse methods solid."""
    plt = pyplot()
    grouped = by_env_and_method(results)
    fig, axes = plt.subplots(
        len(grouped), len(PLOT_PANELS), figsize=(6 * len(PLOT_PANELS), 3.4 * len(grouped)), squeeze=False
    )
    for row, (env, methods) in zip(axes, grouped.items(), strict=True):
        for axis, (key, label) in zip(row, PLOT_PANELS, strict=True):
            for method, runs in methods.items():
                n_phases = min(len(r["phases"]) for r in runs)
                values = [[r["phases"][k][key] for r in runs] for k in range(n_phases)]
                mean = [statistics.fmean(v) for v in values]
                half = [standard_error(v) for v in values]  # NaN (no band) for one seed
                style = "--" if method.startswith("dense") else "-"
                (line,) = axis.plot(range(n_phases), mean, style, marker=".", label=f"{method} ({len(runs)})")
                axis.fill_between(
                    range(n_phases),
                    [m - h for m, h in zip(mean, half, strict=True)],
                    [m + h for m, h in zip(mean, half, strict=True)],
                    alpha=0.12,
                    color=line.get_color(),
                )
            axis.set_xlabel("phase (a shift starts each phase after 0)")
            axis.set_ylabel(label)
            axis.set_title(env)
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=7, title="method (seeds); shaded: ±1 s.e.", title_fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.summarize:
        print(f"{len(planned_cells(args))} cells into {out}", flush=True)
        run(args)
    return write_summary(out, summarize, markdown, plot)


if __name__ == "__main__":
    main()
