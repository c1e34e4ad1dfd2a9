"""Benchmark: sparse activations (k-WTA with boosting) with and without sparse weights on MNIST-1D, over seeds.

Part (a), accuracy: the MNIST-1D MLP 40-100-100-10 trained as in ``scripts/bench_methods.py`` (Adam lr 0.01, 60
epochs, batch 100, one thread; seed = initialization, masks and batch order) in four kinds of variants:

- ``dense``: ReLU MLP, dense weights;
- ``weights``: ReLU MLP with ``--sparsity`` of its weights masked by the ``--method`` preset under the engine;
- ``kwta@p``: k-WTA (``KWinners``, ``p`` = ``percent_on`` of each hidden layer) in place of each ReLU, dense weights;
- ``kwta@p+weights``: both.

Mean test accuracy ± 95% CI half-width (Student's t over seeds). The boost strength decays once per epoch.

Part (b), batch-1 inference time of the whole model (seed 0's trained models, eval mode, one thread): ``dense``
(plain torch), ``weights`` condensed by ``kernels.condense``, ``kwta@p+weights`` condensed by
``kwta.condense_kwta`` (the sparse-input path: k-WTA fused with the next layer, reading only the winners'
columns), the same model through ``kernels.condense`` only (k-WTA in torch, weights condensed: what the fused path
replaces), and ``kwta@p`` through ``condense_kwta`` (dense weights, sparse inputs). Variants are interleaved
(round-robin, ``--timing-rounds`` rounds of ``--timing-calls`` calls each, inputs cycling through test examples);
the median per call is reported with ratios to ``dense`` and to ``weights``. The condensed copies' test accuracy
is recorded beside (it must equal the masked model's).

Writes ``results.json`` and ``results.md`` to ``--out``.

    python scripts/bench_kwta.py                 # 30 training runs of ~2-5 s on one core, then the timing
    python scripts/bench_kwta.py --no-timing     # accuracy only
    python scripts/bench_kwta.py --quick         # tiny data, 1 epoch, 2 seeds, a short timing: a smoke run
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels import CondenseConfig, condense, kernel_status
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.kwta import condense_kwta, make_mnist1d_kwta_mlp, update_boost_strength
from sparseapps.core.mnist1d import load_mnist1d, make_mnist1d_mlp
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.stats import confidence_half_width

METHODS = ("static", "rigl")
DENSE = "dense"
WEIGHTS = "weights"


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_kwta", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={"help": "2 seeds, 1 epoch on 600 MNIST-1D signals, a short timing: seconds"},
    )
    method: str = field(default="rigl", metadata={"help": f"weight sparsity preset, one of {METHODS}"})
    sparsity: float = field(default=0.9, metadata={"help": "fraction of zero weights of the sparse variants"})
    percents_on: tuple[float, ...] = field(
        default=(0.1, 0.2), metadata={"help": "k-WTA percent_on values (one pair of k-WTA variants each)"}
    )
    boost_strength: float = field(default=1.0, metadata={"help": "k-WTA boost strength at the start"})
    boost_strength_factor: float = field(
        default=0.9, metadata={"help": "boost strength decay, applied once per epoch"}
    )
    duty_cycle_period: int = field(default=1000, metadata={"help": "k-WTA duty-cycle period (examples)"})
    k_inference_factor: float = field(default=1.5, metadata={"help": "eval-mode winners = k * this"})
    seeds: int = field(default=5, metadata={"help": "runs per variant (seeds 0 .. seeds-1); at least 2"})
    epochs: int = field(default=60, metadata={"help": "passes over the training split (bench_methods': 60)"})
    batch_size: int = field(default=100, metadata={"help": "examples per step (mnist1d's reference: 100)"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate (mnist1d's reference: 0.01)"})
    mnist1d_samples: int = field(
        default=5000, metadata={"help": "MNIST-1D examples, train + test (5000: the published 4000 / 1000)"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads for training and timing"})
    timing: bool = field(default=True, metadata={"help": "run part (b), the batch-1 inference timing"})
    timing_rounds: int = field(default=300, metadata={"help": "interleaved rounds (medians over them)"})
    timing_calls: int = field(default=50, metadata={"help": "batch-1 forward calls per variant and round"})
    planner: str = field(
        default="measure", metadata={"help": "kernels.condense planner: 'measure' or 'cost_model'"}
    )
    data_root: str = field(
        default="",
        metadata={"help": "MNIST-1D cache root ('' = $SPARSEAPPS_DATA or ~/.cache/sparseapps/data)"},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"expected method in {METHODS}, got {self.method!r}")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"expected sparsity in (0, 1), got {self.sparsity}")
        if not self.percents_on or not all(0.0 < p <= 1.0 for p in self.percents_on):
            raise ValueError(f"expected percents_on in (0, 1], got {self.percents_on}")
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        for name in ("epochs", "batch_size", "threads", "timing_rounds", "timing_calls", "mnist1d_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"expected lr > 0, got {self.lr}")
        if self.planner not in ("measure", "cost_model"):
            raise ValueError(f"expected planner in ('measure', 'cost_model'), got {self.planner!r}")


QUICK = {
    "seeds": 2,
    "epochs": 1,
    "batch_size": 50,
    "mnist1d_samples": 600,
    "timing_rounds": 3,
    "timing_calls": 5,
    "planner": "cost_model",
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


# ---------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A model kind: k-WTA ``percent_on`` (None: ReLU) and whether its weights are sparse."""

    percent_on: float | None
    sparse_weights: bool

    @property
    def name(self) -> str:
        if self.percent_on is None:
            return WEIGHTS if self.sparse_weights else DENSE
        return f"kwta@{self.percent_on:g}" + (f"+{WEIGHTS}" if self.sparse_weights else "")


def variants(args: Args) -> list[Variant]:
    kinds = [Variant(None, False), Variant(None, True)]
    for p in args.percents_on:
        kinds += [Variant(p, False), Variant(p, True)]
    return kinds


def build(variant: Variant, args: Args) -> nn.Sequential:
    if variant.percent_on is None:
        return make_mnist1d_mlp()
    return make_mnist1d_kwta_mlp(
        percent_on=variant.percent_on,
        boost_strength=args.boost_strength,
        boost_strength_factor=args.boost_strength_factor,
        duty_cycle_period=args.duty_cycle_period,
        k_inference_factor=args.k_inference_factor,
    )


# ---------------------------------------------------------------------------------------------- part (a)
@dataclass(frozen=True)
class Run:
    """One training run's outcome."""

    variant: str
    seed: int
    test_accuracy: float
    sparsity: float
    steps: int
    seconds: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(x)


def train(
    variant: Variant, seed: int, data: tuple[torch.Tensor, ...], args: Args
) -> tuple[Run, nn.Sequential]:
    """Trains one variant with one seed; returns its :class:`Run` and the trained model (eval mode)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build(variant, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    engine = None
    if variant.sparse_weights:
        config = SparsityConfig.preset(args.method, sparsity=args.sparsity, seed=seed)
        engine = DynamicSparsity(model, optimizer, config, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for begin in range(0, len(order), args.batch_size):
            index = order[begin : begin + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
            steps += 1
        update_boost_strength(model)
    seconds = time.perf_counter() - start
    report = engine.report() if engine is not None else None
    run = Run(
        variant=variant.name,
        seed=seed,
        test_accuracy=accuracy(model, x_test, y_test),
        sparsity=1.0 - report.density if report is not None else 0.0,
        steps=steps,
        seconds=seconds,
    )
    return run, model.eval()


@dataclass(frozen=True)
class Point:
    """Mean and 95% CI half-width of a variant over its seeds."""

    variant: str
    seeds: int
    mean: float
    ci95: float
    sparsity: float
    seconds: float


def summarize(runs: list[Run]) -> list[Point]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return [
        Point(
            variant=name,
            seeds=len(group),
            mean=statistics.fmean(r.test_accuracy for r in group),
            ci95=confidence_half_width([r.test_accuracy for r in group]),
            sparsity=statistics.fmean(r.sparsity for r in group),
            seconds=statistics.fmean(r.seconds for r in group),
        )
        for name, group in groups.items()
    ]


# ---------------------------------------------------------------------------------------------- part (b)
def inference_models(models: dict[str, nn.Sequential], args: Args) -> dict[str, nn.Module]:
    """The timed forms of seed 0's trained models, by row name."""
    config = CondenseConfig(planner=args.planner, batch_sizes=(1,))
    forms: dict[str, nn.Module] = {DENSE: models[DENSE], WEIGHTS: condense(models[WEIGHTS], config)}
    for p in args.percents_on:
        both = Variant(p, True).name
        forms[f"{both} (sparse-input path)"] = condense_kwta(models[both], config)
        forms[f"{both} (condense only)"] = condense(models[both], config)
        forms[f"{Variant(p, False).name} (sparse-input path)"] = condense_kwta(models[Variant(p, False).name])
    return forms


def time_batch1(forms: dict[str, nn.Module], inputs: torch.Tensor, args: Args) -> dict[str, float]:
    """Median seconds per batch-1 forward call of each form: rounds of ``timing_calls`` calls per form, the
    forms' order shuffled every round (seeded), inputs cycling through ``inputs [N, 40]``."""
    names = list(forms)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rows = [inputs[i : i + 1].contiguous() for i in range(len(inputs))]
    shuffle = random.Random(0)
    with torch.inference_mode():
        for name in names:  # warm-up: first calls allocate and load code
            for x in rows[: args.timing_calls]:
                forms[name](x)
        for _ in range(args.timing_rounds):
            shuffle.shuffle(names)
            for name in names:
                model = forms[name]
                start = time.perf_counter()
                for t in range(args.timing_calls):
                    model(rows[t % len(rows)])
                samples[name].append((time.perf_counter() - start) / args.timing_calls)
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------- output
def markdown(args: Args, points: list[Point], timing: dict[str, dict[str, float]] | None) -> str:
    lines = [
        f"# k-WTA and sparse weights on MNIST-1D (MLP 40-100-100-10; {args.seeds} seeds, {args.epochs} epochs, "
        f"Adam lr {args.lr}, batch {args.batch_size})",
        "",
        f"Weights: {args.method} at {args.sparsity:.0%} sparsity. k-WTA: boost strength {args.boost_strength} "
        f"(x{args.boost_strength_factor} per epoch), duty-cycle period {args.duty_cycle_period}, k_inference = "
        f"k x {args.k_inference_factor}.",
        "",
        "| variant | test accuracy (mean ± 95% CI) | weight sparsity | s / run |",
        "|---|---|---|---|",
    ]
    for p in points:
        lines.append(f"| {p.variant} | {p.mean:.3f} ± {p.ci95:.3f} | {p.sparsity:.2f} | {p.seconds:.2f} |")
    if timing is not None:
        lines += [
            "",
            f"## Batch-1 inference, whole model ({args.threads} thread(s); median of {args.timing_rounds} "
            f"interleaved rounds of {args.timing_calls} calls)",
            "",
            "| form | µs / call | vs dense | vs weights | condensed test accuracy |",
            "|---|---|---|---|---|",
        ]
        for name, row in timing.items():
            lines.append(
                f"| {name} | {row['seconds'] * 1e6:.1f} | {row['vs_dense']:.2f}x | {row['vs_weights']:.2f}x | "
                f"{row['test_accuracy']:.3f} |"
            )
        lines += ["", "Ratios are time / time of the named row (below 1: faster)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with torch_threads(args.threads):
        run(args)


def run(args: Args) -> None:
    """Part (a), then part (b) when ``args.timing``; writes the outputs (the body of :func:`main`)."""
    start = time.perf_counter()
    data = load_mnist1d(args.data_root or None, num_samples=args.mnist1d_samples)
    runs: list[Run] = []
    seed0: dict[str, nn.Sequential] = {}
    for variant in variants(args):
        group = []
        for seed in range(args.seeds):
            result, model = train(variant, seed, data, args)
            group.append(result)
            if seed == 0:
                seed0[variant.name] = model
        runs += group
        point = summarize(group)[0]
        print(
            f"{variant.name:22s} acc {point.mean:.3f} ± {point.ci95:.3f}  sparsity {point.sparsity:.2f}  "
            f"{point.seconds:.2f} s/run",
            flush=True,
        )
    points = summarize(runs)
    timing = None
    if args.timing:
        forms = inference_models(seed0, args)
        medians = time_batch1(forms, data[2], args)
        timing = {
            name: {
                "seconds": seconds,
                "vs_dense": seconds / medians[DENSE],
                "vs_weights": seconds / medians[WEIGHTS],
                "test_accuracy": accuracy(forms[name], data[2], data[3]),
            }
            for name, seconds in medians.items()
        }
        for name, row in timing.items():
            print(
                f"{name:40s} {row['seconds'] * 1e6:8.1f} µs  vs dense {row['vs_dense']:.2f}x  "
                f"vs weights {row['vs_weights']:.2f}x  acc {row['test_accuracy']:.3f}",
                flush=True,
            )
    out = Path(args.out)
    write_json(
        out / "results.json",
        {
            "args": asdict(args),
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "kernels": kernel_status(),
            "runs": [asdict(r) for r in runs],
            "points": [asdict(p) for p in points],
            "timing": timing,
        },
    )
    text = markdown(args, points, timing) + f"\nCPU: {cpu_model()}; torch {torch.__version__}.\n"
    write_atomic(out / "results.md", text.encode())
    print(f"\n{text}\nwrote {out / 'results.json'} and results.md in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
