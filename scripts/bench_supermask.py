"""Benchmark: edge-popup supermasks against dense training and random masks, and their shared-weight accuracy.

Per task, density and seed the same MLP (two hidden ReLU layers of 256, the width of the fully connected layers of
the paper's Conv2-Conv8) is built four ways; the three trained ones share the optimizer, schedule, batch size and
epochs (SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine to zero: the official edge-popup code's small-scale
recipe):

- ``dense``: every weight trained (no mask);
- ``edge-popup``: weights frozen at the signed Kaiming constant, scores trained (Ramanujan et al. 2020);
- ``edge-popup scaled``: the same with the init scaled to the layer's density (``scale_fan=True``);
- ``random mask``: the supermask network with its initial (untrained) scores: a random mask of the same density
  over the same frozen weights (no training).

For every edge-popup mask (and the random mask) the single-shared-weight accuracy of WANN (Gaier & Ha 2019) is
measured: all active weights set to one value ``w`` in ``-2, -1, -0.5, 0.5, 1, 2`` (WANN's values), accuracy per
``w`` and their mean. This is WANN's evaluation applied to edge-popup's masks, not WANN's topology search.

Data are fixed across seeds (MNIST-1D's published generator seed 42; digits split with seed 0); a seed sets the
weights, the scores and the batch order. Test accuracy after the last epoch (no selection on the test set).

- MNIST-1D (Greydanus & Kobak; ``sparseapps.core.mnist1d``): 4,000 / 1,000 signals of 40 points, MLP
  40-256-256-10. Dense MLP ~0.68 in the dataset's README (width 100).
- digits (scikit-learn, 8x8): 1,347 / 450, MLP 64-256-256-10 (``sparseapps.demo.make_mlp``).

Writes ``results.json`` (every run and the summary), ``results.md`` (with the CPU and the command) and
``accuracy_vs_density.png`` to ``--out``. Mean ± 95% CI half-width (Student's t over seeds).

    python scripts/bench_supermask.py --out docs/bench_supermask   # full grid: ~6-8 min on an idle core
    python scripts/bench_supermask.py --quick                       # tiny data, 2 seeds, 2 epochs: seconds
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.mnist1d import load_mnist1d, make_mnist1d_mlp
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.core.stats import confidence_half_width
from sparseapps.core.supermask import (
    WANN_WEIGHTS,
    edge_popup_optimizer,
    shared_weight_accuracy,
    to_supermask,
)
from sparseapps.demo import load_digits_tensors, make_mlp

TASKS = ("mnist1d-mlp", "digits-mlp")
DENSE, EDGE_POPUP, SCALED, RANDOM = "dense", "edge-popup", "edge-popup scaled", "random mask"
METHODS = (DENSE, EDGE_POPUP, SCALED, RANDOM)


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_supermask", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={"help": "600 MNIST-1D signals, 2 seeds, 2 epochs, densities 0.5 and 0.1: seconds"},
    )
    tasks: tuple[str, ...] = field(default=TASKS, metadata={"help": f"among {', '.join(TASKS)}"})
    densities: tuple[float, ...] = field(
        default=(0.5, 0.3, 0.1), metadata={"help": "fractions of weights used (the paper's k)"}
    )
    seeds: int = field(
        default=5, metadata={"help": "runs per point (seeds 0 .. seeds-1); at least 2 for a CI"}
    )
    hidden: int = field(default=256, metadata={"help": "width of the two hidden layers"})
    epochs: int = field(default=100, metadata={"help": "passes over the training split, every method alike"})
    batch_size: int = field(default=128, metadata={"help": "examples per step (the paper's 128)"})
    lr: float = field(
        default=0.1, metadata={"help": "SGD learning rate, cosine-decayed to 0 (the paper's 0.1)"}
    )
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "SGD weight decay (on the scores for edge-popup; official configs: 1e-4)"},
    )
    mnist1d_samples: int = field(
        default=5000, metadata={"help": "MNIST-1D examples, train + test (5000: the published 4000 / 1000)"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    data_root: str = field(
        default="",
        metadata={"help": "MNIST-1D cache root ('' = $SPARSEAPPS_DATA or ~/.cache/sparseapps/data)"},
    )

    def __post_init__(self) -> None:
        if not self.tasks or not set(self.tasks) <= set(TASKS):
            raise ValueError(f"expected tasks among {TASKS}, got {self.tasks}")
        if not self.densities or not all(0.0 < d <= 1.0 for d in self.densities):
            raise ValueError(f"expected densities in (0, 1], got {self.densities}")
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        for name in ("hidden", "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"expected lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


QUICK = {"seeds": 2, "epochs": 2, "densities": (0.5, 0.1), "mnist1d_samples": 600, "hidden": 64}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A dataset and the model trained on it: ``x_train [N, D]``, ``y_train [N]``, ``x_test``, ``y_test``."""

    name: str
    build: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_task(name: str, args: Args) -> Task:
    if name == "mnist1d-mlp":
        data = load_mnist1d(args.data_root or None, num_samples=args.mnist1d_samples)
        return Task(name, lambda: make_mnist1d_mlp(args.hidden), *data)
    return Task(name, lambda: make_mlp(args.hidden), *load_digits_tensors(0))


# ---------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    """One model's outcome; ``shared`` holds the accuracy per shared weight (supermask methods only)."""

    task: str
    method: str
    density: float
    seed: int
    test_accuracy: float
    train_accuracy: float
    shared: tuple[float, ...] | None
    seconds: float


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / len(x)


def fit(model: nn.Module, task: Task, seed: int, args: Args, supermask: bool) -> float:
    """Trains ``model`` (its scores when ``supermask``, else every parameter) and returns the seconds taken."""
    total_steps = args.epochs * -(-len(task.x_train) // args.batch_size)
    if supermask:
        optimizer, scheduler = edge_popup_optimizer(
            model, total_steps, lr=args.lr, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(task.x_train), generator=generator)
        for begin in range(0, len(order), args.batch_size):
            index = order[begin : begin + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(task.x_train[index]), task.y_train[index]).backward()
            optimizer.step()
            scheduler.step()
    return time.perf_counter() - start


def run(task: Task, method: str, density: float, seed: int, args: Args) -> Run:
    """Builds, trains (except the random mask) and evaluates one model."""
    torch.manual_seed(seed)
    model = task.build()
    seconds, shared = 0.0, None
    if method == DENSE:
        seconds = fit(model, task, seed, args, supermask=False)
    else:
        model = to_supermask(model, density, seed=seed, scale_fan=method == SCALED)
        if method != RANDOM:
            seconds = fit(model, task, seed, args, supermask=True)
        shared = shared_weight_accuracy(model, (task.x_test, task.y_test), WANN_WEIGHTS).accuracies
    return Run(
        task=task.name,
        method=method,
        density=density,
        seed=seed,
        test_accuracy=accuracy(model, task.x_test, task.y_test),
        train_accuracy=accuracy(model, task.x_train, task.y_train),
        shared=shared,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Point:
    """Means and 95% CI half-widths of a (task, method, density) over its seeds."""

    task: str
    method: str
    density: float
    seeds: int
    mean: float
    ci95: float
    train_mean: float
    shared_mean: float | None
    shared_ci95: float | None
    shared_per_weight: tuple[float, ...] | None
    seconds: float


def summarize(runs: list[Run]) -> list[Point]:
    groups: dict[tuple[str, str, float], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.task, r.method, r.density), []).append(r)
    points = []
    for (task, method, density), group in groups.items():
        test = [r.test_accuracy for r in group]
        shared = [r.shared for r in group if r.shared is not None]
        shared_means = [statistics.fmean(s) for s in shared]
        points.append(
            Point(
                task=task,
                method=method,
                density=density,
                seeds=len(group),
                mean=statistics.fmean(test),
                ci95=confidence_half_width(test),
                train_mean=statistics.fmean(r.train_accuracy for r in group),
                shared_mean=statistics.fmean(shared_means) if shared else None,
                shared_ci95=confidence_half_width(shared_means) if shared else None,
                shared_per_weight=tuple(statistics.fmean(column) for column in zip(*shared, strict=True))
                if shared
                else None,
                seconds=statistics.fmean(r.seconds for r in group),
            )
        )
    return points


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's words where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(args: Args, points: list[Point], command: str, seconds: float) -> str:
    """Per task: test accuracy per method and density (mean ± 95% CI), then the shared-weight accuracies."""
    lines = [
        f"# edge-popup supermasks ({args.seeds} seeds, {args.epochs} epochs, SGD lr {args.lr} momentum 0.9 "
        f"wd {args.weight_decay} cosine, batch {args.batch_size}, hidden {args.hidden})",
        "",
        f"Command: `{command}`  ",
        f"CPU: {cpu_name()} ({args.threads} torch thread(s)); torch {torch.__version__}; total {seconds:.0f} s.",
        "",
        "Test accuracy after the last epoch, mean ± 95% CI half-width over seeds (train accuracy in brackets). "
        "Shared weight: every active weight set to one value w in "
        f"{', '.join(f'{w:g}' for w in WANN_WEIGHTS)} (WANN's evaluation, not its search), mean over w.",
    ]
    densities = sorted(args.densities, reverse=True)
    for task in args.tasks:
        here = {(p.method, p.density): p for p in points if p.task == task}
        dense = here[(DENSE, 1.0)]
        header = ["method", *(f"density {d:g}" for d in densities), "s/run"]
        lines += ["", f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cell = f"{dense.mean:.3f} ± {dense.ci95:.3f} ({dense.train_mean:.2f})"
        lines.append(
            f"| {DENSE} (all weights) | " + " | ".join(cell for _ in densities) + f" | {dense.seconds:.1f} |"
        )
        for method in (EDGE_POPUP, SCALED, RANDOM):
            cells = [
                f"{p.mean:.3f} ± {p.ci95:.3f} ({p.train_mean:.2f})"
                for p in (here[(method, d)] for d in densities)
            ]
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {here[(method, densities[0])].seconds:.1f} |"
            )
        lines += ["", "Shared-weight accuracy (mean over w ± 95% CI over seeds; per w: mean over seeds):", ""]
        header = ["mask", "density", "mean over w", *(f"w={w:g}" for w in WANN_WEIGHTS)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in (EDGE_POPUP, SCALED, RANDOM):
            for d in densities:
                p = here[(method, d)]
                per_w = " | ".join(f"{a:.3f}" for a in p.shared_per_weight or ())
                lines.append(f"| {method} | {d:g} | {p.shared_mean:.3f} ± {p.shared_ci95:.3f} | {per_w} |")
    return "\n".join(lines) + "\n"


def plot(args: Args, points: list[Point], path: Path) -> None:
    """Top row: test accuracy vs density per task (error bars: 95% CI; dense dashed, its CI shaded). Bottom row:
    shared-weight accuracy vs w per edge-popup density."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(args.tasks), figsize=(5.5 * len(args.tasks), 8), squeeze=False)
    for column, task in enumerate(args.tasks):
        axis = axes[0][column]
        for method, marker in ((EDGE_POPUP, "o"), (SCALED, "s"), (RANDOM, "x")):
            line = sorted(
                (p for p in points if p.task == task and p.method == method), key=lambda p: p.density
            )
            axis.errorbar(
                [p.density for p in line], [p.mean for p in line], yerr=[p.ci95 for p in line],
                marker=marker, capsize=3, label=method,
            )  # fmt: skip
        line = sorted(
            (p for p in points if p.task == task and p.method == EDGE_POPUP), key=lambda p: p.density
        )
        axis.plot(
            [p.density for p in line], [p.shared_mean for p in line], marker="^", linestyle=":",
            label="edge-popup, shared weight (mean over w)",
        )  # fmt: skip
        dense = next(p for p in points if p.task == task and p.method == DENSE)
        axis.axhline(dense.mean, color="black", linestyle="--", linewidth=1, label="dense (trained weights)")
        axis.axhspan(dense.mean - dense.ci95, dense.mean + dense.ci95, color="black", alpha=0.08, linewidth=0)
        axis.set_title(task)
        axis.set_xlabel("density (fraction of weights used)")
        axis.set_ylabel("test accuracy")
        axis.legend(fontsize=7)
        axis = axes[1][column]
        for p in sorted(
            (p for p in points if p.task == task and p.method in (EDGE_POPUP, SCALED)),
            key=lambda p: p.density,
        ):
            axis.plot(
                WANN_WEIGHTS, p.shared_per_weight, marker="o", label=f"{p.method}, density {p.density:g}"
            )
        axis.set_xlabel("shared weight w")
        axis.set_ylabel("test accuracy")
        axis.set_title(f"{task}: all active weights = w")
        axis.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    if "OMP_NUM_THREADS" in os.environ:
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    with torch_threads(args.threads):
        run_grid(args, command)


def run_grid(args: Args, command: str) -> None:
    """Trains every point of the grid and writes the outputs (the body of :func:`main`)."""
    start = time.perf_counter()
    runs: list[Run] = []
    for task_name in args.tasks:
        task = load_task(task_name, args)
        grid = [(DENSE, 1.0)] + [(m, d) for m in (EDGE_POPUP, SCALED, RANDOM) for d in args.densities]
        for method, density in grid:
            group = [run(task, method, density, seed, args) for seed in range(args.seeds)]
            runs += group
            point = summarize(group)[0]
            shared = "" if point.shared_mean is None else f"  shared-weight mean {point.shared_mean:.3f}"
            print(
                f"{task_name:12s} {method:17s} {density:4.2f}  acc {point.mean:.3f} ± {point.ci95:.3f}"
                f"{shared}  {point.seconds:.1f} s/run",
                flush=True,
            )
    points = summarize(runs)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    write_json(
        out / "results.json",
        {
            "command": command,
            "args": asdict(args),
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "seconds": seconds,
            "shared_weights": list(WANN_WEIGHTS),
            "runs": [asdict(r) for r in runs],
            "points": [asdict(p) for p in points],
        },
    )
    text = markdown(args, points, command, seconds)
    write_atomic(out / "results.md", text.encode())
    plot(args, points, out / "accuracy_vs_density.png")
    print(
        f"\n{text}\nwrote {out / 'results.json'}, results.md and accuracy_vs_density.png in {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
