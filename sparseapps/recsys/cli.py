"""`sparseapps recsys ...`: train one recommender (dense or sparse embeddings), or run the recsys demo.

Example:
    sparseapps recsys train --dataset ml-100k --model mf --method dsl --density 0.2 --out runs/x

writes ``runs/x/checkpoint.pt`` (every epoch), ``results.json`` (valid/test metrics, parameters, bytes, seconds
per epoch, seed, config), ``compact.pt``, ``recall_vs_epoch.png`` and ``embedding_size_vs_popularity.png``.
``--resume`` continues an interrupted run from its checkpoint and refuses one made with other settings; a --out
holding anything else (another run, another tool's, foreign files) is refused unless ``--overwrite``. Errors of
input, data or --out print one line and exit with status 2. Every field of
:class:`~sparseapps.recsys.train.TrainConfig` is an option (``--update-interval``, ``--grow``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sparseapps.core import scores
from sparseapps.core.config import STORAGES
from sparseapps.core.options import add_options, collect
from sparseapps.recsys.dsl import INITIAL_MASKS
from sparseapps.recsys.models import COLLECTION_KINDS, LAYOUTS, MODEL_NAMES
from sparseapps.recsys.train import METHODS, MODEL_DEFAULTS, TrainConfig, run_demo, train

_CHOICES: dict[str, tuple[str, ...]] = {
    "model": MODEL_NAMES,
    "method": METHODS,
    "budget": LAYOUTS,
    "collection": COLLECTION_KINDS,
    "init": INITIAL_MASKS,
    "storage": STORAGES,
}


def _shown_defaults() -> dict[str, str]:
    """The defaults the help shows where the models' tuned values (:data:`MODEL_DEFAULTS`) set them: MF's, then
    the other models'."""
    shown = {}
    for item in dataclasses.fields(TrainConfig):
        others = [
            f"; {model}: {values[item.name]}"
            for model, values in MODEL_DEFAULTS.items()
            if model != "mf" and item.name in values
        ]
        if item.name in MODEL_DEFAULTS["mf"] or others:
            shown[item.name] = f"{MODEL_DEFAULTS['mf'].get(item.name, item.default)}{''.join(others)}"
    return shown


def _config_from(args: argparse.Namespace) -> TrainConfig:
    """The model's tuned defaults (:meth:`TrainConfig.tuned`) with every option given on the command line."""
    values = collect(args, TrainConfig)
    return TrainConfig.tuned(values.pop("model", "mf"), **values)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registers ``sparseapps recsys train`` and ``sparseapps recsys demo``."""
    parser = sub.add_parser("recsys", help="recommenders with sparse embedding tables (DSL)")
    commands = parser.add_subparsers(dest="recsys_command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="train MF-BPR, LightGCN or NeuMF, dense or with sparse embeddings",
        description="Train a recommender and write results.json, a checkpoint, compact tables and plots to --out.",
    )
    add_options(  # every TrainConfig field; drop and grow: the score registry's names when the parser is built
        train_parser,
        TrainConfig,
        choices={**_CHOICES, "drop": scores.drop_names(), "grow": scores.grow_names()},
        defaults=_shown_defaults(),
    )
    train_parser.add_argument("--out", type=Path, required=True, help="output directory")
    train_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same settings only); an empty --out simply starts",
    )
    train_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out holds (another run, another tool's, foreign files): removes only the files this "
        "command writes; with --resume, a run of the same settings is continued instead",
    )
    train_parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train_parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: faster for these small ops)"
    )
    train_parser.set_defaults(handler=_train_command)
    demo = commands.add_parser(
        "demo",
        help="ML-100K: dense vs DSL at 0.5 / 0.2 / 0.1 for MF-BPR and LightGCN, with a table and plots",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo/recsys"), help="output directory")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out holds that is not this demo's (its own runs are still resumed)",
    )
    demo.set_defaults(handler=_demo_command)


def _train_command(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        results = train(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except (ValueError, TypeError, OSError) as error:  # bad input, a conflicting --out, missing data
        print(f"error: {error}", file=sys.stderr)
        return 2
    test, k = results["test"], max(config.ks)
    print(
        f"{config.model} {config.method}"
        + (f" density {config.density:g}" if config.method != "dense" else f" dim {config.dim}")
        + f": test recall@{k} {test[f'recall@{k}']:.4f}, ndcg@{k} {test[f'ndcg@{k}']:.4f} "
        f"(epoch {results['best_epoch']} "
        f"of {results['epochs_run']}); {results['parameters']} parameters, {results['bytes']} bytes "
        f"({results['bytes'] / results['dense_bytes']:.3f} of dense fp32); {results['seconds_per_epoch']:.2f} s/epoch"
    )
    print(f"wrote {args.out / 'results.json'} and plots")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    try:
        run_demo(args.out, overwrite=args.overwrite)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
