"""Benchmark: every sparsity preset at 90 / 95 / 98% on MNIST-1D (MLP, CNN) and digits, dense beside, over seeds.

For each task, method and sparsity, ``--seeds`` runs train the same model with the same optimizer (Adam by
default, as mnist1d's reference; ``--optimizer sgd`` for SGD with momentum), batch size and epochs. The table gives
the mean test accuracy and its 95% confidence interval (Student's t over seeds), the final forward FLOPs as a
fraction of dense, and the wall-clock seconds of a run (one thread by default). The data are fixed across seeds
(MNIST-1D's published generator seed 42; digits split with seed 0); a seed sets the initialization, the masks and
the batch order. Under each task's table, the methods whose interval lies wholly below the best method's interval
at that sparsity are named (the ones the benchmark separates), and the points a method cannot reach (n/a) with
the engine's reason. Measured here: dense 60 Adam epochs reach 0.65-0.67 (MLP) and 0.92 (CNN), 1-4 s a run.

- MNIST-1D (Greydanus & Kobak; ``sparseapps.core.mnist1d``, generated offline and cached): 4,000 / 1,000 signals
  of 40 points. Dense MLP 40-100-100-10 ~0.68, CNN ~0.94 (the dataset's README).
- digits (scikit-learn, 8x8): MLP 64-256-256-10, 1,347 / 450 (saturates near 0.97: a sanity row, not a judge).

Method-specific steps follow ``sparseapps.demo``: SNIP / GraSP / SynFlow prune at initialization on the first 256
training examples; the lottery ticket trains ``lottery_rounds + 1`` rounds of ``epochs // (rounds + 1)`` epochs
(at least one), pruning and rewinding between them.

Writes ``results.json`` (every run and the summary), ``results.md`` and ``accuracy_vs_sparsity.png`` to ``--out``.

    python scripts/bench_methods.py            # the full grid: ~700 runs of 1-4 s each on one core
    python scripts/bench_methods.py --quick    # a few presets, tiny data, one epoch: a smoke run of seconds
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import PRESETS, DynamicSparsity, SparsityConfig
from sparseapps.core.config import FORESIGHT_METHODS
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.mnist1d import load_mnist1d, make_mnist1d_cnn, make_mnist1d_mlp
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.core.stats import confidence_half_width, interval_verdict, paired_p_value
from sparseapps.demo import load_digits_tensors, make_mlp

TASKS = ("mnist1d-mlp", "mnist1d-cnn", "digits-mlp")
DENSE = "dense"
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_methods", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={"help": "three presets, 90% only, 2 seeds, 1 epoch on 600 MNIST-1D signals: seconds"},
    )
    tasks: tuple[str, ...] = field(default=TASKS, metadata={"help": f"among {', '.join(TASKS)}"})
    methods: tuple[str, ...] = field(
        default=tuple(sorted(PRESETS)), metadata={"help": "SparsityConfig presets (dense always runs beside)"}
    )
    sparsities: tuple[float, ...] = field(default=(0.9, 0.95, 0.98), metadata={"help": "fractions of zeros"})
    seeds: int = field(
        default=5, metadata={"help": "runs per point (seeds 0 .. seeds-1); at least 2 for a CI"}
    )
    first_seed: int = field(
        default=0,
        metadata={
            "help": "seeds run are first_seed .. first_seed + seeds - 1 (to add seeds to an earlier run)"
        },
    )
    epochs: int = field(default=60, metadata={"help": "passes over the training split, every method alike"})
    batch_size: int = field(default=100, metadata={"help": "examples per step (mnist1d's reference: 100)"})
    optimizer: str = field(
        default="adam", metadata={"help": "adam (mnist1d's reference) or sgd (momentum 0.9, the DST papers')"}
    )
    lr: float = field(default=0.01, metadata={"help": "learning rate (mnist1d's reference, Adam: 0.01)"})
    interval: int = field(
        default=0,
        metadata={
            "help": "steps between topology updates (dst) and pruning steps (gmp); 0 keeps each preset's"
        },
    )
    mnist1d_samples: int = field(
        default=5000, metadata={"help": "MNIST-1D examples, train + test (5000: the published 4000 / 1000)"}
    )
    threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1: comparable wall-clock on a shared machine)"}
    )
    combine: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "no training: merge the results.json of these output folders (e.g. one per task); "
            "FOLDER=LABEL appends LABEL to that folder's sparse methods (variants run without --label)"
        },
    )
    pairs: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "paired comparisons beside the registered ones, as METHOD:BASELINE (e.g. rigl+2of4:rigl), "
            "each mean and 95% CI of the per-seed differences"
        },
    )
    data_root: str = field(
        default="",
        metadata={"help": "MNIST-1D cache root ('' = $SPARSEAPPS_DATA or ~/.cache/sparseapps/data)"},
    )
    overrides: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "SparsityConfig fields set on every preset, as field=value (e.g. distribution=uniform "
            "drop_fraction=0.1): controls of a method without a new preset"
        },
    )
    label: str = field(
        default="",
        metadata={
            "help": "appended to each preset's name in the results (e.g. '+fisher' with --overrides grow=fisher), "
            "so a variant's rows merge beside the preset's with --combine"
        },
    )
    n_m: tuple[int, ...] = field(
        default=(),
        metadata={"help": "N:M structure of every preset, e.g. 2 4 (needs sparsity 1 - n/m); empty: none"},
    )
    validation: int = field(
        default=0,
        metadata={
            "help": "hold out the last N training examples and report accuracy on them instead of the test "
            "split, which is then not read (for choosing settings); 0: train on all, report test accuracy"
        },
    )

    def __post_init__(self) -> None:
        if not self.tasks or not set(self.tasks) <= set(TASKS):
            raise ValueError(f"expected tasks among {TASKS}, got {self.tasks}")
        # (merged folders name what they ran; a labelled variant is its preset's name + label)
        presets = {m.removesuffix(self.label) if self.label else m for m in self.methods}
        unknown = [] if self.combine else sorted(presets - set(PRESETS))
        if unknown:
            raise ValueError(f"expected methods among the presets {sorted(PRESETS)}, got unknown {unknown}")
        if not self.sparsities or not all(0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"expected sparsities in (0, 1), got {self.sparsities}")
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.first_seed < 0:
            raise ValueError(f"expected first_seed >= 0, got {self.first_seed}")
        if self.interval < 0:
            raise ValueError(f"expected interval >= 0, got {self.interval}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"expected optimizer in {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"expected lr > 0, got {self.lr}")
        malformed = [p for p in self.pairs if len(p.split(":")) != 2 or not all(p.split(":"))]
        if malformed:
            raise ValueError(f"expected pairs as METHOD:BASELINE, got {malformed}")
        config_overrides(self.overrides)  # names a malformed or unknown field now, not after hours of runs
        if self.n_m and len(self.n_m) != 2:
            raise ValueError(f"expected n_m as two integers n m (e.g. 2 4), got {self.n_m}")
        if self.validation < 0:
            raise ValueError(f"expected validation >= 0 held-out training examples, got {self.validation}")


def config_overrides(items: tuple[str, ...]) -> dict[str, object]:
    """``("drop_fraction=0.1", "distribution=uniform")`` as SparsityConfig fields, each value parsed as JSON when it
    is JSON (numbers, true/false) and kept as a string otherwise.

    Example:
        >>> config_overrides(("drop_fraction=0.1", "distribution=uniform", "end_fraction=0.9"))
        {'drop_fraction': 0.1, 'distribution': 'uniform', 'end_fraction': 0.9}
    """
    fields = {f.name for f in dataclasses.fields(SparsityConfig)}
    result: dict[str, object] = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or name not in fields:
            raise ValueError(f"expected overrides as field=value with a SparsityConfig field, got {item!r}")
        try:
            result[name] = json.loads(text)
        except json.JSONDecodeError:
            result[name] = text
    return result


QUICK = {
    "methods": ("rigl", "snip", "taylor"),
    "sparsities": (0.9,),
    "seeds": 2,
    "epochs": 1,
    "batch_size": 50,
    "interval": 2,
    "mnist1d_samples": 600,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A dataset and the model trained on it: ``x_train [N, ...]``, ``y_train [N]``, ``x_test``, ``y_test``."""

    name: str
    build: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_task(name: str, args: Args) -> Task:
    """``name``'s data and model; with ``args.validation`` the last examples of the training split stand in for
    the test split (which is dropped, so nothing chosen on them has seen a test example)."""
    if name.startswith("mnist1d"):
        data = load_mnist1d(args.data_root or None, num_samples=args.mnist1d_samples)
        build = make_mnist1d_mlp if name == "mnist1d-mlp" else make_mnist1d_cnn
        task = Task(name, build, *data)
    else:
        task = Task(name, lambda: make_mlp(256), *load_digits_tensors(0))
    return held_out(task, args.validation) if args.validation else task


def held_out(task: Task, count: int) -> Task:
    """``task`` trained on all but the last ``count`` training examples and evaluated on those.

    Example:
        >>> t = Task("t", nn.Identity, torch.arange(10.0), torch.arange(10), torch.zeros(3), torch.zeros(3))
        >>> v = held_out(t, 4)
        >>> v.x_train.tolist(), v.y_test.tolist()
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [6, 7, 8, 9])
    """
    if not 0 < count < len(task.x_train):
        raise ValueError(
            f"expected validation in [1, {len(task.x_train) - 1}] (task {task.name!r} has {len(task.x_train)} "
            f"training examples), got {count}"
        )
    cut = len(task.x_train) - count
    return Task(
        task.name, task.build, task.x_train[:cut], task.y_train[:cut], task.x_train[cut:], task.y_train[cut:]
    )


# ---------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    """One training run's outcome."""

    task: str
    method: str
    target_sparsity: float
    seed: int
    test_accuracy: float
    sparsity: float
    flops_fraction: float
    steps: int
    seconds: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + 1024]).argmax(1) == y[i : i + 1024]).sum()) for i in range(0, len(x), 1024)
        )
    model.train()
    return correct / len(x)


def train(task: Task, method: str, sparsity: float, seed: int, args: Args) -> Run:
    """Trains ``task``'s model with preset ``method`` (or dense) at ``sparsity`` and returns its :class:`Run`."""
    torch.manual_seed(seed)
    model = task.build()
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=args.lr)
        if args.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    )
    steps_per_epoch = -(-len(task.x_train) // args.batch_size)
    engine = None
    rounds = 1
    if method != DENSE:
        structure = {"n_m": args.n_m} if args.n_m else {}
        config = SparsityConfig.preset(
            method, sparsity=sparsity, seed=seed, **structure, **config_overrides(args.overrides)
        )
        if config.method == "lottery":
            rounds = config.lottery_rounds + 1
        if args.interval:
            config = config.replace(update_interval=args.interval, pruning_interval=args.interval)
        epochs_per_round = max(1, args.epochs // rounds)
        engine = DynamicSparsity(model, optimizer, config, total_steps=epochs_per_round * steps_per_epoch)
        if config.method in FORESIGHT_METHODS:
            engine.prune_at_initialization(task.x_train[:256], task.y_train[:256], F.cross_entropy)
    epochs_per_round = max(1, args.epochs // rounds) if rounds > 1 else args.epochs
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    start = time.perf_counter()
    for round_index in range(rounds):
        for _ in range(epochs_per_round):
            order = torch.randperm(len(task.x_train), generator=generator)
            for begin in range(0, len(order), args.batch_size):
                index = order[begin : begin + args.batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(task.x_train[index]), task.y_train[index]).backward()
                optimizer.step()
                steps += 1
        if engine is not None and round_index < rounds - 1:
            engine.next_lottery_round()
    seconds = time.perf_counter() - start
    if engine is not None:
        engine.finalize()  # learned masks (topkast, cs, sr_ste): fixed, weights theta * mask
    report = engine.report() if engine is not None else None
    return Run(
        task=task.name,
        method=method + args.label if engine is not None else method,
        target_sparsity=sparsity if engine is not None else 0.0,
        seed=seed,
        test_accuracy=accuracy(model, task.x_test, task.y_test),
        sparsity=1.0 - report.density if report is not None else 0.0,
        flops_fraction=report.flops_sparse / report.flops_dense if report is not None else 1.0,
        steps=steps,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Point:
    """Mean and 95% CI half-width of a (task, method, sparsity) over its seeds."""

    task: str
    method: str
    target_sparsity: float
    seeds: int
    mean: float
    ci95: float
    flops_fraction: float
    seconds: float

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def summarize(runs: list[Run]) -> list[Point]:
    groups: dict[tuple[str, str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.method, run.target_sparsity), []).append(run)
    return [
        Point(
            task=task,
            method=method,
            target_sparsity=sparsity,
            seeds=len(group),
            mean=statistics.fmean(r.test_accuracy for r in group),
            ci95=confidence_half_width([r.test_accuracy for r in group]),
            flops_fraction=statistics.fmean(r.flops_fraction for r in group),
            seconds=statistics.fmean(r.seconds for r in group),
        )
        for (task, method, sparsity), group in groups.items()
    ]


def separated(points: list[Point]) -> dict[tuple[str, float], tuple[str, list[str]]]:
    """Per (task, sparsity): the best method by mean and the methods whose CI lies wholly below the best's."""
    result = {}
    for key in sorted({(p.task, p.target_sparsity) for p in points if p.method != DENSE}):
        here = [p for p in points if (p.task, p.target_sparsity) == key and p.method != DENSE]
        best = max(here, key=lambda p: p.mean)
        result[key] = (best.method, sorted(p.method for p in here if p.high < best.low))
    return result


#: The registered comparisons (docs/bench_methods_registration.md): each pruning criterion against magnitude on the
#: same gradual schedule (gmp), paired by seed (same initialization and batch order). Movement pruning's claim
#: (Sanh et al. 2020) is that it beats magnitude at high sparsity. Addendum 3 adds the presets of session 9, each
#: against the method it refines on the same schedule: soft movement against hard movement and against magnitude
#: (gmp), OBS and SparseGPT against one-shot magnitude pruning, Top-KAST against RigL. Addendum 5: RigL with the
#: growth criteria of issues 18 and 19 (``--overrides grow=... --label +...``) against RigL.
REGISTERED_PAIRS = (
    ("movement", "gmp"),
    ("taylor", "gmp"),
    ("obd", "gmp"),
    ("soft_movement", "movement"),
    ("soft_movement", "gmp"),
    ("obs", "one_shot"),
    ("sparsegpt", "one_shot"),
    ("topkast", "rigl"),
    ("rigl+fisher", "rigl"),
    ("rigl+last_magnitude", "rigl"),
    ("rigl+dormant_gradient", "rigl"),
)


def paired_differences(
    runs: list[Run], pairs: tuple[tuple[str, str], ...] = REGISTERED_PAIRS
) -> list[dict[str, object]]:
    """Per registered pair, task and sparsity: mean of (method - baseline) test accuracy over the seeds both ran,
    its 95% CI half-width (Student's t over the paired differences) and whether the interval excludes 0.

    Example:
        >>> a = [Run(task="t", method="m", target_sparsity=0.9, seed=s, test_accuracy=0.6 + s / 100, sparsity=0.9,
        ...          flops_fraction=0.1, steps=1, seconds=1.0) for s in range(3)]
        >>> b = [Run(task="t", method="b", target_sparsity=0.9, seed=s, test_accuracy=0.5 + s / 100, sparsity=0.9,
        ...          flops_fraction=0.1, steps=1, seconds=1.0) for s in range(3)]
        >>> row = paired_differences(a + b, (("m", "b"),))[0]
        >>> round(row["mean"], 3), row["seeds"], row["verdict"]
        (0.1, 3, 'm better')
    """
    by_key = {(r.task, r.method, r.target_sparsity, r.seed): r.test_accuracy for r in runs}
    rows = []
    for method, baseline in pairs:
        for task, sparsity in sorted({(r.task, r.target_sparsity) for r in runs if r.method == method}):
            seeds = sorted(
                r.seed
                for r in runs
                if (r.task, r.method, r.target_sparsity) == (task, method, sparsity)
                and (task, baseline, sparsity, r.seed) in by_key
            )
            if len(seeds) < 2:
                continue
            diffs = [
                by_key[(task, method, sparsity, s)] - by_key[(task, baseline, sparsity, s)] for s in seeds
            ]
            mean, half = statistics.fmean(diffs), confidence_half_width(diffs)
            verdict = interval_verdict(
                (mean - half, mean + half), f"{method} better", f"{baseline} better", "no difference"
            )
            rows.append(
                {
                    "method": method,
                    "baseline": baseline,
                    "task": task,
                    "sparsity": sparsity,
                    "seeds": len(seeds),
                    "mean": mean,
                    "ci95": half,
                    "p": paired_p_value(diffs),
                    "verdict": verdict,
                }
            )
    return rows


def markdown(
    args: Args, points: list[Point], skipped: list[dict[str, object]], paired: list[dict[str, object]] = ()
) -> str:
    """One table per task: a row per method, a column per sparsity (mean ± 95% CI), dense beside; a point the
    method cannot reach reads n/a, with the reason below the table."""
    sparsities = sorted(args.sparsities)
    evaluated = (
        f"**Validation** accuracy (the last {args.validation} training examples held out; the test split not read)"
        if args.validation
        else "Test accuracy"
    )
    lines = [
        f"# Sparse methods on MNIST-1D and digits ({args.seeds} seeds, {args.epochs} epochs, {args.optimizer} lr {args.lr}, "
        f"batch {args.batch_size})",
        "",
        f"{evaluated}, mean ± 95% CI half-width over seeds; FLOPs: final forward FLOPs / dense at the highest "
        "sparsity; s: seconds per run at that sparsity.",
    ]
    gaps = separated(points)
    for task in args.tasks:
        here = {(p.method, p.target_sparsity): p for p in points if p.task == task}
        dense = here.get((DENSE, 0.0))
        header = ["method", *(f"{s:.0%}" for s in sparsities), "FLOPs", "s"]
        lines += ["", f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        if dense is not None:
            cell = f"{dense.mean:.3f} ± {dense.ci95:.3f}"
            lines.append(
                f"| {DENSE} | " + " | ".join(cell for _ in sparsities) + f" | 1.00 | {dense.seconds:.2f} |"
            )
        attempted = {m for m, _ in here} | {k["method"] for k in skipped if k["task"] == task}
        for method in (m for m in args.methods if m in attempted):  # a merged run may skip a task entirely
            cells = [
                f"{p.mean:.3f} ± {p.ci95:.3f}" if (p := here.get((method, s))) else "n/a" for s in sparsities
            ]
            last = here.get((method, sparsities[-1]))
            tail = f"{last.flops_fraction:.2f} | {last.seconds:.2f}" if last else "– | –"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {tail} |")
        lines.append("")
        for s in sparsities:
            if (task, s) in gaps:
                best, below = gaps[(task, s)]
                named = ", ".join(below) if below else "none"
                lines.append(f"- {s:.0%}: best {best}; CI wholly below the best's: {named}")
        for skip in skipped:
            if skip["task"] == task:
                lines.append(f"- n/a: {skip['method']} at {skip['sparsity']:.0%}: {skip['reason']}")
    if paired:
        lines += [
            "",
            "## Paired comparisons (REGISTERED_PAIRS, docs/bench_methods_registration.md; and --pairs)",
            "",
            f"Paired by seed: mean of (method - baseline) {'validation' if args.validation else 'test'} accuracy, "
            "95% CI of the paired differences.",
            "",
            "| method | baseline | task | sparsity | seeds | difference | p (paired t) | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in paired:
            lines.append(
                f"| {row['method']} | {row['baseline']} | {row['task']} | {row['sparsity']:.0%} | {row['seeds']} | "
                f"{row['mean']:+.3f} ± {row['ci95']:.3f} | {row['p']:.3g} | {row['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def plot(args: Args, points: list[Point], path: Path) -> None:
    """Accuracy vs sparsity, one panel per task, one line per method (error bars: 95% CI), dense dashed (its CI
    shaded)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(5 * len(args.tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], args.tasks, strict=True):
        for index, method in enumerate(args.methods):
            line = sorted(
                (p for p in points if p.task == task and p.method == method), key=lambda p: p.target_sparsity
            )
            if line:
                axis.errorbar(
                    [p.target_sparsity for p in line],
                    [p.mean for p in line],
                    yerr=[p.ci95 for p in line],
                    marker="o",
                    capsize=3,
                    color=plt.get_cmap("tab20")(
                        index % 20
                    ),  # 15+ presets: the default cycle repeats after 10
                    label=method,
                )
        dense = [p for p in points if p.task == task and p.method == DENSE]
        if dense:
            axis.axhline(dense[0].mean, color="black", linestyle="--", linewidth=1, label=DENSE)
            axis.axhspan(dense[0].low, dense[0].high, color="black", alpha=0.08, linewidth=0)
        axis.set_title(task)
        axis.set_xlabel("sparsity")
        axis.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with torch_threads(args.threads):
        run_grid(args)


def run_grid(args: Args) -> None:
    """Trains every point of the grid and writes the outputs (the body of :func:`main`)."""
    start = time.perf_counter()
    runs: list[Run] = []
    skipped: list[dict[str, object]] = []
    seen: set[tuple[str, str, float, int]] = set()
    evaluated_on: dict[int, str] = {}
    for entry in args.combine:
        folder, _, suffix = entry.partition("=")
        saved = json.loads((Path(folder) / "results.json").read_text())
        evaluated_on.setdefault(int(saved["args"].get("validation", 0)), folder)
        if len(evaluated_on) > 1:
            raise ValueError(
                f"expected folders evaluated on one split, got {folder!r} (validation "
                f"{saved['args'].get('validation', 0)}) beside {sorted(evaluated_on.items())}"
            )
        for run in (Run(**r) for r in saved["runs"]):
            if suffix and run.method != DENSE:
                run = replace(run, method=run.method + suffix)
            key = (run.task, run.method, run.target_sparsity, run.seed)
            if (
                key not in seen
            ):  # a folder that re-ran a point (e.g. dense beside an added preset): first one kept
                seen.add(key)
                runs.append(run)
        skipped += [k for k in saved["skipped"] if k not in skipped]
    if args.combine:  # the tables cover what the folders hold, in the order of the defaults
        present = {r.task for r in runs}
        args = replace(
            args,
            validation=next(iter(evaluated_on)),
            tasks=tuple(t for t in TASKS if t in present),
            methods=tuple(sorted({r.method for r in runs} - {DENSE})),
            sparsities=tuple(sorted({r.target_sparsity for r in runs} - {0.0})),
        )
    for task_name in () if args.combine else args.tasks:
        task = load_task(task_name, args)
        grid = [(DENSE, 0.0)] + [(m, s) for m in args.methods for s in args.sparsities]
        for method, sparsity in grid:
            try:
                group = [
                    train(task, method, sparsity, seed, args)
                    for seed in range(args.first_seed, args.first_seed + args.seeds)
                ]
            except ValueError as error:  # a method that cannot reach this sparsity here (e.g. SRigL's fan-in)
                skipped.append(
                    {"task": task_name, "method": method, "sparsity": sparsity, "reason": str(error)}
                )
                print(f"{task_name:12s} {method:10s} {sparsity:5.0%}  n/a: {error}", flush=True)
                continue
            runs += group
            point = summarize(group)[0]
            print(
                f"{task_name:12s} {method:10s} {sparsity:5.0%}  acc {point.mean:.3f} ± {point.ci95:.3f}  "
                f"flops {point.flops_fraction:.2f}  {point.seconds:.2f} s/run",
                flush=True,
            )
    if args.label:  # the tables name the labelled variants
        args = replace(args, methods=tuple(m + args.label for m in args.methods))
    points = summarize(runs)
    paired = paired_differences(runs, REGISTERED_PAIRS + tuple(tuple(p.split(":")) for p in args.pairs))
    out = Path(args.out)
    write_json(
        out / "results.json",
        {
            "args": asdict(args),
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "runs": [asdict(r) for r in runs],
            "paired": paired,
            "points": [asdict(p) for p in points],
            "skipped": skipped,
        },
    )
    text = markdown(args, points, skipped, paired) + f"\nCPU: {cpu_model()}; torch {torch.__version__}.\n"
    write_atomic(out / "results.md", text.encode())
    plot(args, points, out / "accuracy_vs_sparsity.png")
    print(
        f"\n{text}\nwrote {out / 'results.json'}, results.md and accuracy_vs_sparsity.png "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
