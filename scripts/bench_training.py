"""Benchmark: a training step with dense torch vs masked-dense storage vs compact storage, side by side.

For each model (MLP 784-4096-4096-10 with cross-entropy, and a transformer MLP block x + W2 gelu(W1 LN(x)),
768-3072-768, with a squared error), batch size, sparsity, thread count and method (static, RigL with an update
every ``--interval`` steps, cost amortized over it), the variants run interleaved in one process: each takes one
training step in turn (round-robin), so noise from other processes lands on all of them alike. AdamW everywhere.

- dense: plain torch, every weight trained;
- masked: ``DynamicSparsity`` with today's storage (dense weights, a mask buffer, gradients masked each step);
- compact: ``to_compact`` + ``DynamicSparsity`` with ``storage="compact"`` (only the active weights, sparse
  forward and backward kernels).

Reported per variant (medians over the timed steps):
  step ms      a step without a topology update
  amortized    step + (median extra time of an update step) / interval
  x dense      amortized time / dense step time (below 1: faster than dense)
  MB train     bytes of parameters + gradients + optimizer state
  MB struct    masks (and the engine's dense copies of them) or index structures

Writes ``results.json`` to ``--out`` and prints the table as it goes.

    python scripts/bench_training.py            # the full grid: hours on 2 cores, run it on a quiet machine
    python scripts/bench_training.py --quick    # small models, one point: a smoke run of a minute or two
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
from sparseapps.core.io import write_json
from sparseapps.core.kernels import kernel_status

STORAGES = ("masked", "compact")


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_training", metadata={"help": "output folder"})
    quick: bool = field(
        default=False, metadata={"help": "small models (784-256-256-10, 128-512-128), one point, short"}
    )
    models: tuple[str, ...] = field(default=("mlp", "block"), metadata={"help": "mlp and/or block"})
    batches: tuple[int, ...] = field(default=(64, 256), metadata={"help": "batch sizes"})
    sparsities: tuple[float, ...] = field(
        default=(0.8, 0.9, 0.95, 0.98), metadata={"help": "fractions of zeros"}
    )
    methods: tuple[str, ...] = field(default=("static", "rigl"), metadata={"help": "presets: static, rigl"})
    threads: tuple[int, ...] = field(default=(1, 2), metadata={"help": "torch thread counts"})
    interval: int = field(default=100, metadata={"help": "RigL: steps between topology updates"})
    rounds: int = field(default=2, metadata={"help": "update intervals timed per point"})
    warmup: int = field(default=3, metadata={"help": "untimed steps per variant first"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if not set(self.models) <= {"mlp", "block"}:
            raise ValueError(f"expected models among ('mlp', 'block'), got {self.models}")
        if not set(self.methods) <= {"static", "rigl"}:
            raise ValueError(f"expected methods among ('static', 'rigl'), got {self.methods}")
        if not all(0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"expected sparsities in (0, 1), got {self.sparsities}")
        if not all(b >= 1 for b in self.batches) or not all(t >= 1 for t in self.threads):
            raise ValueError(f"expected positive batches and threads, got {self.batches} and {self.threads}")
        for name in ("interval", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")


QUICK = {"models": ("mlp", "block"), "batches": (64,), "sparsities": (0.9,), "threads": (1,), "interval": 10}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (its help string; tuples take several values); ``--quick`` first
    applies :data:`QUICK`, then the options given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        option, default = f"--{f.name}", f.default
        if isinstance(default, bool):
            parser.add_argument(option, action="store_true", help=f.metadata["help"])
        elif isinstance(default, tuple):
            parser.add_argument(option, nargs="+", type=type(default[0]), help=f.metadata["help"])
        else:
            parser.add_argument(option, type=type(default), help=f.metadata["help"])
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    defaults = QUICK if given["quick"] else {}
    return Args(**{**defaults, **{k: v for k, v in given.items() if v is not None and v is not False}})


class Block(nn.Module):
    """A transformer's MLP block on tokens ``[B, d]``: ``x + W2 gelu(W1 LN(x))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def make_task(
    name: str, quick: bool, batch: int, generator: torch.Generator
) -> tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """A model builder, one fixed batch (inputs, targets) and the loss."""
    if name == "mlp":
        hidden = 256 if quick else 4096
        x = torch.randn(batch, 784, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)

        def mlp() -> nn.Module:
            return nn.Sequential(
                nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
            )

        return mlp, x, y, F.cross_entropy
    width, hidden = (128, 512) if quick else (768, 3072)
    x = torch.randn(batch, width, generator=generator)
    return (lambda: Block(width, hidden)), x, torch.randn(batch, width, generator=generator), F.mse_loss


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Variant:
    """One model + AdamW (+ engine) that takes timed training steps on a fixed batch."""

    def __init__(
        self,
        build: Callable[[], nn.Module],
        storage: str | None,
        method: str,
        sparsity: float,
        interval: int,
        seed: int,
    ) -> None:
        torch.manual_seed(seed)
        self.model = build()
        self.engine: DynamicSparsity | None = None
        config = None
        if storage is not None:
            config = SparsityConfig.preset(method, sparsity=sparsity, seed=seed, storage=storage)
            if config.dynamic:
                config = config.replace(update_interval=interval, start_fraction=0.0, end_fraction=1.0)
            if storage == "compact":
                self.model = to_compact(self.model, config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        if config is not None:
            self.engine = DynamicSparsity(self.model, self.optimizer, config, total_steps=10**9)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor]
    ) -> tuple[float, bool]:
        """Seconds of one step, and whether it ran a topology update."""
        updates = len(self.engine.history) if self.engine is not None else 0
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_fn(self.model(x), y).backward()
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        return elapsed, self.engine is not None and len(self.engine.history) > updates

    def memory(self) -> dict[str, int]:
        """Bytes held for training (after a step, gradients still in place)."""
        params = list(self.model.parameters())
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        structure = tensor_bytes(self.model.buffers())
        if self.engine is not None:
            # The engine's own dense per-tensor state: entries ever active, and (masked storage) the masks in
            # the weights' dtype that it caches between updates to multiply by.
            structure += tensor_bytes(self.engine.ever_active.values())
            structure += tensor_bytes(self.engine._multiplier_cache or [])
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": tensor_bytes(state),
            "structure": structure,
        }


@dataclass(frozen=True, kw_only=True)
class Row:
    model: str
    batch: int
    sparsity: float
    threads: int
    variant: str
    step_ms: float
    amortized_ms: float
    update_ms: float
    ratio: float
    updates_timed: int
    bytes: dict[str, int]

    @property
    def train_mb(self) -> float:
        return (self.bytes["params"] + self.bytes["grads"] + self.bytes["optimizer"]) / 2**20


def bench_point(args: Args, model: str, batch: int, sparsity: float, threads: int) -> list[Row]:
    """Every variant at one point, interleaved step by step."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(args.seed)
    build, x, y, loss_fn = make_task(model, args.quick, batch, generator)
    variants = {"dense": Variant(build, None, "static", sparsity, args.interval, args.seed)}
    for method in args.methods:
        for storage in STORAGES:
            variants[f"{storage}-{method}"] = Variant(
                build, storage, method, sparsity, args.interval, args.seed
            )
    for _ in range(args.warmup):
        for variant in variants.values():
            variant.step(x, y, loss_fn)
    plain: dict[str, list[float]] = {name: [] for name in variants}
    updates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds * args.interval):
        for name, variant in variants.items():
            elapsed, updated = variant.step(x, y, loss_fn)
            (updates if updated else plain)[name].append(elapsed)
    dense_step = statistics.median(plain["dense"])
    rows = []
    for name, variant in variants.items():
        step = statistics.median(plain[name])
        extra = max(statistics.median(updates[name]) - step, 0.0) if updates[name] else 0.0
        amortized = step + extra / args.interval
        rows.append(
            Row(
                model=model,
                batch=batch,
                sparsity=sparsity,
                threads=threads,
                variant=name,
                step_ms=step * 1e3,
                amortized_ms=amortized * 1e3,
                update_ms=extra * 1e3,
                ratio=amortized / dense_step,
                updates_timed=len(updates[name]),
                bytes=variant.memory(),
            )
        )
    return rows


HEADER = (
    f"{'model':<6} {'batch':>5} {'sparsity':>8} {'thr':>3} {'variant':<15} {'step ms':>9} "
    f"{'amortized':>9} {'x dense':>8} {'MB train':>9} {'MB struct':>9}"
)


def format_row(r: Row) -> str:
    return (
        f"{r.model:<6} {r.batch:>5} {r.sparsity:>8.2f} {r.threads:>3} {r.variant:<15} {r.step_ms:>9.2f} "
        f"{r.amortized_ms:>9.2f} {r.ratio:>8.3f} {r.train_mb:>9.2f} {r.bytes['structure'] / 2**20:>9.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    status = kernel_status()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "kernels": f"{status['state']} ({status['isa']})",
    }
    print(f"torch {machine['torch']}, kernels {machine['kernels']}, {machine['processor']}")
    start = time.perf_counter()
    print(f"{HEADER}\n{'-' * len(HEADER)}")
    rows: list[Row] = []
    for model in args.models:
        for batch in args.batches:
            for sparsity in args.sparsities:
                for threads in args.threads:
                    point = bench_point(args, model, batch, sparsity, threads)
                    print("\n".join(format_row(r) for r in point), flush=True)
                    rows += point
    out = Path(args.out)
    write_json(
        out / "results.json",
        {"args": asdict(args), "machine": machine, "rows": [asdict(r) for r in rows]},
    )
    print(f"\nwrote {out / 'results.json'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
