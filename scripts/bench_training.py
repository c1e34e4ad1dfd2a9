"""Benchmark: a training step with dense torch vs masked-dense vs compact storage vs SparseProp, side by side.

For each model (MLP 784-4096-4096-10 with cross-entropy, and a transformer MLP block x + W2 gelu(W1 LN(x)),
768-3072-768, with a squared error), batch size, sparsity, thread count and method (static, and RigL with its
update cost amortized over ``--interval`` steps), the variants run interleaved: each takes one training step in
turn (round-robin), so noise from other processes lands on all of them alike. AdamW everywhere.

- dense: plain torch, every weight trained;
- masked: ``DynamicSparsity`` with the masked-dense storage (dense weights, a mask buffer, gradients masked);
- compact: ``to_compact`` + ``DynamicSparsity`` with ``storage="compact"`` (only the active weights, sparse
  forward and backward kernels, topology updates that re-pack values and optimizer state);
- sparseprop: SparseProp (Nikdan et al. 2023; pip ``sparseprop``, static masks, its own AVX2 kernels) on the same
  model with the same nnz per layer, in a side environment (``scripts/peers``, created on first use; a worker
  process that times its own steps, asked for one step per round so it interleaves with the others).

RigL's update cost: the engine updates every ``--measure-interval`` steps while timing (the cost of one update does
not depend on the interval), and the amortized step is ``step + (median update step - median step) / interval``.

Then the whole-model inference table: 12 ViT-B/16 MLP blocks (768-3072-768) with SRigL masks, ``condense(model)``
against the dense model at batch 1 and 256, interleaved calls, medians.

Writes ``results.json``, ``results.md`` (tables and the goals of issue 15 met or not) and ``speedup.png`` to
``--out``, and prints the tables as it goes.

    python scripts/bench_training.py            # the full grid: ~30 min on 2 cores; run it on a quiet machine
    python scripts/bench_training.py --quick    # small models, one point: a smoke run of a minute
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels import CondenseConfig, condense, kernel_status
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.options import parse_config
from sparseapps.core.plotting import pyplot, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # scripts/peers: the side environment of the peer libraries

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
    dtypes: tuple[str, ...] = field(
        default=("float32",),
        metadata={"help": "float32 and/or bfloat16 (weights and activations; no SparseProp)"},
    )
    interval: int = field(
        default=100, metadata={"help": "RigL: steps between topology updates (amortization)"}
    )
    measure_interval: int = field(
        default=10, metadata={"help": "RigL: steps between updates while timing (each update is timed)"}
    )
    rounds: int = field(default=3, metadata={"help": "timed update intervals per point"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per variant first"})
    peers: str = field(
        default="auto",
        metadata={"help": "SparseProp beside: 'auto' (set up the side environment if needed), 'on', 'off'"},
    )
    skip_inference: bool = field(
        default=False, metadata={"help": "leave out the whole-model inference table (12 ViT-B MLP blocks)"}
    )
    inference_blocks: int = field(default=12, metadata={"help": "ViT-B MLP blocks in the inference model"})
    inference_sparsities: tuple[float, ...] = field(
        default=(0.8, 0.9, 0.95), metadata={"help": "SRigL sparsities of the inference model"}
    )
    inference_batches: tuple[int, ...] = field(default=(1, 256), metadata={"help": "inference batch sizes"})
    inference_repeats: int = field(default=15, metadata={"help": "timed calls per model and batch size"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if not set(self.models) <= {"mlp", "block"}:
            raise ValueError(f"expected models among ('mlp', 'block'), got {self.models}")
        if not set(self.methods) <= {"static", "rigl"}:
            raise ValueError(f"expected methods among ('static', 'rigl'), got {self.methods}")
        for name in ("sparsities", "inference_sparsities"):
            if not all(0.0 < s < 1.0 for s in getattr(self, name)):
                raise ValueError(f"expected {name} in (0, 1), got {getattr(self, name)}")
        if not all(b >= 1 for b in (*self.batches, *self.inference_batches)) or not all(
            t >= 1 for t in self.threads
        ):
            raise ValueError(f"expected positive batches and threads, got {self.batches} and {self.threads}")
        for name in ("interval", "measure_interval", "rounds", "inference_blocks", "inference_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not set(self.dtypes) <= {"float32", "bfloat16"}:
            raise ValueError(f"expected dtypes among ('float32', 'bfloat16'), got {self.dtypes}")
        if self.peers not in {"auto", "on", "off"}:
            raise ValueError(f"expected peers in ('auto', 'on', 'off'), got {self.peers!r}")


QUICK = {
    "models": ("mlp", "block"),
    "batches": (64,),
    "sparsities": (0.9,),
    "threads": (1,),
    "interval": 10,
    "measure_interval": 5,
    "rounds": 2,
    "inference_blocks": 2,
    "inference_sparsities": (0.9,),
    "inference_batches": (1, 64),
    "inference_repeats": 5,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


class Block(nn.Module):
    """A transformer's MLP block on tokens ``[B, d]``: ``x + W2 gelu(W1 LN(x))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def widths(name: str, quick: bool) -> list[int]:
    """The layer widths of a model, as the SparseProp worker builds it."""
    if name == "mlp":
        hidden = 256 if quick else 4096
        return [784, hidden, hidden, 10]
    return [128, 512, 128] if quick else [768, 3072, 768]


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
        dtype: torch.dtype = torch.float32,
    ) -> None:
        torch.manual_seed(seed)
        self.model = build().to(dtype)
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
    dtype: str
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


class PeerVariant:
    """SparseProp's model in the side environment's worker, with the nnz per layer of the compact model."""

    def __init__(
        self,
        peer: peers.PeerProcess,
        args: Args,
        model: str,
        batch: int,
        sparsity: float,
        threads: int,
        nnz: list[int],
    ) -> None:
        self.peer = peer
        peer.build(
            name="sparseprop",
            model=model,
            widths=widths(model, args.quick),
            batch=batch,
            sparsity=sparsity,
            threads=threads,
            seed=args.seed,
            nnz=nnz,
            swap="all",
        )

    def step(self, *_: object) -> tuple[float, bool]:
        return self.peer.steps(1, name="sparseprop")[0] / 1e3, False

    def memory(self) -> dict[str, int]:
        answer = self.peer.memory(name="sparseprop")
        return {key: int(answer[key]) for key in ("params", "grads", "optimizer", "structure")}


def linear_nnz(model: nn.Module) -> list[int]:
    """Active weights of each Linear layer of a compact model, in order (what SparseProp is given)."""
    return [
        int(m.nnz) if hasattr(m, "nnz") else m.weight.numel()
        for m in model.modules()
        if hasattr(m, "nnz") or isinstance(m, nn.Linear)
    ]


def bench_point(
    args: Args,
    model: str,
    batch: int,
    sparsity: float,
    threads: int,
    peer: peers.PeerProcess | None,
    dtype_name: str = "float32",
) -> list[Row]:
    """Every variant at one point, interleaved step by step."""
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(args.seed)
    build, x, y, loss_fn = make_task(model, args.quick, batch, generator)
    x = x.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    variants: dict[str, Variant | PeerVariant] = {
        "dense": Variant(build, None, "static", sparsity, args.measure_interval, args.seed, dtype)
    }
    for method in args.methods:
        for storage in STORAGES:
            variants[f"{storage}-{method}"] = Variant(
                build, storage, method, sparsity, args.measure_interval, args.seed, dtype
            )
    if peer is not None and dtype == torch.float32:
        compact = next(v for name, v in variants.items() if name.startswith("compact"))
        assert isinstance(compact, Variant)
        variants["sparseprop"] = PeerVariant(
            peer, args, model, batch, sparsity, threads, linear_nnz(compact.model)
        )
    for _ in range(args.warmup):
        for variant in variants.values():
            variant.step(x, y, loss_fn)
    plain: dict[str, list[float]] = {name: [] for name in variants}
    updates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds * args.measure_interval):
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
                dtype=dtype_name,
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
    f"{'model':<6} {'dtype':<8} {'batch':>5} {'sparsity':>8} {'thr':>3} {'variant':<15} {'step ms':>9} "
    f"{'amortized':>9} {'update ms':>9} {'x dense':>8} {'MB train':>9} {'MB struct':>9}"
)


def format_row(r: Row) -> str:
    return (
        f"{r.model:<6} {r.dtype:<8} {r.batch:>5} {r.sparsity:>8.2f} {r.threads:>3} {r.variant:<15} {r.step_ms:>9.2f} "
        f"{r.amortized_ms:>9.2f} {r.update_ms:>9.1f} {r.ratio:>8.3f} {r.train_mb:>9.2f} "
        f"{r.bytes['structure'] / 2**20:>9.2f}"
    )


# ---------------------------------------------------------------------------------------------- inference
class VitMlp(nn.Module):
    """``blocks`` ViT-B/16 MLP blocks in sequence, ``x + fc2(gelu(fc1(x)))`` with 768-3072-768 (as SRigL's table)."""

    def __init__(self, blocks: int, width: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList(nn.Linear(width, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            x = x + fc2(F.gelu(fc1(x)))
        return x


@dataclass(frozen=True, kw_only=True)
class InferenceRow:
    sparsity: float
    batch: int
    threads: int
    dense_ms: float
    condensed_ms: float
    speedup: float
    forms: dict[str, int]


def bench_inference(args: Args) -> list[InferenceRow]:
    """Dense vs ``condense(model)`` of an SRigL-masked ViT-B MLP stack, per sparsity, batch and thread count."""
    width, hidden = (128, 512) if args.quick else (768, 3072)
    rows = []
    for sparsity in args.inference_sparsities:
        torch.manual_seed(args.seed)
        model = VitMlp(args.inference_blocks, width, hidden).eval()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        DynamicSparsity(
            model, optimizer, SparsityConfig.preset("srigl", sparsity=sparsity, seed=args.seed), 10
        )
        dense = VitMlp(args.inference_blocks, width, hidden).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            # planned at this thread count for these batch sizes, as a user deploying it would
            condensed = condense(model, CondenseConfig(batch_sizes=args.inference_batches))
            forms: dict[str, int] = {}
            for module in condensed.modules():
                if module is not condensed and not list(module.children()):
                    forms[type(module).__name__] = forms.get(type(module).__name__, 0) + 1
            for batch in args.inference_batches:
                x = torch.randn(batch, width)
                times: dict[str, list[float]] = {"dense": [], "condensed": []}
                with torch.inference_mode():
                    for repeat in range(args.inference_repeats + 2):
                        order = [("dense", dense), ("condensed", condensed)]
                        for name, net in order if repeat % 2 else order[::-1]:
                            start = time.perf_counter()
                            net(x)
                            if repeat >= 2:
                                times[name].append(time.perf_counter() - start)
                d, c = statistics.median(times["dense"]), statistics.median(times["condensed"])
                row = InferenceRow(
                    sparsity=sparsity,
                    batch=batch,
                    threads=threads,
                    dense_ms=d * 1e3,
                    condensed_ms=c * 1e3,
                    speedup=d / c,
                    forms=forms,
                )
                print(
                    f"inference {args.inference_blocks} blocks  sparsity {sparsity:.2f}  batch {batch:>4}  "
                    f"threads {threads}:  dense {row.dense_ms:8.2f} ms  condensed {row.condensed_ms:8.2f} ms  "
                    f"speedup {row.speedup:5.2f}x  {forms}",
                    flush=True,
                )
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- goals, report
def goals(rows: list[Row], inference: list[InferenceRow]) -> list[tuple[str, str, bool | None]]:
    """Issue 15's goals (float32), each with what was measured here and whether it holds (None: not measured)."""
    rows = [r for r in rows if r.dtype == "float32"]
    by_point: dict[tuple[str, int, float, int], dict[str, Row]] = {}
    for r in rows:
        by_point.setdefault((r.model, r.batch, r.sparsity, r.threads), {})[r.variant] = r
    out: list[tuple[str, str, bool | None]] = []

    def check(name: str, values: list[tuple[str, float]], bound: float, higher_is_better: bool) -> None:
        if not values:
            out.append((name, "not measured", None))
            return
        ok = (lambda v: v >= bound) if higher_is_better else (lambda v: v <= bound)
        failing = [f"{label} {v:.2f}" for label, v in values if not ok(v)]
        worst = (min if higher_is_better else max)(values, key=lambda item: item[1])
        text = f"{len(values) - len(failing)}/{len(values)} points; worst {worst[0]} {worst[1]:.2f}" + (
            f"; missed at {', '.join(failing)}" if failing else ""
        )
        out.append((name, text, not failing))

    def label(key: tuple[str, int, float, int]) -> str:
        return f"{key[0]} b{key[1]} t{key[3]}"

    for sparsity, target in ((0.9, 2.5), (0.95, 4.0)):
        values = [
            (label(k), 1.0 / p["compact-static"].ratio)
            for k, p in by_point.items()
            if k[2] == sparsity and "compact-static" in p
        ]
        check(f"compact static step at {sparsity:.0%}: >= {target}x dense (speedup)", values, target, True)
    values = [
        (label(k), p["sparseprop"].amortized_ms / p["compact-static"].amortized_ms)
        for k, p in by_point.items()
        if k[2] == 0.9 and "sparseprop" in p and "compact-static" in p
    ]
    check("compact static step at 90%: >= 1.5x SparseProp (speedup)", values, 1.5, True)
    values = [
        (f"{label(k)} s{k[2]}", p["compact-rigl"].amortized_ms / p["compact-static"].amortized_ms)
        for k, p in by_point.items()
        if "compact-rigl" in p and "compact-static" in p
    ]
    check("compact RigL amortized <= 1.10x compact static", values, 1.10, False)
    values = [
        (label(k), p["compact-static"].train_mb / p["dense"].train_mb)
        for k, p in by_point.items()
        if k[2] == 0.9 and "compact-static" in p
    ]
    check("params + grads + optimizer state at 90%: <= 0.2x dense", values, 0.2, False)
    for batch, target in ((1, 5.0), (256, 2.5)):
        values = [(f"t{r.threads}", r.speedup) for r in inference if r.sparsity == 0.9 and r.batch == batch]
        check(f"inference, 12 ViT-B MLP blocks, 90%, batch {batch}: >= {target}x dense", values, target, True)
    values = [(f"s{r.sparsity} b{r.batch} t{r.threads}", r.speedup) for r in inference]
    check("condense() never slower than dense (speedup >= 1)", values, 1.0, True)
    return out


def markdown(
    machine: dict[str, str],
    rows: list[Row],
    inference: list[InferenceRow],
    goal_rows: list[tuple[str, str, bool | None]],
) -> str:
    lines = [
        "# Training-step benchmark (scripts/bench_training.py)",
        "",
        f"CPU: {machine['cpu']}; torch {machine['torch']}; kernels {machine['kernels']}; "
        f"tuning {machine['tuning']}; SparseProp: {machine['sparseprop']}.",
        "",
        "## Goals (issue 15)",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for name, text, ok in goal_rows:
        lines.append(f"| {name} | {text} | {'yes' if ok else 'no' if ok is False else '-'} |")
    lines += [
        "",
        "## Training steps (medians; x dense = amortized time / dense step; MB train = params + grads + optimizer)",
        "",
        "| model | dtype | batch | sparsity | threads | variant | step ms | update ms | amortized ms | x dense | MB train |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.dtype} | {r.batch} | {r.sparsity:.2f} | {r.threads} | {r.variant} | {r.step_ms:.2f} | "
            f"{r.update_ms:.1f} | {r.amortized_ms:.2f} | {r.ratio:.3f} | {r.train_mb:.2f} |"
        )
    if inference:
        lines += [
            "",
            "## Whole-model inference (condense vs dense)",
            "",
            "| sparsity | batch | threads | dense ms | condensed ms | speedup | forms |",
            "|---|---|---|---|---|---|---|",
        ]
        for i in inference:
            lines.append(
                f"| {i.sparsity:.2f} | {i.batch} | {i.threads} | {i.dense_ms:.2f} | {i.condensed_ms:.2f} | "
                f"{i.speedup:.2f} | {i.forms} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """Speedup over dense (amortized) against sparsity, one panel per model and batch, one line per variant and
    thread count."""
    plt = pyplot()
    rows = [r for r in rows if r.dtype == "float32"]
    panels = sorted({(r.model, r.batch) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for axis, (model, batch) in zip(axes[0], panels, strict=True):
        lines: dict[tuple[str, int], list[Row]] = {}
        for r in rows:
            if (r.model, r.batch) == (model, batch) and r.variant != "dense":
                lines.setdefault((r.variant, r.threads), []).append(r)
        for (variant, threads), points in sorted(lines.items()):
            points.sort(key=lambda r: r.sparsity)
            axis.plot(
                [r.sparsity for r in points],
                [1.0 / r.ratio for r in points],
                marker="o",
                linestyle="-" if threads == 1 else "--",
                label=f"{variant} ({threads} thr)",
            )
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{model}, batch {batch}")
        axis.set_xlabel("sparsity")
        axis.set_ylabel("speedup over dense (amortized step)")
        axis.set_yscale("log")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def start_peer(args: Args) -> tuple[peers.PeerProcess | None, str]:
    """The SparseProp worker, or None with the reason (``--peers off``, or setup failed under ``auto``)."""
    if args.peers == "off":
        return None, "off (--peers off)"
    try:
        if not peers.available():
            peers.setup_peers()
        peer = peers.PeerProcess()
        info = peer.info()
        return peer, f"sparseprop {info.get('sparseprop', '?')} in {peers.default_venv()}"
    except peers.PeerError as error:
        if args.peers == "on":
            raise
        print(f"SparseProp left out: {error}", file=sys.stderr)
        return None, f"unavailable ({str(error).splitlines()[0]})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    status = kernel_status()
    peer, peer_text = start_peer(args)
    machine = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "kernels": f"{status['state']} ({status['isa']})",
        "tuning": f"{status.get('tuning')} (tile_bytes={status.get('tile_bytes')}, gather_max_batch="
        f"{status.get('gather_max_batch')})",
        "sparseprop": peer_text,
    }
    print(
        f"{machine['cpu']}, torch {machine['torch']}, kernels {machine['kernels']}, tuning {machine['tuning']}"
    )
    print(f"SparseProp: {peer_text}")
    start = time.perf_counter()
    print(f"{HEADER}\n{'-' * len(HEADER)}")
    rows: list[Row] = []
    try:
        for model in args.models:
            for batch in args.batches:
                for sparsity in args.sparsities:
                    for threads in args.threads:
                        for dtype_name in args.dtypes:
                            point = bench_point(args, model, batch, sparsity, threads, peer, dtype_name)
                            print("\n".join(format_row(r) for r in point), flush=True)
                            rows += point
    finally:
        if peer is not None:
            peer.close()
    inference = [] if args.skip_inference else bench_inference(args)
    goal_rows = goals(rows, inference)
    print()
    for name, text, ok in goal_rows:
        print(f"{'MET    ' if ok else 'MISSED ' if ok is False else 'n/a    '} {name}: {text}")
    out = Path(args.out)
    write_json(
        out / "results.json",
        {
            "args": asdict(args),
            "machine": machine,
            "rows": [asdict(r) for r in rows],
            "inference": [asdict(r) for r in inference],
            "goals": [{"goal": n, "measured": t, "met": ok} for n, t, ok in goal_rows],
        },
    )
    write_atomic(out / "results.md", markdown(machine, rows, inference, goal_rows).encode())
    if rows:
        plot(rows, out / "speedup.png")
    print(
        f"\nwrote {out / 'results.json'}, results.md and speedup.png in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
