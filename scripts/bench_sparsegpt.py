"""Benchmark: SparseGPT against magnitude pruning, one shot, on a small character-level transformer LM.

The dense model is ``sparseapps.core.charlm``'s char transformer (4 blocks, d = 128, 4 heads, context 64),
trained here on the first 1,000,000 characters of the Python standard library's own ``.py`` files (no download;
cached after the first run). Every Linear layer of the blocks is pruned (``qkv``, ``proj``, ``fc1``, ``fc2``:
16 layers); the embeddings, LayerNorms and the output head stay dense, as in the SparseGPT paper.

Per pattern (unstructured sparsities and one N:M), SparseGPT prunes a copy of the dense model layer after layer
from ``--calibration-sequences`` random training windows of 64 characters; each of ``--seeds`` seeds draws
another calibration sample. Magnitude pruning needs no data, so it runs once per pattern. The table gives the
validation perplexity (mean and min-max over seeds) beside the dense model's, and the mean per-layer relative
reconstruction error ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs.

Writes ``results.json`` (every run, with per-layer reports) and ``results.md`` (with the CPU) to ``--out``.

    python scripts/bench_sparsegpt.py              # the full run: 2-3 min of training once, then 2-3 min
    python scripts/bench_sparsegpt.py --quick      # a tiny model and corpus, 2 seeds: a smoke run of seconds
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparseapps.core.charlm import CharLMConfig, CharTransformer, load_charlm, perplexity, sample_windows
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.options import parse_config, torch_threads
from sparseapps.core.sparsegpt import LayerReport, magnitude_prune_model, prune_model

DENSE = "dense"
METHODS = ("magnitude", "sparsegpt")


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_sparsegpt", metadata={"help": "output folder"})
    quick: bool = field(
        default=False,
        metadata={"help": "a 1-block d=32 model, 100k characters, 30 steps, 2 seeds, 16 sequences: seconds"},
    )
    sparsities: tuple[float, ...] = field(
        default=(0.5, 0.7, 0.9), metadata={"help": "unstructured fractions of zeros per layer"}
    )
    n_m: tuple[int, ...] = field(
        default=(2, 4), metadata={"help": "N:M pattern: keep N of every M (two ints)"}
    )
    seeds: int = field(default=3, metadata={"help": "calibration samples per point (seeds 0 .. seeds-1)"})
    calibration_sequences: int = field(default=128, metadata={"help": "calibration windows per seed"})
    calibration_batch: int = field(default=32, metadata={"help": "windows per calibration forward pass"})
    block_size: int = field(default=128, metadata={"help": "SparseGPT's mask-selection block (columns)"})
    damp: float = field(default=0.01, metadata={"help": "SparseGPT's relative Hessian dampening"})
    layers: int = field(default=4, metadata={"help": "transformer blocks of the char LM"})
    width: int = field(default=128, metadata={"help": "model width d"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    context: int = field(default=64, metadata={"help": "characters per window"})
    corpus_characters: int = field(default=1_000_000, metadata={"help": "characters of the corpus"})
    steps: int = field(default=500, metadata={"help": "training steps of the dense model"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    data_root: str = field(
        default="", metadata={"help": "model cache root ('' = $SPARSEAPPS_DATA or ~/.cache/sparseapps/data)"}
    )

    def __post_init__(self) -> None:
        if not self.sparsities or not all(0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"expected sparsities in (0, 1), got {self.sparsities}")
        if len(self.n_m) != 2 or not 1 <= self.n_m[0] <= self.n_m[1]:
            raise ValueError(f"expected n_m as two integers N M with 1 <= N <= M, got {self.n_m}")
        for name in ("seeds", "calibration_sequences", "calibration_batch", "block_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")

    def model_config(self) -> CharLMConfig:
        return CharLMConfig(
            layers=self.layers,
            width=self.width,
            heads=self.heads,
            context=self.context,
            corpus_characters=self.corpus_characters,
            steps=self.steps,
        )


QUICK = {
    "sparsities": (0.5,),
    "seeds": 2,
    "calibration_sequences": 16,
    "calibration_batch": 8,
    "layers": 1,
    "width": 32,
    "heads": 2,
    "context": 32,
    "corpus_characters": 100_000,
    "steps": 30,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


@dataclass(frozen=True)
class Run:
    """One pruned model: its pattern (``"50%"``, ``"2:4"``), the method, the calibration seed (magnitude: none)."""

    pattern: str
    method: str
    seed: int | None
    perplexity: float
    sparsity: float  # zeros / entries over the pruned layers
    layers: list[LayerReport]


def pattern_name(sparsity: float | None, n_m: tuple[int, int] | None) -> str:
    return f"{n_m[0]}:{n_m[1]}" if n_m is not None else f"{sparsity:.0%}"


def patterns(args: Args) -> list[tuple[float | None, tuple[int, int] | None]]:
    """``(sparsity, None)`` per sparsity and ``(None, (N, M))``, by fraction of zeros (unstructured first)."""
    n, m = args.n_m
    items: list[tuple[float | None, tuple[int, int] | None]] = [(s, None) for s in args.sparsities]
    return sorted([*items, (None, (n, m))], key=lambda p: (1 - n / m if p[0] is None else p[0], p[0] is None))


def pruned_sparsity(model: CharTransformer, names: list[str]) -> float:
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_pattern(
    dense: CharTransformer,
    validation: torch.Tensor,
    train: torch.Tensor,
    sparsity: float | None,
    n_m: tuple[int, int] | None,
    args: Args,
) -> list[Run]:
    """Magnitude once, then SparseGPT once per calibration seed, each on a fresh copy of ``dense``."""
    name = pattern_name(sparsity, n_m)
    model = copy.deepcopy(dense)
    masks = magnitude_prune_model(model, sparsity=sparsity, n_m=n_m)
    runs = [
        Run(name, "magnitude", None, perplexity(model, validation), pruned_sparsity(model, list(masks)), [])
    ]
    for seed in range(args.seeds):
        generator = torch.Generator().manual_seed(seed)
        windows = sample_windows(train, args.calibration_sequences, args.context, generator)
        model = copy.deepcopy(dense)
        reports = prune_model(
            model,
            list(windows.split(args.calibration_batch)),
            sparsity=sparsity,
            n_m=n_m,
            block_size=args.block_size,
            damp=args.damp,
        )
        names = [r.fqn for r in reports]
        runs.append(
            Run(
                name, "sparsegpt", seed, perplexity(model, validation), pruned_sparsity(model, names), reports
            )
        )
    return runs


def summary(runs: list[Run], pattern: str, method: str) -> dict[str, float]:
    """Perplexity mean / min / max over the runs of ``pattern`` and ``method``, and the mean layer errors."""
    chosen = [r for r in runs if r.pattern == pattern and r.method == method]
    values = [r.perplexity for r in chosen]
    layers = [layer for r in chosen for layer in r.layers]
    result = {
        "runs": len(chosen),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "sparsity": statistics.fmean(r.sparsity for r in chosen),
    }
    if layers:
        for key in ("error_without_update", "error_with_update", "error_magnitude"):
            result[key] = statistics.fmean(getattr(layer, key) for layer in layers)
    return result


def markdown(args: Args, dense: float, points: dict[str, dict[str, dict[str, float]]], seconds: float) -> str:
    config = args.model_config()
    lines = [
        "# SparseGPT vs magnitude pruning, one shot, on a char-level transformer LM",
        "",
        f"Model: {config.layers} blocks, d = {config.width}, {config.heads} heads, context {config.context}, "
        f"trained {config.steps} AdamW steps on the first {config.corpus_characters:,} characters of the Python "
        f"{platform.python_version()} standard library's `.py` files (90% train / 10% validation). "
        f"Pruned: every Linear of the blocks (not the embeddings or the head), each to the pattern. SparseGPT: "
        f"{args.calibration_sequences} calibration windows per seed, {args.seeds} seeds, block {args.block_size}, "
        f"damp {args.damp}; magnitude needs no data (one run).",
        "",
        f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s); {seconds:.0f} s in all.",
        "",
        "Validation perplexity (lower is better); SparseGPT: mean [min, max] over calibration seeds. "
        "Layer error: mean over pruned layers of ||(W - W')X||² / ||WX||² on SparseGPT's calibration inputs "
        "(magnitude's mask / SparseGPT's mask without the update / SparseGPT).",
        "",
        "| pattern | dense | magnitude | SparseGPT | layer error: magnitude / mask only / SparseGPT |",
        "|---|---|---|---|---|",
    ]
    for pattern, methods in points.items():
        m, s = methods["magnitude"], methods["sparsegpt"]
        lines.append(
            f"| {pattern} | {dense:.3f} | {m['mean']:.3f} | {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}] | "
            f"{s['error_magnitude']:.4f} / {s['error_without_update']:.4f} / {s['error_with_update']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with torch_threads(args.threads):
        run(args, " ".join(["scripts/bench_sparsegpt.py", *argv]))


def run(args: Args, command: str) -> None:
    """Loads (or trains) the dense model, prunes it every way and writes the outputs (the body of :func:`main`)."""
    start = time.perf_counter()
    dense, corpus = load_charlm(args.model_config(), args.data_root or None)
    dense_perplexity = perplexity(dense, corpus.validation)
    print(
        f"dense: validation perplexity {dense_perplexity:.3f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    runs: list[Run] = []
    points: dict[str, dict[str, dict[str, float]]] = {}
    for sparsity, n_m in patterns(args):
        runs += run_pattern(dense, corpus.validation, corpus.train, sparsity, n_m, args)
        name = pattern_name(sparsity, n_m)
        points[name] = {method: summary(runs, name, method) for method in METHODS}
        m, s = points[name]["magnitude"], points[name]["sparsegpt"]
        print(
            f"{name:>5s}  magnitude {m['mean']:.3f}  sparsegpt {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]  "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    write_json(
        out / "results.json",
        {
            "args": asdict(args),
            "command": command,
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "corpus_sha256": corpus.sha256,
            "dense_perplexity": dense_perplexity,
            "points": points,
            "runs": [asdict(r) for r in runs],
            "seconds": seconds,
        },
    )
    text = markdown(args, dense_perplexity, points, seconds)
    write_atomic(out / "results.md", text.encode())
    print(f"\n{text}\nwrote {out / 'results.json'} and results.md in {seconds:.0f} s")


if __name__ == "__main__":
    main()
