"""`sparseapps continual run ...`: per-task isolated sparse subnetworks on a continual benchmark.

Example:
    sparseapps continual run --benchmark split-digits --sparsity 0.9 --distribution erk --grow random --out runs/x

writes ``runs/x/results.json`` (accuracy matrix ``R[i][j]``, ACC, BWT, forgetting, Avalanche's stream metrics,
task-agnostic accuracy, capacity per task and layer, ITOP rate, seconds per task), ``runs/x/accuracy_matrix.png``
and ``runs/x/capacity.png``, with ``runs/x/checkpoint.pt`` after every task and every ``--checkpoint-every``
optimizer steps. The same command with ``--resume`` continues a killed run bit for bit (or prints the results of
a finished one); a second run into a directory that holds results is refused unless ``--resume`` or
``--overwrite``.

Every option is a field of a configuration, with the field's name and help: :class:`ContinualRun` (the run),
:class:`IsolationConfig` (capacity, transfer, initialization) and the core's :class:`SparsityConfig` (the fields
in :data:`SPARSITY_OPTIONS`: ``--sparsity``, ``--distribution``, ``--drop``, ``--grow``, ``--update-interval``,
...), as every domain names them. ``--grow none`` trains each task's allocation without topology updates
(``method='static'``). ``--init`` and ``--growth`` are hidden deprecated aliases of ``--distribution`` and
``--grow``: they work and print a one-line note.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparseapps.continual.checkpoint import DEFAULT_CHECKPOINT_EVERY, OUTPUTS
from sparseapps.continual.config import BENCHMARK_NAMES, ContinualRun, IsolationConfig
from sparseapps.core import scores
from sparseapps.core.config import SparsityConfig
from sparseapps.core.options import add_options, collect

RUN_OPTIONS = tuple(item.name for item in dataclasses.fields(ContinualRun) if item.name != "isolation")
"""The :class:`ContinualRun` fields that are options (all but ``isolation``, which the other groups set)."""
ISOLATION_OPTIONS = tuple(
    item.name for item in dataclasses.fields(IsolationConfig) if item.name != "sparsity"
)
"""The :class:`IsolationConfig` fields that are options (all but ``sparsity``: :data:`SPARSITY_OPTIONS`)."""
SPARSITY_OPTIONS = (
    "sparsity",
    "distribution",
    "dense_first_layer",
    "drop",
    "grow",
    "drop_fraction",
    "drop_schedule",
    "update_interval",
    "start_fraction",
    "end_fraction",
    "random_grow_fraction",
    "grow_init_range",
    "grow_optimizer_state",
    "momentum",
    "tie_noise",
)
"""The :class:`SparsityConfig` fields ``continual run`` takes as options (the seed is ``--seed``, the method
follows ``--grow``; the others have one value in continual isolation)."""
# Defaults of the command that differ from the dataclasses' (small models run fastest on one thread).
COMMAND_DEFAULTS = {"threads": 1}
# What three SparsityConfig fields mean in continual isolation, in place of their general help.
CONTINUAL_HELP = {
    "sparsity": "fraction of zeros of each task's own subnetwork over the isolated layers",
    "distribution": "per-layer split of each task's budget: uniform, erk or er",
    "dense_first_layer": "the first isolated layer gives each task its whole fair share (size // n_tasks), "
    "still updated by drop and grow",
}
DEPRECATED = {"--init": "distribution", "--growth": "grow"}
"""Old option names, still accepted with a note: ``--init`` meant the distribution (recsys's ``--init`` is an
initial mask), ``--growth`` the grow criterion."""


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 256,256, got {text!r}"
        ) from None


def _choices() -> dict[str, tuple[str, ...]]:
    """Choices of the ``str`` fields: the benchmarks, and the score registry's names when the parser is built."""
    # criteria that read layer activations are refused by IsolationConfig
    usable = [n for n in scores.grow_names() if "activations" not in scores.get("grow", n).needs]
    return {"benchmark": BENCHMARK_NAMES, "drop": scores.drop_names(), "grow": ("none", *usable)}


def _shown(config: Any, names: Iterable[str]) -> dict[str, Any]:
    """``config``'s values of the fields ``names`` as the help shows them (tuples as they are typed: 256,256)."""
    values = {name: getattr(config, name) for name in names}
    return {name: ",".join(map(str, v)) if isinstance(v, tuple) else v for name, v in values.items()}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registers ``sparseapps continual run``."""
    parser = sub.add_parser("continual", help="continual learning with per-task sparse subnetworks")
    commands = parser.add_subparsers(dest="continual_command", required=True)
    run = commands.add_parser(
        "run",
        help="train a task-incremental stream with parameter isolation and dynamic sparse training",
        description="Train one isolated sparse subnetwork per task (Avalanche Naive + SparseIsolationPlugin, the "
        "core engine per task) and write results.json, accuracy_matrix.png and capacity.png.",
    )
    defaults = ContinualRun()
    isolation, sparsity = defaults.isolation, defaults.isolation.sparsity
    choices = _choices()
    group = run.add_argument_group("run (ContinualRun)")
    add_options(
        group,
        ContinualRun,
        names=RUN_OPTIONS,
        choices={"benchmark": choices["benchmark"]},
        types={"hidden": _widths, "channels": _widths},
        defaults={**_shown(defaults, RUN_OPTIONS), **COMMAND_DEFAULTS},
    )
    group = run.add_argument_group("each task's sparse training (SparsityConfig)")
    add_options(
        group,
        SparsityConfig,
        names=SPARSITY_OPTIONS,
        choices={"drop": choices["drop"], "grow": choices["grow"]},
        help=CONTINUAL_HELP,
        defaults=_shown(sparsity, SPARSITY_OPTIONS),
        deprecated=DEPRECATED,
    )
    group = run.add_argument_group("isolation (IsolationConfig)")
    add_options(
        group, IsolationConfig, names=ISOLATION_OPTIONS, defaults=_shown(isolation, ISOLATION_OPTIONS)
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--out", type=Path, default=Path("runs/continual"), help="output directory")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help="optimizer steps between checkpoints within a task (0: only after each task)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, or print its results if it finished (an empty "
        "--out starts it)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace what --out holds and start the run afresh"
    )
    run.set_defaults(handler=run_command)


def run_from_arguments(args: argparse.Namespace) -> ContinualRun:
    """The :class:`ContinualRun` of parsed ``continual run`` options: the defaults with every option given.

    The run's seed seeds each task's engine as well; ``--grow none`` is ``method='static'``.
    """
    defaults = ContinualRun()
    run_values = {**COMMAND_DEFAULTS, **collect(args, ContinualRun, RUN_OPTIONS)}
    sparsity = collect(args, SparsityConfig, SPARSITY_OPTIONS)
    grow = sparsity.get("grow", defaults.isolation.sparsity.grow)
    seed = run_values.get("seed", defaults.seed)
    sparsity.update(method="static" if grow == "none" else "dst", seed=seed)
    isolation = defaults.isolation.replace(
        sparsity=defaults.isolation.sparsity.replace(**sparsity),
        **collect(args, IsolationConfig, ISOLATION_OPTIONS),
    )
    return ContinualRun(**run_values, isolation=isolation)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``sparseapps continual run``; returns the exit code."""
    from sparseapps.continual.train import run_continual

    try:
        run = run_from_arguments(args)
        result = run_continual(
            run,
            progress=not args.no_progress,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            checkpoint_every=args.checkpoint_every,
        )
    except (ValueError, TypeError, OSError) as error:  # OSError: output conflicts, unreadable files
        print(f"error: {error}", file=sys.stderr)
        return 2
    sparsity = run.isolation.sparsity
    n = len(result["accuracy_matrix"])
    print(
        f"\n{run.benchmark}: {n} tasks, sparsity {sparsity.sparsity} per task, {sparsity.distribution}, "
        f"drop {sparsity.drop}, grow {sparsity.grow}"
    )
    for i, row in enumerate(result["accuracy_matrix"]):
        print(f"  after task {i}: " + " ".join(f"{v:.3f}" for v in row if v is not None))
    print(
        f"ACC {result['acc']:.4f}  BWT {result['bwt']:.4f}  (R[T-1][j] == R[j][j] for all j: {result['bwt_exact_zero']})"
    )
    if "task_agnostic" in result:
        agnostic = result["task_agnostic"]
        print(
            f"task-agnostic accuracy {agnostic['accuracy']:.4f} "
            f"(task inferred correctly for {agnostic['task_inference_accuracy']:.4f} of the samples)"
        )
    capacity = result["capacity"]
    used = ", ".join(f"task {t['task']}: {t['fraction']:.3f}" for t in capacity["tasks"])
    print(f"capacity used: {used}; free {capacity['free'] / capacity['total']:.3f}")
    itop = result["itop"]
    per_task = ", ".join(f"task {t['task']}: {t['rate']:.3f}" for t in itop["tasks"])
    print(f"ITOP rate (share of the isolated weights ever active): {per_task}; overall {itop['overall']:.3f}")
    print(f"seconds per task (training): {', '.join(f'{s:.2f}' for s in result['train_seconds'])}")
    print("results in " + ", ".join(str(args.out / name) for name in OUTPUTS if (args.out / name).exists()))
    return 0
