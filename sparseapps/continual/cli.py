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
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from sparseapps.continual.checkpoint import DEFAULT_CHECKPOINT_EVERY, OUTPUTS
from sparseapps.continual.config import BENCHMARK_NAMES, ContinualRun, IsolationConfig
from sparseapps.core import scores
from sparseapps.core.config import SparsityConfig

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


class _DeprecatedAlias(argparse.Action):
    """An old option name: stores its value under the new option's field and prints a one-line note."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option: str | None = None,
    ) -> None:
        replacement = "--" + self.dest.replace("_", "-")
        print(f"note: {option} is deprecated; use {replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _fields(config: type, names: Iterable[str] | None = None) -> list[tuple[dataclasses.Field[Any], Any]]:
    """``(field, type hint)`` of ``config``'s fields (all of them, or ``names`` in that order)."""
    hints = typing.get_type_hints(config)
    fields = {item.name: item for item in dataclasses.fields(config)}
    return [(fields[name], hints[name]) for name in (names if names is not None else fields)]


def _choices(name: str, hint: Any) -> tuple[str, ...] | None:
    if name == "benchmark":
        return BENCHMARK_NAMES
    if name == "drop":
        return scores.drop_names()
    if name == "grow":  # criteria that read layer activations are refused by IsolationConfig
        usable = [n for n in scores.grow_names() if "activations" not in scores.get("grow", n).needs]
        return ("none", *usable)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _add_option(
    group: argparse._ArgumentGroup, item: dataclasses.Field[Any], hint: Any, default: Any
) -> None:
    """One option for the field ``item``, typed by its hint, with the field's help string and ``default``."""
    flag = "--" + item.name.replace("_", "-")
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f"{CONTINUAL_HELP.get(item.name, item.metadata.get('help', ''))} (default: {shown})"
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    choices = _choices(item.name, hint)
    if typing.get_origin(hint) is tuple:
        kind: Any = _widths
    elif choices is not None:
        kind = str
    else:
        kind = hint
    group.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)


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
    group = run.add_argument_group("run (ContinualRun)")
    for item, hint in _fields(ContinualRun):
        if item.name != "isolation":
            default = COMMAND_DEFAULTS.get(item.name, getattr(defaults, item.name))
            _add_option(group, item, hint, default)
    group = run.add_argument_group("each task's sparse training (SparsityConfig)")
    for item, hint in _fields(SparsityConfig, SPARSITY_OPTIONS):
        _add_option(group, item, hint, getattr(sparsity, item.name))
    group = run.add_argument_group("isolation (IsolationConfig)")
    for item, hint in _fields(IsolationConfig):
        if item.name != "sparsity":
            _add_option(group, item, hint, getattr(isolation, item.name))
    for old, field_name in DEPRECATED.items():
        choices = _choices(field_name, typing.get_type_hints(SparsityConfig)[field_name])
        run.add_argument(
            old, dest=field_name, choices=choices, action=_DeprecatedAlias, help=argparse.SUPPRESS
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


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_from_arguments(args: argparse.Namespace) -> ContinualRun:
    """The :class:`ContinualRun` of parsed ``continual run`` options: the defaults with every option given.

    The run's seed seeds each task's engine as well; ``--grow none`` is ``method='static'``.
    """
    defaults = ContinualRun()
    run_names = [f.name for f in dataclasses.fields(ContinualRun) if f.name != "isolation"]
    run_values = {name: COMMAND_DEFAULTS.get(name, getattr(defaults, name)) for name in run_names}
    run_values.update(_given(args, run_names))
    sparsity = _given(args, SPARSITY_OPTIONS)
    grow = sparsity.get("grow", defaults.isolation.sparsity.grow)
    sparsity.update(method="static" if grow == "none" else "dst", seed=run_values["seed"])
    isolation_names = [f.name for f in dataclasses.fields(IsolationConfig) if f.name != "sparsity"]
    isolation = defaults.isolation.replace(
        sparsity=defaults.isolation.sparsity.replace(**sparsity), **_given(args, isolation_names)
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
