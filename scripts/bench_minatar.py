"""Benchmark: MinAtar as a Graesser-style sparse DQN suite (issue 19) — dense, static, SET and RigL at 90 / 95 / 99%
sparsity; registered paired comparisons with Holm's correction.

The suite (games, methods, sparsities, seeds, budget, DQN settings) is ``sparseapps.rl.minatar``; its registration is
``docs/minatar_registration.md``. Each (game, method, sparsity, seed) cell trains one DQN agent on one thread and
writes ``--out/<game>/<method>[-<percent>]/seed<k>.json`` (final greedy return over 20 episodes, learning curve,
parameter counts, the callback's density, FLOPs and sparsity report, wall-clock). A cell whose JSON exists is skipped,
so the suite resumes after an interruption and several processes may split the cells between them (``--cells``).
After training (or alone, with ``--summarize``) every cell under ``--out`` is read and ``summary.json`` /
``summary.md`` hold the per-cell mean final return with its 95% interval, and each registered comparison (rigl -
static, set - static, rigl - dense at each sparsity and game, paired by seed): mean difference, 95% interval,
Bonferroni interval, paired t-test p-value and its Holm adjustment across the family.

    python scripts/bench_minatar.py                                   # the registered suite (see the registration)
    python scripts/bench_minatar.py --cells 'breakout/rigl-*/30?' --out runs/minatar
    python scripts/bench_minatar.py --summarize --out runs/minatar     # + summary.png: returns and curves
    python scripts/bench_minatar.py --quick                           # every mechanism in seconds: a smoke run
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
from sparseapps.rl.cells import export_cells, run_or_read, write_summary
from sparseapps.rl.minatar import (
    BUDGET,
    GAMES,
    METHODS,
    SEEDS,
    SPARSITIES,
    SUITE_GAMES,
    cell_name,
    cell_settings,
    estimate_core_hours,
    run_cell,
)
from sparseapps.rl.plasticity_suite import Comparison, compare, comparison_table, format_number

#: DQN overrides of the quick run: learning starts at once, a small replay buffer.
QUICK_DQN: dict[str, Any] = {"learning_starts": 100, "buffer_size": 1_000}


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_minatar", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={
            "help": "budgets of seconds (400 steps, learning from step 100), seeds 0 and 1, into a separate folder"
        },
    )
    games: tuple[str, ...] = field(default=SUITE_GAMES, metadata={"help": f"among {', '.join(GAMES)}"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"among {', '.join(METHODS)}"})
    sparsities: tuple[float, ...] = field(
        default=SPARSITIES, metadata={"help": "sparsities of the sparse methods"}
    )
    seeds: tuple[int, ...] = field(default=SEEDS, metadata={"help": "seeds (the registered ones by default)"})
    budget: int = field(default=BUDGET, metadata={"help": "env steps per run"})
    cells: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "only the cells matching one of these game/method[-percent]/seed patterns (fnmatch), e.g. "
            "'breakout/rigl-*/30?' or 'space_invaders/dense/*'"
        },
    )
    summarize: bool = field(
        default=False, metadata={"help": "train nothing: summarize the cells under --out"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads per cell"})
    export: str | None = field(
        default=None,
        metadata={
            "help": "train nothing: copy the cells under --out to this folder without their per-episode training "
            "logs (the repository's copy, docs/minatar_results/cells)"
        },
    )

    def __post_init__(self) -> None:
        for name, chosen, known in (("games", self.games, tuple(GAMES)), ("methods", self.methods, METHODS)):
            unknown = sorted(set(chosen) - set(known))
            if not chosen or unknown:
                raise ValueError(f"expected {name} among {list(known)}, got {list(chosen)}")
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"expected sparsities in (0, 1), got {self.sparsities}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"expected seeds >= 0, got {self.seeds}")
        if self.budget < 10:
            raise ValueError(f"expected budget >= 10 env steps, got {self.budget}")
        if self.threads < 1:
            raise ValueError(f"expected threads >= 1, got {self.threads}")


QUICK: dict[str, Any] = {"seeds": (0, 1), "budget": 400, "out": "runs/bench_minatar_quick"}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args`; ``--quick`` first applies :data:`QUICK`, then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


Cell = tuple[str, str, float, int]


def cell_path(out: Path, game: str, method: str, sparsity: float, seed: int) -> Path:
    return out / cell_name(game, method, sparsity) / f"seed{seed}.json"


def planned_cells(args: Args) -> list[Cell]:
    """The (game, method, sparsity, seed) cells to run, seed by seed (a run cut short leaves whole seeds); dense once
    per game and seed (sparsity 0)."""
    cells: list[Cell] = []
    for seed in args.seeds:
        for game in args.games:
            for method in args.methods:
                for sparsity in (0.0,) if method == "dense" else args.sparsities:
                    cells.append((game, method, sparsity, seed))
    if args.cells:
        cells = [
            c for c in cells if any(fnmatch.fnmatch(f"{cell_name(*c[:3])}/{c[3]}", p) for p in args.cells)
        ]
        if not cells:
            raise ValueError(
                f"no cell matches --cells {list(args.cells)}; cells are named game/method[-percent]/seed"
            )
    return cells


def run(args: Args) -> list[dict[str, Any]]:
    """Runs the planned cells that have no result yet; returns every planned cell's result."""
    out = Path(args.out)
    overrides = QUICK_DQN if args.quick else {}
    results = []
    for game, method, sparsity, seed in planned_cells(args):
        path = cell_path(out, game, method, sparsity, seed)
        settings = cell_settings(game, method, sparsity, args.budget, **overrides)
        started = time.perf_counter()
        result, trained = run_or_read(
            path,
            settings,
            functools.partial(
                run_cell, game, method, sparsity, seed, args.budget, threads=args.threads, **overrides
            ),
        )
        if trained:
            print(
                f"  {cell_name(game, method, sparsity):<26} seed {seed:>3}: final return "
                f"{result['final_return']:.2f}, {time.perf_counter() - started:.1f}s "
                f"({result['steps_per_second']:.0f} steps/s)",
                flush=True,
            )
        results.append(result)
    return results


def registered_comparisons(games: tuple[str, ...], sparsities: tuple[float, ...]) -> list[Comparison]:
    """The registered family (Holm-corrected together): per game and sparsity, rigl - static, set - static and
    rigl - dense on the final return, paired by seed. 9 per game."""
    comparisons = []
    for game in games:
        for sparsity in sparsities:
            rigl, set_, static = (cell_name(game, m, sparsity) for m in ("rigl", "set", "static"))
            dense = cell_name(game, "dense", 0.0)
            comparisons += [
                Comparison(game, rigl, static, "final_return"),
                Comparison(game, set_, static, "final_return"),
                Comparison(game, rigl, dense, "final_return"),
            ]
    return comparisons


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: seeds, mean final return and its 95% half-width, mean nonzero weights and FLOPs ratio; the
    registered comparisons over the games and sparsities found."""
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["cell"] for r in results):
        rows = [r for r in results if r["cell"] == name]
        returns = [r["final_return"] for r in rows]
        flops = [r["training_flops"]["ratio"] for r in rows if "training_flops" in r]
        table[name] = {
            "seeds": sorted(r["seed"] for r in rows),
            "n": len(rows),
            "mean_final_return": statistics.fmean(returns),
            "ci95": confidence_half_width(returns) if len(returns) >= 2 else None,
            "nonzero_weights": statistics.fmean(r["parameters"]["nonzero_weights"] for r in rows),
            "flops_ratio": statistics.fmean(flops) if flops else 1.0,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rows),
        }
    games = tuple(dict.fromkeys(r["game"] for r in results))
    sparsities = tuple(sorted({r["sparsity"] for r in results if r["method"] != "dense"}))
    cells = [
        {
            "env": r["game"],
            "method": r["cell"],
            "seed": r["seed"],
            "summary": {"final_return": r["final_return"]},
        }
        for r in results
    ]
    comparisons = compare(cells, registered_comparisons(games, sparsities))
    return {"cells": table, "comparisons": comparisons, "n_cells": len(results)}


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| cell | seeds | mean final return ± 95% CI | nonzero weights | training FLOPs vs dense | train s |"
    ]
    lines.append("|---|---|---|---|---|---|")
    for name, row in summary["cells"].items():
        lines.append(
            f"| {name} | {row['n']} | {format_number(row['mean_final_return'], 2)} ± {format_number(row['ci95'], 2)} | "
            f"{row['nonzero_weights']:.0f} | {row['flops_ratio']:.3f} | {row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        *comparison_table(summary["comparisons"], lambda row: f"{row['method']} vs {row['baseline']}"),
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Per game (rows): the final greedy return against sparsity for each method, dense as a horizontal line (mean
    over seeds, one standard error shaded or as error bars), and the learning curves of every cell (mean over seeds;
    colour: method, line style: sparsity)."""
    plt = pyplot()
    games = list(dict.fromkeys(r["game"] for r in results))
    fig, axes = plt.subplots(len(games), 2, figsize=(12, 3.6 * len(games)), squeeze=False)
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    sparse = sorted({r["sparsity"] for r in results if r["method"] != "dense"})
    styles = {sparsity: ("-", "--", ":", "-.")[k % 4] for k, sparsity in enumerate(sparse)}

    def mean_and_error(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), standard_error(values)  # NaN (no bar) for one seed

    for (final_axis, curve_axis), game in zip(axes, games, strict=True):
        for method in METHODS:
            rows = [r for r in results if r["game"] == game and r["method"] == method]
            if not rows:
                continue
            sparsities = sorted({r["sparsity"] for r in rows})
            points = [
                mean_and_error([r["final_return"] for r in rows if r["sparsity"] == s]) for s in sparsities
            ]
            if method == "dense":
                mean, error = points[0]
                final_axis.axhline(mean, color=colors[method], linestyle="--", label="dense")
                final_axis.axhspan(mean - error, mean + error, color=colors[method], alpha=0.12)
            else:
                final_axis.errorbar(
                    sparsities,
                    *zip(*points, strict=True),
                    color=colors[method],
                    marker="o",
                    capsize=3,
                    label=method,
                )
            for sparsity in sparsities:
                runs = [r for r in rows if r["sparsity"] == sparsity]
                length = min(len(r["curve"]) for r in runs)
                steps = [point[0] for point in runs[0]["curve"][:length]]
                mean_curve = [statistics.fmean(r["curve"][k][1] for r in runs) for k in range(length)]
                curve_axis.plot(
                    steps,
                    mean_curve,
                    color=colors[method],
                    linestyle=styles.get(sparsity, "--"),
                    label=method if method == "dense" else f"{method} {sparsity:.0%}",
                )
        final_axis.set_xlabel("sparsity")
        final_axis.set_ylabel("final greedy return")
        final_axis.set_title(f"{game}: final return (±1 s.e.)")
        curve_axis.set_xlabel("environment steps")
        curve_axis.set_ylabel("greedy return")
        curve_axis.set_title(f"{game}: learning curves (mean over seeds)")
        for axis in (final_axis, curve_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    if args.export is not None:
        count = export_cells(out, Path(args.export), drop=("episodes",))
        print(f"copied {count} cells from {out} to {args.export} (without 'episodes')")
        return {"exported": count}
    if not args.summarize:
        cells = planned_cells(args)
        hours = estimate_core_hours(len(cells), args.budget)
        print(f"{len(cells)} cells into {out} (about {hours:.1f} core-hours if none is done yet)", flush=True)
        run(args)
    return write_summary(out, summarize, markdown, plot)


if __name__ == "__main__":
    main()
