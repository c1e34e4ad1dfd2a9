"""Benchmark: a compact sparse output layer over 100k classes trains under a memory cap the dense layer exceeds.

On the synthetic extreme-classification task of ``sparseapps.core.extreme`` (Zipf class frequencies, clusters of
classes, noisy prototypes seen through a fixed random projection), the classifier ``in -> hidden (dense, ReLU) ->
C`` is trained with Adam and the full softmax. Every run is a fresh process (``spawn``), so its memory is its own;
the peak RSS is read from ``/proc/self/status`` with ``scripts/bench_recsys.py``'s helpers (``VmHWM``, reset after
the data is drawn), the whole process's peak being the larger of the data phase and the training phase (building,
training and evaluation).

1. Memory at ``--classes`` (default 100k, hidden 512), for ``--memory-steps`` steps with topology updates inside
   them: the dense output layer; the engine's SRigL (``srigl``: compact, constant fan-in, updates on dense views);
   RigL (compact, updates on the active entries, no fan-in constraint). ``srigl_entries`` (SRigL's decisions on
   the active entries, ``extreme.OutputFanInUpdates``) is measured in its accuracy runs of part 2. Each peak is
   reported against ``--memory-cap-mb``.
2. Accuracy (mean ± 95% CI over ``--seeds``, Student's t): ``srigl_entries`` at ``--classes``; dense,
   ``srigl_entries`` and RigL at ``--small-classes``. Test top-1 / top-5 and top-1 on head classes (the most
   frequent, half the probability mass) and tail classes.

Writes ``results.json``, ``results.md`` and ``peaks.png`` to ``--out``. Samples/s are printed and recorded too; on a
shared machine they are indicative only.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_extreme.py --out /tmp/extreme      # ~20 min on 2 cores
    .venv/bin/python scripts/bench_extreme.py --quick --out /tmp/extreme_quick          # ~1 min: a smoke run
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sparseapps.core.extreme import ExtremeConfig, ExtremeTask, make_extreme_data, train_extreme
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.options import parse_config
from sparseapps.core.plotting import pyplot, save_figure
from sparseapps.core.stats import confidence_half_width

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recsys import _memory_mb, _reset_peak_memory  # scripts/ is not a package

MB = 2**20


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_extreme", metadata={"help": "output folder"})
    quick: bool = field(
        default=False, metadata={"help": "small class counts, few steps, 2 seeds: a smoke run"}
    )
    classes: int = field(default=100_000, metadata={"help": "the extreme class count C"})
    small_classes: int = field(default=10_000, metadata={"help": "the class count where dense fits"})
    hidden: int = field(default=512, metadata={"help": "width of the dense intermediate layer"})
    sparsity: float = field(default=0.95, metadata={"help": "sparsity of the compact output layer"})
    steps: int = field(default=400, metadata={"help": "training steps of the accuracy runs"})
    batch_size: int = field(default=128, metadata={"help": "examples per step"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate"})
    update_interval: int = field(default=50, metadata={"help": "steps between topology updates"})
    seeds: int = field(
        default=3, metadata={"help": "runs per accuracy row (seeds 0 .. seeds-1); >= 2 for a CI"}
    )
    n_train: int = field(default=200_000, metadata={"help": "training examples of the task"})
    n_test: int = field(default=10_000, metadata={"help": "test examples of the task"})
    memory_cap_mb: float = field(
        default=1500.0, metadata={"help": "the stated cap on the process's peak RSS"}
    )
    memory_steps: int = field(
        default=30, metadata={"help": "steps of the memory-only runs at --classes (dense, srigl, rigl)"}
    )
    workers: int = field(default=2, metadata={"help": "fresh processes running at once (one thread each)"})
    threads: int = field(default=1, metadata={"help": "torch threads per process"})

    def __post_init__(self) -> None:
        for name in (
            "classes",
            "small_classes",
            "hidden",
            "steps",
            "batch_size",
            "update_interval",
            "n_train",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("n_test", "memory_steps", "workers", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"expected sparsity in (0, 1), got {self.sparsity}")
        if not self.memory_cap_mb > 0:
            raise ValueError(f"expected memory_cap_mb > 0, got {self.memory_cap_mb}")


QUICK = {
    "classes": 4000,
    "small_classes": 1000,
    "hidden": 64,
    "steps": 60,
    "update_interval": 20,
    "seeds": 2,
    "n_train": 8000,
    "n_test": 1000,
    "memory_steps": 6,
    "memory_cap_mb": 4000.0,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


@dataclass(frozen=True)
class Job:
    """One run in a fresh process."""

    role: str  # "accuracy" or "memory"
    task: ExtremeTask
    config: ExtremeConfig
    threads: int


def run_job(job: Job) -> dict[str, Any]:
    """Draws the task, trains and evaluates; returns the result with the process's peaks (run in a fresh process)."""
    torch.set_num_threads(job.threads)
    rss_start = _memory_mb("VmRSS")
    data = make_extreme_data(job.task)
    peak_data = _memory_mb("VmHWM")
    rss_data = _memory_mb("VmRSS")
    reset = _reset_peak_memory()
    result = train_extreme(data, job.config)
    peak_training = _memory_mb("VmHWM")
    return {
        "role": job.role,
        **result.to_dict(),
        "rss_after_imports_mb": rss_start,
        "data_mb": data.nbytes() / MB,
        "rss_after_data_mb": rss_data,
        "peak_rss_data_mb": peak_data,
        "peak_rss_training_mb": peak_training if reset else float("nan"),
        "peak_rss_process_mb": max(peak_data, peak_training),
        "peak_reset": reset,
    }


def run_jobs(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Each job in its own fresh ``spawn`` process (``maxtasksperchild=1``), ``workers`` at once, in order."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        results = []
        for job, result in zip(jobs, pool.imap(run_job, jobs), strict=True):
            print(
                f"  {job.role:8s} {job.config.method:6s} C={job.task.n_classes:>7,} seed {job.config.seed}: "
                f"top-1 {result['top1']:.3f} top-5 {result['top5']:.3f} (head {result['head_top1']:.3f}, tail "
                f"{result['tail_top1']:.3f}); fan-in {result['fan_in_min']}-{result['fan_in_max']}; peak RSS "
                f"{result['peak_rss_process_mb']:,.0f} MB; {result['samples_per_second']:,.0f} samples/s",
                flush=True,
            )
            results.append(result)
    return results


def plan(args: Args) -> list[Job]:
    """The memory-only runs at ``classes`` (dense, engine SRigL, RigL), then the accuracy runs (``srigl_entries`` at
    ``classes``; dense, ``srigl_entries`` and RigL at ``small_classes``), seeds innermost."""

    def task(classes: int) -> ExtremeTask:
        return ExtremeTask(n_classes=classes, n_train=args.n_train, n_test=args.n_test)

    base = ExtremeConfig(
        hidden=args.hidden,
        sparsity=args.sparsity,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        update_interval=args.update_interval,
    )
    short = replace(base, steps=args.memory_steps, update_interval=max(1, args.memory_steps // 3))
    jobs = [
        Job("memory", task(args.classes), replace(short, method=method), args.threads)
        for method in ("dense", "srigl", "rigl")
    ]
    rows = [(args.classes, "srigl_entries")]
    rows += [
        (args.small_classes, "dense"),
        (args.small_classes, "srigl_entries"),
        (args.small_classes, "rigl"),
    ]
    for classes, method in rows:
        for seed in range(args.seeds):
            jobs.append(Job("accuracy", task(classes), replace(base, method=method, seed=seed), args.threads))
    return jobs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (role, method, classes): means and 95% CI half-widths of the metrics, the largest peaks, fan-in range."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["role"], run["method"], run["n_classes"]), []).append(run)
    rows = []
    for (role, method, classes), group in groups.items():
        row: dict[str, Any] = {"role": role, "method": method, "n_classes": classes, "seeds": len(group)}
        for metric in ("top1", "top5", "head_top1", "tail_top1", "samples_per_second"):
            values = [r[metric] for r in group]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_ci95"] = confidence_half_width(values)
        for peak in ("peak_rss_process_mb", "peak_rss_data_mb", "peak_rss_training_mb", "rss_after_data_mb"):
            row[peak] = max(r[peak] for r in group)
        row["output_state_mb"] = max(r["output_state_bytes"] for r in group) / MB
        row["fan_in"] = (min(r["fan_in_min"] for r in group), max(r["fan_in_max"] for r in group))
        row["empty_classes"] = max(r["empty_classes"] for r in group)
        row["topology_updates"] = group[0]["topology_updates"]
        row["update_path"] = group[0]["update_path"]
        row["steps"] = group[0]["steps"]
        row["head_classes"] = group[0]["head_classes"]
        rows.append(row)
    return rows


def dense_output_state_mb(classes: int, hidden: int) -> float:
    """Weights + gradients + Adam's two moments of a dense ``[C, hidden]`` float32 output layer (bias included)."""
    return 4 * classes * (hidden + 1) * 4 / MB


def format_markdown(args: Args, rows: list[dict[str, Any]], command: str) -> str:
    """The memory table (against the cap) and the accuracy table."""
    lines = [
        "# bench_extreme",
        "",
        f"CPU: {cpu_model()}; {args.threads} torch thread(s) per process, {args.workers} processes at once "
        "(shared machine: samples/s are indicative only).",
        "",
        f"Command: `{command}`",
        "",
        f"Task: C classes, Zipf(1) frequencies, clusters of 100 classes, latent 32 -> input 128; "
        f"{args.n_train:,} training / {args.n_test:,} test examples. Model: 128 -> {args.hidden} (dense, ReLU) -> "
        f"C, Adam lr {args.lr}, batch {args.batch_size}, full softmax; compact output layer at sparsity "
        f"{args.sparsity}.",
        "",
        f"## Memory (cap: {args.memory_cap_mb:,.0f} MB peak RSS of the whole process)",
        "",
        "| run | C | steps | output layer state MB | peak RSS data MB | peak RSS training MB | peak RSS process MB "
        "| under the cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["n_classes"] != args.classes:
            continue
        name = f"{row['method']} ({row['role']}, {row['update_path']})"
        fits = "yes" if row["peak_rss_process_mb"] <= args.memory_cap_mb else "**no**"
        lines.append(
            f"| {name} | {row['n_classes']:,} | {row['steps']} | {row['output_state_mb']:,.1f} | "
            f"{row['peak_rss_data_mb']:,.0f} | {row['peak_rss_training_mb']:,.0f} | "
            f"{row['peak_rss_process_mb']:,.0f} | {fits} |"
        )
    lines += [
        "",
        f"Dense output layer state by formula (weights, gradients, Adam's two moments): "
        f"{dense_output_state_mb(args.classes, args.hidden):,.1f} MB at C = {args.classes:,}.",
        "",
        f"## Test accuracy (mean ± 95% CI over {args.seeds} seeds, {args.steps} steps)",
        "",
        "| method | C | top-1 | top-5 | head top-1 | tail top-1 | head classes | fan-in (min-max) | classes "
        "without weights | peak RSS MB | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["role"] != "accuracy":
            continue

        def cell(metric: str, row: dict[str, Any] = row) -> str:
            return f"{row[metric]:.3f} ± {row[metric + '_ci95']:.3f}"

        lines.append(
            f"| {row['method']} | {row['n_classes']:,} | {cell('top1')} | {cell('top5')} | {cell('head_top1')} | "
            f"{cell('tail_top1')} | {row['head_classes']} | {row['fan_in'][0]}-{row['fan_in'][1]} | "
            f"{row['empty_classes']} | {row['peak_rss_process_mb']:,.0f} | {row['samples_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(args: Args, rows: list[dict[str, Any]], path: Path) -> None:
    """Peak RSS of the runs at ``classes`` against the cap."""
    plt = pyplot()
    chosen = [row for row in rows if row["n_classes"] == args.classes]
    fig, axis = plt.subplots(figsize=(6, 3.5))
    labels = [f"{row['method']}\n({'compact' if row['method'] != 'dense' else 'dense'})" for row in chosen]
    peaks = [row["peak_rss_process_mb"] for row in chosen]
    colors = ["tab:green" if p <= args.memory_cap_mb else "tab:red" for p in peaks]
    axis.bar(labels, peaks, color=colors)
    axis.axhline(args.memory_cap_mb, color="black", linestyle="--", label=f"cap {args.memory_cap_mb:,.0f} MB")
    axis.set_ylabel("peak RSS of the process (MB)")
    axis.set_title(f"C = {args.classes:,} classes, hidden {args.hidden}")
    axis.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["scripts/bench_extreme.py", *(sys.argv[1:] if argv is None else argv)])
    jobs = plan(args)
    print(f"{len(jobs)} runs, each in a fresh process, {args.workers} at once", flush=True)
    runs = run_jobs(jobs, args.workers)
    rows = summarize(runs)
    goals = []
    for row in rows:
        if row["n_classes"] == args.classes:
            fits = row["peak_rss_process_mb"] <= args.memory_cap_mb
            goals.append(
                f"cap {args.memory_cap_mb:,.0f} MB: {row['method']} at C = {args.classes:,} peaked at "
                f"{row['peak_rss_process_mb']:,.0f} MB -> {'fits' if fits else 'does NOT fit'}"
            )
    print("\n" + "\n".join(goals))
    report = {
        "args": asdict(args),
        "command": command,
        "cpu": cpu_model(),
        "dense_output_state_mb_by_formula": dense_output_state_mb(args.classes, args.hidden),
        "goals": goals,
        "rows": rows,
        "runs": runs,
    }
    write_json(out / "results.json", report)
    text = format_markdown(args, rows, command)
    write_atomic(out / "results.md", text.encode())
    plot(args, rows, out / "peaks.png")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
