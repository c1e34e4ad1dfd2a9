"""`sparseapps continual run ...`: per-task isolated sparse subnetworks on a continual benchmark.

Example:
    sparseapps continual run --benchmark split-digits --sparsity 0.9 --init erk --growth random --out runs/x

writes ``runs/x/results.json`` (accuracy matrix ``R[i][j]``, ACC, BWT, forgetting, Avalanche's stream metrics,
task-agnostic accuracy, capacity per task and layer, seconds per task), ``runs/x/accuracy_matrix.png`` and
``runs/x/capacity.png``, with ``runs/x/checkpoint.pt`` after every task and every ``--checkpoint-every``
optimizer steps. The same command with ``--resume`` continues a killed run bit for bit (or prints the results of
a finished one); a second run into a directory that holds results is refused unless ``--resume`` or
``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparseapps.continual.checkpoint import DEFAULT_CHECKPOINT_EVERY, OUTPUTS
from sparseapps.continual.isolation import CAPACITIES, DISTRIBUTIONS, GROWTH, IsolationConfig

# The names of sparseapps.continual.benchmarks.BENCHMARK_NAMES (a test keeps them equal): importing that module
# imports Avalanche, which would slow every `sparseapps` command down by seconds.
BENCHMARK_CHOICES = (
    "split-digits",
    "permuted-digits",
    "rotated-digits",
    "split-mnist",
    "permuted-mnist",
    "split-cifar100",
)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 256,256, got {text!r}"
        ) from None
    return widths


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registers ``sparseapps continual run``."""
    parser = sub.add_parser("continual", help="continual learning with per-task sparse subnetworks")
    commands = parser.add_subparsers(dest="continual_command", required=True)
    run = commands.add_parser(
        "run",
        help="train a task-incremental stream with parameter isolation and dynamic sparse training",
        description="Train one isolated sparse subnetwork per task (Avalanche Naive + SparseIsolationPlugin) "
        "and write results.json, accuracy_matrix.png and capacity.png.",
    )
    run.add_argument("--benchmark", default="split-digits", choices=BENCHMARK_CHOICES, help="the stream")
    run.add_argument("--n-tasks", type=int, help="number of tasks (default: the benchmark's)")
    run.add_argument("--dataset-root", help="folder of the MNIST / CIFAR-100 files")
    run.add_argument("--sparsity", type=float, default=0.9, help="sparsity of each task's own subnetwork")
    run.add_argument("--init", default="erk", choices=DISTRIBUTIONS, help="per-layer budget: erk or uniform")
    run.add_argument(
        "--growth", default="random", choices=GROWTH, help="growth criterion (none: static masks)"
    )
    run.add_argument("--drop", default="magnitude", choices=("magnitude", "random"), help="drop criterion")
    run.add_argument("--drop-fraction", type=float, default=0.3, help="initial drop fraction (cosine decay)")
    run.add_argument(
        "--update-interval", type=int, default=20, help="optimizer steps between topology updates"
    )
    run.add_argument("--end-fraction", type=float, default=0.75, help="share of a task's steps with updates")
    run.add_argument(
        "--capacity", default="equal", choices=CAPACITIES, help="policy when the tasks do not fit the network"
    )
    run.add_argument("--dense-first-layer", action="store_true", help="first layer at its whole fair share")
    run.add_argument(
        "--forward-transfer", action="store_true", help="reuse earlier tasks' frozen weights (read-only)"
    )
    run.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="isolated backbone")
    run.add_argument("--hidden", type=_widths, default=(256, 256), help="MLP hidden widths, e.g. 256,256")
    run.add_argument("--channels", type=_widths, default=(32, 64), help="CNN channels, e.g. 32,64")
    run.add_argument("--cnn-hidden", type=int, default=128, help="CNN hidden layer width")
    run.add_argument("--batch-norm", action="store_true", help="CNN: per-task batch normalization")
    run.add_argument("--epochs", type=int, default=10, help="training epochs per task")
    run.add_argument("--batch-size", type=int, default=32, help="training mini-batch size")
    run.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    run.add_argument("--seed", type=int, default=0, help="seed of data split, model and masks")
    run.add_argument("--device", default="cpu", help="torch device")
    run.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (small models run fastest on 1)"
    )
    run.add_argument(
        "--no-task-agnostic", action="store_true", help="skip the evaluation without task labels"
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


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``sparseapps continual run``; returns the exit code."""
    from sparseapps.continual.train import ContinualRun, run_continual

    try:
        isolation = IsolationConfig(
            sparsity=args.sparsity,
            distribution=args.init,
            growth=args.growth,
            drop=args.drop,
            drop_fraction=args.drop_fraction,
            update_interval=args.update_interval,
            end_fraction=args.end_fraction,
            capacity=args.capacity,
            dense_first_layer=args.dense_first_layer,
            forward_transfer=args.forward_transfer,
            seed=args.seed,
        )
        run = ContinualRun(
            benchmark=args.benchmark,
            n_tasks=args.n_tasks,
            dataset_root=args.dataset_root,
            model=args.model,
            hidden=args.hidden,
            channels=args.channels,
            cnn_hidden=args.cnn_hidden,
            batch_norm=args.batch_norm,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            task_agnostic=not args.no_task_agnostic,
            isolation=isolation,
        )
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
    n = len(result["accuracy_matrix"])
    print(
        f"\n{args.benchmark}: {n} tasks, sparsity {args.sparsity} per task, {args.init}, growth {args.growth}"
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
    print(f"seconds per task (training): {', '.join(f'{s:.2f}' for s in result['train_seconds'])}")
    print("results in " + ", ".join(str(args.out / name) for name in OUTPUTS if (args.out / name).exists()))
    return 0
