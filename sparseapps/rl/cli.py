"""`sparseapps rl train ...`: dense vs sparse SB3 agents, several seeds, one progress bar, results and a plot.

Example:
    sparseapps rl train --env Pendulum-v1 --algo sac --method rigl --sparsity 0.9 --steps 50000 --seeds 3 \\
        --out runs/x

writes ``runs/x/{dense,rigl}/seed{0,1,2}/`` (TensorBoard logs under ``tb/``, ``model.zip`` with its masks,
``result.json``), ``runs/x/results.json`` and ``runs/x/curves.png``. ``--storage compact`` trains the sparse runs
on compact layers (only the active weights stored, sparse forward and backward; :mod:`sparseapps.rl.compact`).
Running the same command again resumes unfinished runs from their checkpoints (bit for bit) and reuses finished
ones. Another method into the same ``--out`` (same environment, algorithm, budget, evaluation, drift and
hyperparameters) adds its rows to the summary; other settings are refused unless ``--overwrite``. ``--no-progress``
hides the progress bar (as for ``recsys train`` and ``continual run``).

``--recycler redo`` / ``--recycler cbp`` (repeatable) also trains dense runs that recycle neurons, ReDo or continual
backprop (:mod:`sparseapps.rl.plasticity`), under ``dense-redo/`` / ``dense-cbp/``, at the papers' defaults unless
``--recycler-arg KEY=VALUE`` sets a keyword of the recycler (``interval=500``; every recycler given gets it).
``--method dense`` trains no sparse run, so ``--method dense --recycler redo`` trains dense and dense + ReDo:

    sparseapps rl train --env CartPole-v1 --algo ppo --method dense --recycler redo --recycler cbp --out runs/y
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from sparseapps.core import SparsityConfig
from sparseapps.core.io import OutputConflictError
from sparseapps.core.options import add_options, collect
from sparseapps.core.validation import check_int
from sparseapps.rl.presets import RL_PRESETS
from sparseapps.rl.run_config import ALGORITHM_CLASSES, METHODS, RECYCLERS, RLRun, make_sparsity_config
from sparseapps.rl.summary import format_table
from sparseapps.rl.train import train_many

RUN_OPTIONS = (
    "env",
    "algo",
    "method",
    "preset",
    "critic_density_ratio",
    "steps",
    "n_envs",
    "eval_every",
    "eval_episodes",
    "checkpoint_every",
    "threads",
    "device",
)
"""The :class:`RLRun` fields that are options of their own, with the field's name, type and help; the others need
their own syntax (``--drift``/``--drift-shift``, ``--hp KEY=VALUE``), are built from several options
(``--sparsity`` and ``--update-interval`` over the method's or preset's configuration,
``--sparse-output-layers``) or vary over the runs (``--seeds``)."""


SPARSITY_OPTIONS = ("storage",)
"""The :class:`~sparseapps.core.SparsityConfig` fields that are options of their own (with the field's name, type,
choices and help), set over the method's or preset's configuration of the sparse runs."""


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python literal value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _shift(text: str) -> tuple[int, float]:
    step, sep, factor = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return int(step), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP:FACTOR such as 20000:2.0, got {text!r}") from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registers ``sparseapps rl train``."""
    parser = sub.add_parser("rl", help="sparse deep RL with Stable-Baselines3")
    commands = parser.add_subparsers(dest="rl_command", required=True)
    train = commands.add_parser(
        "train",
        help="train dense and sparse agents over several seeds",
        description="Train an SB3 agent sparse (and a dense baseline) and write results.json and curves.png.",
    )
    group = train.add_argument_group("each run (RLRun)")
    add_options(
        group,
        RLRun,
        names=RUN_OPTIONS,
        choices={"algo": sorted(ALGORITHM_CLASSES), "method": METHODS, "preset": sorted(RL_PRESETS)},
        help={  # the fields' help lists the choices, which the options show
            "algo": "SB3 algorithm",
            "method": "sparse-training method (a core preset) of the sparse runs",
            "preset": "an RL preset: replaces --method's configuration; its algorithm kwargs apply to every run",
            "critic_density_ratio": "critic density / actor density",
        },
        defaults={"critic_density_ratio": "the preset's, or 1"},
    )
    group.add_argument("--drift", metavar="PARAMETER", help="make the environment drift this parameter")
    group.add_argument(
        "--drift-shift", type=_shift, action="append", default=[], metavar="STEP:FACTOR", help="a drift shift"
    )
    group.add_argument(
        "--hp",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an SB3 constructor kwarg (repeatable)",
    )
    group.add_argument(
        "--recycler",
        action="append",
        default=[],
        choices=RECYCLERS[1:],
        help="also train dense runs with this neuron recycler (repeatable): redo (ReDo, Sokar et al. 2023) or cbp "
        "(continual backprop, Dohare et al. 2024), at the papers' defaults",
    )
    group.add_argument(
        "--recycler-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recycler's keyword over the papers' defaults, e.g. interval=500 (repeatable; given to every "
        "--recycler)",
    )
    group = train.add_argument_group("the sparse runs (none with --method dense)")
    group.add_argument("--sparsity", type=float, help="sparsity (default: the preset's, or 0.9)")
    group.add_argument("--update-interval", type=int, help="gradient steps between topology updates")
    add_options(group, SparsityConfig, names=SPARSITY_OPTIONS)
    group.add_argument(
        "--sparse-output-layers", action="store_true", help="sparsify output layers too (default: dense)"
    )
    train.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    train.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--out", type=Path, default=Path("runs/rl"), help="output directory")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out holds when it conflicts (other settings, another configuration of a run, a "
        "damaged file) instead of refusing; runs that fit are still reused or resumed",
    )
    train.add_argument(
        "--keep-replay-buffer",
        action="store_true",
        help="also write each off-policy run's final replay buffer (replay_buffer.pkl, as large as the buffer)",
    )
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``sparseapps rl train``; returns the exit code."""
    given = collect(args, RLRun, RUN_OPTIONS)
    method = given.pop("method", RLRun.__dataclass_fields__["method"].default)
    preset = given.pop("preset", None)
    critic_density_ratio = given.pop("critic_density_ratio", None)
    common: dict[str, Any] = dict(
        **given,
        drift_parameter=args.drift,
        drift_shifts=tuple(args.drift_shift),
        hyperparameters=dict(args.hp),
    )
    try:
        check_int("--seeds", args.seeds, low=1)
        overrides = {
            name: value
            for name, value in (("sparsity", args.sparsity), ("update_interval", args.update_interval))
            if value is not None
        } | collect(args, SparsityConfig, SPARSITY_OPTIONS)
        if args.recycler_arg and not args.recycler:
            raise ValueError(f"--recycler-arg {dict(args.recycler_arg)} needs a --recycler")
        recycler_kwargs = dict(args.recycler_arg)
        sparse: dict[str, Any] | None = None
        if method == "dense":
            given_sparse = [
                option
                for option, value in (
                    ("--sparsity", args.sparsity),
                    ("--update-interval", args.update_interval),
                    ("--critic-density-ratio", critic_density_ratio),
                    *((f"--{name.replace('_', '-')}", value) for name, value in overrides.items()),
                    ("--sparse-output-layers", args.sparse_output_layers or None),
                )
                if value is not None
            ]
            if given_sparse:
                raise ValueError(
                    f"{', '.join(dict.fromkeys(given_sparse))}: options of the sparse runs, but --method dense "
                    "trains none; drop them or pick a sparse --method"
                )
        else:
            sparse = dict(
                method=method,
                preset=preset,
                sparsity=make_sparsity_config(method, preset, **overrides),
                critic_density_ratio=critic_density_ratio,
                dense_output_layers=False if args.sparse_output_layers else None,
            )
        runs = []
        for seed in range(args.seeds):
            if not args.no_dense:
                runs.append(RLRun(method="dense", preset=preset, seed=seed, **common))
            for recycler in dict.fromkeys(args.recycler):
                runs.append(
                    RLRun(
                        method="dense",
                        preset=preset,
                        seed=seed,
                        recycler=recycler,
                        recycler_kwargs=recycler_kwargs,
                        **common,
                    )
                )
            if sparse is not None:
                runs.append(RLRun(seed=seed, **common, **sparse))
        summary = train_many(
            runs,
            args.out,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            keep_replay_buffer=args.keep_replay_buffer,
        )
    except (ValueError, TypeError, OutputConflictError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = runs[-1]
    print(f"\n{run.algo.upper()} on {run.env}, {run.steps} steps, {len(summary['runs'])} run(s)")
    print(format_table(summary["rows"]))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'curves.png'}")
    return 0
