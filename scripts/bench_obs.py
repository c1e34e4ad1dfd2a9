"""Benchmark: one-shot Optimal Brain Surgeon (WoodFisher) against one-shot magnitude pruning, before fine-tuning.

The known result (Hassibi & Stork 1993; Singh & Alistarh 2020, WoodFisher) is that OBS, which ranks weights by
``w**2 / (2 [F^-1]_qq)`` and moves the survivors to compensate, loses less accuracy than magnitude pruning when a
trained network is pruned once with no fine-tuning. Per seed, the MNIST-1D MLP 40-100-100-10 is trained dense as
``scripts/bench_methods.py`` trains it (Adam lr 0.01, batch 100, 60 epochs), then copied and pruned to each sparsity
(every Linear weight to the same density, the ``one_shot`` preset's uniform distribution) by:

- ``magnitude``: the smallest ``|w|`` per tensor removed;
- ``obs``: ``sparseapps.core.obs.prune`` with a block-diagonal empirical Fisher of per-example gradients of
  ``--calibration`` training examples (blocks of ``--block-size`` consecutive weights, dampening ``--damp``).

Reported: test accuracy right after pruning (the registered comparison: obs - magnitude, paired by seed, 95% CI)
and after ``--finetune-epochs`` epochs of Adam (lr ``--finetune-lr``, masks kept by the engine), exploratory.
Writes ``results.json`` and ``results.md`` (with the CPU model and the command) to ``--out``.

    OMP_NUM_THREADS=1 python scripts/bench_obs.py --out docs/bench_obs     # ~2 min on one core
    python scripts/bench_obs.py --quick --out /tmp/obs                     # a smoke run of seconds
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, obs, rules, scoring
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.mnist1d import load_mnist1d, make_mnist1d_mlp
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.stats import confidence_half_width, interval_verdict, paired_interval
from sparseapps.demo import accuracy

METHODS = ("magnitude", "obs")


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_obs", metadata={"help": "output folder"})
    quick: bool = field(default=False, metadata={"help": "2 seeds, 2 epochs, 600 signals: seconds"})
    seeds: int = field(default=5, metadata={"help": "dense models trained (seeds 0 .. seeds-1), >= 2"})
    sparsities: tuple[float, ...] = field(default=(0.8, 0.9, 0.95), metadata={"help": "fractions of zeros"})
    epochs: int = field(default=60, metadata={"help": "dense training epochs (bench_methods' setting)"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate of the dense training"})
    batch_size: int = field(default=100, metadata={"help": "examples per step"})
    calibration: int = field(
        default=1000, metadata={"help": "training examples of the per-example gradients"}
    )
    block_size: int = field(default=64, metadata={"help": "OBS: consecutive weights per Fisher block"})
    damp: float = field(default=1e-4, metadata={"help": "OBS: dampening added to the Fisher's diagonal"})
    obs_steps: int = field(
        default=1,
        metadata={
            "help": "OBS: prune in this many steps of equal sparsity increments, the Fisher recomputed at each "
            "(WoodFisher's multi-step one shot; 1: one step, the registered setting)"
        },
    )
    finetune_epochs: int = field(
        default=2, metadata={"help": "epochs of fine-tuning after pruning (0: none)"}
    )
    finetune_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the fine-tuning"})
    mnist1d_samples: int = field(default=5000, metadata={"help": "MNIST-1D examples, train + test"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    data_root: str = field(
        default="",
        metadata={"help": "MNIST-1D cache root ('' = $SPARSEAPPS_DATA or ~/.cache/sparseapps/data)"},
    )

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError(f"expected seeds >= 2 (a confidence interval needs two runs), got {self.seeds}")
        if not self.sparsities or not all(0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"expected sparsities in (0, 1), got {self.sparsities}")
        for name in ("epochs", "batch_size", "calibration", "block_size", "obs_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.finetune_epochs < 0:
            raise ValueError(f"expected finetune_epochs >= 0, got {self.finetune_epochs}")
        for name in ("lr", "damp", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")


QUICK = {"seeds": 2, "epochs": 2, "mnist1d_samples": 600, "calibration": 64, "sparsities": (0.9,)}


@dataclass(frozen=True)
class Run:
    """One pruned copy of one seed's dense model."""

    method: str
    sparsity: float
    seed: int
    dense_accuracy: float
    pruned_accuracy: float
    finetuned_accuracy: float | None
    prune_seconds: float
    dense_calibration_loss: float = float("nan")
    calibration_loss: float = float("nan")


def _epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()


def _one_shot_engine(model: nn.Module, sparsity: float, seed: int, lr: float) -> DynamicSparsity:
    """An engine that keeps the masks the pruning commits (its own schedule never prunes)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    config = SparsityConfig.preset(
        "one_shot", sparsity=sparsity, seed=seed, start_fraction=1.0, end_fraction=1.0
    )
    return DynamicSparsity(model, optimizer, config, total_steps=1 << 40)


def _prune_magnitude(engine: DynamicSparsity) -> None:
    new_masks = {
        fqn: rules.drop(t.mask, scoring.magnitude(t.param), int(t.mask.sum()) - t.budget)
        for fqn, t in engine.tensors.items()
    }
    engine.commit(new_masks, 0.0)
    engine.apply_masks()


def _prune_obs(engine: DynamicSparsity, x: torch.Tensor, y: torch.Tensor, args: Args) -> None:
    """OBS to the engine's budgets in ``args.obs_steps`` steps of equal sparsity increments."""
    start = {fqn: int(t.mask.sum()) for fqn, t in engine.tensors.items()}
    for step in range(1, args.obs_steps + 1):
        budgets = {
            fqn: round(start[fqn] - (start[fqn] - t.budget) * step / args.obs_steps)
            for fqn, t in engine.tensors.items()
        }
        obs.prune(engine, x, y, F.cross_entropy, block_size=args.block_size, damp=args.damp, budgets=budgets)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy on ``x, y`` in eval mode (the quantity OBS's quadratic model approximates)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    model.train(was_training)
    return loss


def run_seed(seed: int, data: tuple[torch.Tensor, ...], args: Args) -> list[Run]:
    """Trains one dense model and prunes a copy per (method, sparsity)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    dense = make_mnist1d_mlp()
    _epochs(
        dense,
        torch.optim.Adam(dense.parameters(), lr=args.lr),
        x_train,
        y_train,
        args.epochs,
        args.batch_size,
        torch.Generator().manual_seed(seed),
    )
    dense_accuracy = accuracy(dense, x_test, y_test)
    calibration = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1000 + seed))
    calibration = calibration[: args.calibration]
    dense_loss = _loss(dense, x_train[calibration], y_train[calibration])
    runs = []
    for sparsity in args.sparsities:
        for method in METHODS:
            model = copy.deepcopy(dense)
            engine = _one_shot_engine(model, sparsity, seed, args.finetune_lr)
            start = time.perf_counter()
            if method == "obs":
                _prune_obs(engine, x_train[calibration], y_train[calibration], args)
            else:
                _prune_magnitude(engine)
            seconds = time.perf_counter() - start
            if any(int(t.mask.sum()) != t.budget for t in engine.tensors.values()):
                raise RuntimeError(f"{method} at {sparsity}: a tensor missed its budget")
            pruned = accuracy(model, x_test, y_test)
            pruned_loss = _loss(model, x_train[calibration], y_train[calibration])
            finetuned = None
            if args.finetune_epochs:
                _epochs(
                    model,
                    engine.optimizer,
                    x_train,
                    y_train,
                    args.finetune_epochs,
                    args.batch_size,
                    torch.Generator().manual_seed(2000 + seed),
                )
                finetuned = accuracy(model, x_test, y_test)
            engine.remove()
            runs.append(
                Run(
                    method,
                    sparsity,
                    seed,
                    dense_accuracy,
                    pruned,
                    finetuned,
                    seconds,
                    dense_loss,
                    pruned_loss,
                )
            )
            print(
                f"seed {seed} {method:9s} {sparsity:4.0%}  dense {dense_accuracy:.3f}  pruned {pruned:.3f}"
                + (f"  fine-tuned {finetuned:.3f}" if finetuned is not None else ""),
                flush=True,
            )
    return runs


def _mean_ci(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {confidence_half_width(values):.3f}"


def comparisons(runs: list[Run], field_name: str) -> list[dict[str, object]]:
    """Per sparsity: mean of (obs - magnitude) over seeds with its paired 95% interval and a verdict.

    Example:
        >>> r = [Run(m, 0.9, s, 0.6, a + s / 100, None, 0.0) for s in range(3) for m, a in (("obs", 0.5), ("magnitude", 0.3))]
        >>> row = comparisons(r, "pruned_accuracy")[0]
        >>> round(row["mean"], 3), row["verdict"]
        (0.2, 'obs better')
    """
    rows = []
    for sparsity in sorted({r.sparsity for r in runs}):
        by = {(r.method, r.seed): getattr(r, field_name) for r in runs if r.sparsity == sparsity}
        seeds = sorted(s for m, s in by if m == "obs" and ("magnitude", s) in by)
        differences = [by[("obs", s)] - by[("magnitude", s)] for s in seeds]
        interval = paired_interval(differences)
        verdict = interval_verdict(interval, "obs better", "magnitude better", "no difference")
        rows.append(
            {
                "sparsity": sparsity,
                "seeds": len(seeds),
                "mean": statistics.fmean(differences),
                "interval": interval,
                "verdict": verdict,
            }
        )
    return rows


#: Fields that do not change what is measured (docs/bench_obs_registration.md registers every other default).
_NEUTRAL = ("out", "threads", "data_root")


def _registered_label(args: Args) -> str:
    """ "Registered" when ``args`` are the registered defaults, else "Exploratory" (the settings differ)."""
    default = Args()
    same = all(
        getattr(args, f) == getattr(default, f) for f in Args.__dataclass_fields__ if f not in _NEUTRAL
    )
    return "Registered" if same else "Exploratory (settings differ from the registered ones)"


def markdown(runs: list[Run], args: Args, command: str) -> str:
    lines = [
        f"# One-shot OBS (WoodFisher) vs magnitude pruning, MNIST-1D MLP ({args.seeds} seeds)",
        "",
        f"Dense: Adam lr {args.lr}, {args.epochs} epochs, batch {args.batch_size}. OBS: {args.calibration} calibration "
        f"examples, blocks of {args.block_size}, damp {args.damp}, {args.obs_steps} step(s). Fine-tuning: {args.finetune_epochs} epochs of Adam "
        f"lr {args.finetune_lr}, masks kept. Test accuracy, mean ± 95% CI half-width over seeds.",
        "",
        "| sparsity | method | dense | pruned (no fine-tuning) | fine-tuned | calibration loss: dense → pruned | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity in args.sparsities:
        for method in METHODS:
            group = [r for r in runs if r.sparsity == sparsity and r.method == method]
            tuned = [r.finetuned_accuracy for r in group if r.finetuned_accuracy is not None]
            lines.append(
                f"| {sparsity:.0%} | {method} | {_mean_ci([r.dense_accuracy for r in group])} | "
                f"{_mean_ci([r.pruned_accuracy for r in group])} | {_mean_ci(tuned) if tuned else '–'} | "
                f"{statistics.fmean(r.dense_calibration_loss for r in group):.3f} → "
                f"{statistics.fmean(r.calibration_loss for r in group):.3f} | "
                f"{statistics.median(r.prune_seconds for r in group):.2f} |"
            )
    for title, name in (
        (f"{_registered_label(args)}: obs - magnitude right after pruning", "pruned_accuracy"),
        ("Exploratory: obs - magnitude after fine-tuning", "finetuned_accuracy"),
    ):
        if name == "finetuned_accuracy" and not args.finetune_epochs:
            continue
        lines += [
            "",
            f"## {title} (paired by seed, 95% CI)",
            "",
            "| sparsity | seeds | difference | verdict |",
            "|---|---|---|---|",
        ]
        for row in comparisons(runs, name):
            low, high = row["interval"] or (float("nan"), float("nan"))
            lines.append(
                f"| {row['sparsity']:.0%} | {row['seeds']} | {row['mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
                f"{row['verdict']} |"
            )
    lines += ["", f"CPU: {cpu_model()}; torch {torch.__version__}. Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)
    with torch_threads(args.threads):
        start = time.perf_counter()
        data = load_mnist1d(args.data_root or None, num_samples=args.mnist1d_samples)
        runs = [run for seed in range(args.seeds) for run in run_seed(seed, data, args)]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/bench_obs.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_json(
            out / "results.json",
            {
                "args": asdict(args),
                "cpu": cpu_model(),
                "runs": [asdict(r) for r in runs],
                "registered": comparisons(runs, "pruned_accuracy"),
            },
        )
        text = markdown(runs, args, command.strip())
        write_atomic(out / "results.md", text.encode())
        print(text)
        print(f"wrote {out}/results.json and results.md in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
