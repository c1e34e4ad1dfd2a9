"""Benchmark: structured pruning that shrinks layers (``sparseapps.core.shrink``) on MNIST-1D, over seeds.

Per seed, four dense models are trained as ``scripts/bench_methods.py`` trains them (Adam lr 0.01, batch 100,
60 epochs): the MLP 40-100-100-10, mnist1d's CNN (three Conv1d of 25 channels and a linear head), and the same CNN
with a BatchNorm after each convolution ("bn-cnn"), once plainly and once with network slimming's L1 penalty on the
BatchNorm scales ("bn-cnn-slim", once per ``--slimming-lambdas``). From each, 50% and 75% of the hidden units are removed by
every criterion that applies (per layer; ``bn_scale`` across layers as Liu et al. do, and per layer under the label
``bn_scale_layer``); the model is physically shrunk, fine-tuned ``--finetune-epochs`` epochs (fresh Adam,
``--finetune-lr``) and tested. Merging (Srinivas & Babu) runs on the models without BatchNorm. The data-driven
criteria score ``--calibration`` training examples.

Reported per (task, method, ratio): test accuracy right after pruning and after fine-tuning (mean and 95% CI over
seeds, Student's t), parameters and forward FLOPs as fractions of dense, and the measured CPU inference time of the
shrunk model over the dense one at batch 1 and 256 (seed 0's models; per repeat, the two are timed back to back
in alternating order; the ratio of the medians). Writes ``results.json`` and ``results.md`` (with the CPU model and
the command) to ``--out``.

    OMP_NUM_THREADS=1 python scripts/bench_structured.py --out docs/bench_structured   # ~9 min, one shared core
    python scripts/bench_structured.py --quick --out /tmp/structured                   # a smoke run of seconds
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import accounting
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.mnist1d import (
    MNIST1D_CLASSES,
    MNIST1D_LENGTH,
    load_mnist1d,
    make_mnist1d_cnn,
    make_mnist1d_mlp,
)
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.shrink import UNIT_CRITERIA, merge_similar_units, prune_units, slimming_penalty
from sparseapps.core.stats import confidence_half_width

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import accuracy  # scripts/ is not a package

DENSE = "dense"
MERGE = "merge"
METHODS = {
    "mlp": ("l1", "taylor", "activation_mean", "activation_variance", MERGE),
    "cnn": ("l1", "taylor", "activation_mean", "activation_variance", MERGE),
    "bn-cnn": ("bn_scale", "bn_scale_layer", "l1", "taylor"),
    "bn-cnn-slim": ("bn_scale", "bn_scale_layer", "l1", "taylor"),
}
SCOPED = {
    "bn_scale_layer": ("bn_scale", "layer")
}  # a label for a criterion at another scope than its default
TASKS = tuple(METHODS)


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_structured", metadata={"help": "output folder"})
    quick: bool = field(
        default=False, metadata={"help": "2 seeds, 1 epoch, 600 signals, few timing repeats: a smoke run"}
    )
    tasks: tuple[str, ...] = field(default=TASKS, metadata={"help": f"among {', '.join(TASKS)}"})
    ratios: tuple[float, ...] = field(
        default=(0.5, 0.75), metadata={"help": "fractions of hidden units removed, each in (0, 1)"}
    )
    seeds: int = field(
        default=5, metadata={"help": "runs per point (seeds 0 .. seeds-1); at least 2 for a CI"}
    )
    epochs: int = field(default=60, metadata={"help": "dense training epochs (bench_methods.py's default)"})
    batch_size: int = field(default=100, metadata={"help": "examples per step (bench_methods.py's default)"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate of dense training"})
    finetune_epochs: int = field(default=10, metadata={"help": "fine-tuning epochs after pruning"})
    finetune_lr: float = field(default=0.01, metadata={"help": "Adam learning rate of fine-tuning"})
    calibration: int = field(
        default=1000, metadata={"help": "training examples scored by the data-driven criteria"}
    )
    slimming_lambdas: tuple[float, ...] = field(
        default=(1e-4, 1e-2),
        metadata={"help": "bn-cnn-slim's L1 weights on BatchNorm scales, one model each (Liu et al.: 1e-4)"},
    )
    mnist1d_samples: int = field(default=5000, metadata={"help": "MNIST-1D examples, train + test"})
    timing_repeats: int = field(default=21, metadata={"help": "interleaved timing repeats per model pair"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    data_root: str = field(default="", metadata={"help": "MNIST-1D cache root ('' = the default)"})

    def __post_init__(self) -> None:
        if not self.tasks or not set(self.tasks) <= set(TASKS):
            raise ValueError(f"expected tasks among {TASKS}, got {self.tasks}")
        if not self.ratios or not all(0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"expected ratios in (0, 1), got {self.ratios}")
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        for name in ("epochs", "batch_size", "finetune_epochs", "calibration", "timing_repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")
        if not self.slimming_lambdas or not all(lam >= 0 for lam in self.slimming_lambdas):
            raise ValueError(f"expected slimming_lambdas >= 0, got {self.slimming_lambdas}")


QUICK = {
    "seeds": 2,
    "epochs": 1,
    "finetune_epochs": 1,
    "batch_size": 50,
    "calibration": 100,
    "mnist1d_samples": 600,
    "timing_repeats": 3,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


# ---------------------------------------------------------------------------------------------- models
class Mnist1DBatchNormCNN(nn.Module):
    """mnist1d's CNN with a ``BatchNorm1d`` after each (bias-free) convolution, for network slimming.

    ``[B, 40] -> [B, 1, 40] -> [B, C, 19] -> [B, C, 10] -> [B, C, 5] -> [B, 5C] -> [B, 10]``.
    """

    def __init__(self, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(channels)
        self.head = nn.Linear(channels * 5, MNIST1D_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 40] -> [B, 10]`` logits."""
        h = torch.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.bn3(self.conv3(h)))
        return self.head(h.flatten(1))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": make_mnist1d_mlp,
    "cnn": make_mnist1d_cnn,
    "bn-cnn": Mnist1DBatchNormCNN,
    "bn-cnn-slim": Mnist1DBatchNormCNN,
}


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    slimming_lambda: float = 0.0,
) -> None:
    """Adam on cross-entropy (plus the slimming penalty when ``slimming_lambda > 0``), in place."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            if slimming_lambda > 0:
                loss = loss + slimming_penalty(model, slimming_lambda)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


# ---------------------------------------------------------------------------------------------- measures
def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module) -> int:
    """Forward FLOPs of one MNIST-1D example through every Linear and Conv (multiply-adds as 2)."""
    total = 0

    def count(module: nn.Module, _: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        positions = output[0, 0].numel() if isinstance(module, nn.Conv1d | nn.Conv2d) else 1
        shape = tuple(module.weight.shape)
        total += accounting.forward_flops("linear", shape, module.weight.numel(), positions)

    handles = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, MNIST1D_LENGTH))
    for handle in handles:
        handle.remove()
    model.train(was_training)
    return total


def time_pair(dense: nn.Module, small: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per forward of ``dense`` and ``small`` on ``x``, timed back to back in alternating order.

    Each sample times as many calls as make about 5 ms of the dense model (one call timed after a warm-up).
    """
    dense.eval()
    small.eval()
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (dense, small)
    with torch.inference_mode():
        for model in models:
            for _ in range(3):
                model(x)
        start = time.perf_counter()
        dense(x)
        calls = max(1, round(0.005 / (time.perf_counter() - start)))
        for repeat in range(repeats):
            for which in (0, 1) if repeat % 2 == 0 else (1, 0):
                start = time.perf_counter()
                for _ in range(calls):
                    models[which](x)
                times[which].append((time.perf_counter() - start) / calls)
    return statistics.median(times[0]), statistics.median(times[1])


# ---------------------------------------------------------------------------------------------- the grid
def variants(args: Args) -> list[tuple[str, str, float]]:
    """``(label, task, slimming lambda)`` per model to train: bn-cnn-slim once per lambda, the others once."""
    return [
        (f"{task} (lambda {lam:g})", task, lam) if task == "bn-cnn-slim" else (task, task, 0.0)
        for task in args.tasks
        for lam in (args.slimming_lambdas if task == "bn-cnn-slim" else (0.0,))
    ]


def run_task(
    label: str, task: str, penalty: float, seed: int, data: tuple[torch.Tensor, ...], args: Args
) -> list[dict[str, object]]:
    """Trains ``task``'s dense model with ``seed`` (and slimming ``penalty``), then prunes, fine-tunes and
    measures it by every method; the records name it ``label``."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    dense = BUILDERS[task]()
    generator = torch.Generator().manual_seed(seed)
    train(
        dense,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        generator=generator,
        slimming_lambda=penalty,
    )
    dense_accuracy = accuracy(dense, x_test, y_test)
    dense_parameters, dense_flops = parameters(dense), forward_flops(dense)
    chosen = torch.randperm(len(x_train), generator=generator)[: args.calibration]
    batches = [
        (x_train[chosen[i : i + 250]], y_train[chosen[i : i + 250]]) for i in range(0, len(chosen), 250)
    ]
    records: list[dict[str, object]] = [
        {"task": label, "method": DENSE, "ratio": 0.0, "seed": seed, "pruned_accuracy": dense_accuracy,
         "finetuned_accuracy": dense_accuracy, "parameters_fraction": 1.0, "flops_fraction": 1.0,
         "gamma_median": [float(m.weight.detach().abs().median()) for m in dense.modules()
                          if isinstance(m, nn.BatchNorm1d)]}
    ]  # fmt: skip
    for method in METHODS[task]:
        for ratio in args.ratios:
            start = time.perf_counter()
            try:
                if method == MERGE:
                    small = merge_similar_units(dense, ratio)
                else:
                    criterion, scope = SCOPED.get(method, (method, None))
                    small = prune_units(
                        dense, criterion, ratio, scope=scope, batches=batches, loss_fn=F.cross_entropy
                    )
            except ValueError as error:  # bn_scale ranked across layers may empty a layer
                records.append(
                    {"task": label, "method": method, "ratio": ratio, "seed": seed, "skipped": str(error)}
                )
                continue
            pruned_accuracy = accuracy(small, x_test, y_test)
            train(
                small,
                x_train,
                y_train,
                epochs=args.finetune_epochs,
                batch_size=args.batch_size,
                lr=args.finetune_lr,
                generator=torch.Generator().manual_seed(seed),  # every method sees the same batches
            )
            record: dict[str, object] = {
                "task": label,
                "method": method,
                "ratio": ratio,
                "seed": seed,
                "pruned_accuracy": pruned_accuracy,
                "finetuned_accuracy": accuracy(small, x_test, y_test),
                "parameters_fraction": parameters(small) / dense_parameters,
                "flops_fraction": forward_flops(small) / dense_flops,
                "seconds": time.perf_counter() - start,
            }
            if seed == 0:
                for batch in (1, 256):
                    dense_s, small_s = time_pair(dense, small, x_test[:batch], args.timing_repeats)
                    record[f"time_ratio_b{batch}"] = small_s / dense_s
                    record[f"dense_us_b{batch}"] = dense_s * 1e6
            records.append(record)
    return records


def summarize(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Mean and 95% CI half-width over seeds per (task, method, ratio); time ratios from seed 0."""
    groups: dict[tuple[object, object, object], list[dict[str, object]]] = {}
    for record in (r for r in records if "skipped" not in r):
        groups.setdefault((record["task"], record["method"], record["ratio"]), []).append(record)
    points = []
    for (task, method, ratio), group in groups.items():
        point: dict[str, object] = {"task": task, "method": method, "ratio": ratio, "seeds": len(group)}
        for key in ("pruned_accuracy", "finetuned_accuracy"):
            values = [float(r[key]) for r in group]  # type: ignore[arg-type]
            point[key] = statistics.fmean(values)
            point[f"{key}_ci95"] = confidence_half_width(values)
        for key in ("parameters_fraction", "flops_fraction"):
            point[key] = statistics.fmean(float(r[key]) for r in group)  # type: ignore[arg-type]
        timed = [r for r in group if "time_ratio_b1" in r]
        for key in ("time_ratio_b1", "time_ratio_b256", "dense_us_b1", "dense_us_b256"):
            point[key] = timed[0][key] if timed else None
        points.append(point)
    return points


def markdown(
    args: Args, points: list[dict[str, object]], records: list[dict[str, object]], machine: dict[str, object]
) -> str:
    """One table per model: dense, then a row per (method, ratio) with its number of seeds; the runs a method
    could not make (a layer emptied) are listed below the table."""
    lines = [
        f"# Structured pruning on MNIST-1D ({args.seeds} seeds)",
        "",
        f"`{machine['command']}` — {machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s), "
        f"{machine['seconds']:.0f} s.",
        "",
        f"Dense: {args.epochs} epochs Adam lr {args.lr}, batch {args.batch_size}. Pruned: hidden units removed per "
        f"layer (bn_scale: across layers), then {args.finetune_epochs} epochs Adam lr {args.finetune_lr}. Accuracy: "
        "mean ± 95% CI half-width over the n seeds that ran. params / FLOPs: fraction of dense. time b1 / b256: shrunk / dense "
        "CPU inference time at batch 1 / 256 (seed 0, median of interleaved repeats).",
    ]
    for label, task, _ in variants(args):
        order = [DENSE, *METHODS[task]]
        header = [
            "method",
            "removed",
            "n",
            "pruned acc",
            "fine-tuned acc",
            "params",
            "FLOPs",
            "time b1",
            "time b256",
        ]
        lines += ["", f"## {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        here = sorted(
            (p for p in points if p["task"] == label), key=lambda p: (order.index(p["method"]), p["ratio"])
        )
        for point in here:
            times = [
                f"{point[k]:.2f}" if point[k] is not None else "–"
                for k in ("time_ratio_b1", "time_ratio_b256")
            ]
            lines.append(
                f"| {point['method']} | {point['ratio']:.0%} | {point['seeds']} | {point['pruned_accuracy']:.3f} ± "
                f"{point['pruned_accuracy_ci95']:.3f} | {point['finetuned_accuracy']:.3f} ± "
                f"{point['finetuned_accuracy_ci95']:.3f} | {point['parameters_fraction']:.3f} | "
                f"{point['flops_fraction']:.3f} | " + " | ".join(times) + " |"
            )
        timed = [p for p in points if p["task"] == label and p["dense_us_b1"] is not None]
        if timed:
            lines += [
                "",
                f"Dense forward (seed 0): {timed[0]['dense_us_b1']:.0f} µs at batch 1, "
                f"{timed[0]['dense_us_b256']:.0f} µs at batch 256.",
            ]
        gammas = [r["gamma_median"] for r in records if r["task"] == label and r.get("gamma_median")]
        if gammas:
            medians = ", ".join(f"{statistics.fmean(layer):.3f}" for layer in zip(*gammas, strict=True))  # type: ignore[call-overload]
            lines += ["", f"Dense model's median |gamma| per BatchNorm (mean over seeds): {medians}."]
        skipped = [r for r in records if r["task"] == label and "skipped" in r]
        lines += [""] if skipped else []
        lines += [
            f"- skipped {r['method']} {r['ratio']:.0%} seed {r['seed']}: {r['skipped']}" for r in skipped
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with torch_threads(args.threads):
        data = load_mnist1d(args.data_root or None, num_samples=args.mnist1d_samples)
        records = []
        for label, task, penalty in variants(args):
            for seed in range(args.seeds):
                records += run_task(label, task, penalty, seed, data, args)
                print(f"{label:28s} seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
    points = summarize(records)
    machine = {
        "command": " ".join(
            ["python", "scripts/bench_structured.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
        "criteria": {name: entry.reference for name, entry in UNIT_CRITERIA.items()},
    }
    out = Path(args.out)
    write_json(
        out / "results.json", {"args": asdict(args), "machine": machine, "points": points, "runs": records}
    )
    text = markdown(args, points, records, machine)
    write_atomic(out / "results.md", text.encode())
    print(f"\n{text}\nwrote {out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
