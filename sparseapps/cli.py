"""`sparseapps ...`: one entry point, a subcommand per job. Each job writes results.json and plots to --out."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sparseapps import __version__
from sparseapps.core import ConfigMismatchError, NonFiniteGradientError
from sparseapps.core.io import CorruptFileError, OutputConflictError, write_atomic, write_json
from sparseapps.core.plotting import pyplot, save_figure

# Domain subpackages add their own subcommands: module path -> function(subparsers) registering them.
DOMAIN_COMMANDS = ("sparseapps.recsys.cli", "sparseapps.rl.cli", "sparseapps.continual.cli")


def info() -> dict[str, object]:
    """Versions, threads and which optional pieces (kernels, frameworks, data) are available here."""
    packages = {}
    for name in (
        "torch",
        "torchvision",
        "torchrec",
        "fbgemm-gpu-cpu",
        "fbgemm-gpu",
        "avalanche-lib",
        "stable-baselines3",
        "gymnasium",
        "mujoco",
        "scikit-learn",
        "recbole",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    kernels: object
    try:
        kernels = importlib.import_module("sparseapps.core.kernels").kernel_status()
    except (ImportError, AttributeError) as error:
        kernels = {"available": False, "reason": f"{type(error).__name__}: {error}"}
    recbole = importlib.util.find_spec("recbole")
    ml100k = None
    if recbole and recbole.submodule_search_locations:
        candidate = (
            Path(next(iter(recbole.submodule_search_locations))) / "dataset_example/ml-100k/ml-100k.inter"
        )
        ml100k = str(candidate) if candidate.exists() else None
    return {
        "sparseapps": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "packages": packages,
        "kernels": kernels,
        "data": {"ml-100k (recbole wheel)": ml100k},
    }


def run_demo(
    out: Path, seeds: int, epochs: int, rescale_initialization: bool = False
) -> list[dict[str, object]]:
    """Core demo: digits MLP at 90% sparsity, dense vs static / SET / RigL / SNFS / SRigL / GMP, and RigL on compact
    storage (the same run as masked RigL, only the active weights stored and computed)."""
    from tqdm import tqdm

    from sparseapps.demo import DigitsRun, train_digits

    methods = (
        ("dense", "masked"),
        ("static", "masked"),
        ("set", "masked"),
        ("rigl", "masked"),
        ("rigl", "compact"),
        ("snfs", "masked"),
        ("srigl", "masked"),
        ("gmp", "masked"),
    )
    rows = []
    progress = tqdm(total=len(methods) * seeds, desc="digits demo", unit="run")
    for method, storage in methods:
        runs = []
        for seed in range(seeds):
            run = DigitsRun(
                method=method,
                hidden=128,
                epochs=epochs,
                seed=seed,
                rescale_initialization=rescale_initialization,
                storage=storage,
            )
            runs.append(train_digits(run))
            progress.update()
        accuracies = [r["test_accuracy"] for r in runs]
        rows.append(
            {
                "method": method if storage == "masked" else f"{method}-{storage}",
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "sparsity": runs[0]["sparsity"],
                "weights_nonzero": runs[0]["weights_nonzero"],
                "flops_fraction": runs[0]["flops_fraction"],
                "itop_rate": (
                    statistics.mean(r["itop_rate"] for r in runs)
                    if runs[0]["itop_rate"] is not None
                    else None
                ),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "curve": [statistics.mean(c) for c in zip(*(r["curve"] for r in runs), strict=True)],
            }
        )
    progress.close()
    out.mkdir(parents=True, exist_ok=True)
    dense = rows[0]["accuracy_mean"]
    lines = [
        f"{'method':<12} {'test acc':>15} {'vs dense':>9} {'sparsity':>9} {'nonzeros':>9} {'FLOPs':>7} {'ITOP':>6} "
        f"{'s/run':>6}",
    ]
    for r in rows:
        itop = f"{r['itop_rate']:>6.3f}" if r["itop_rate"] is not None else f"{'-':>6}"
        lines.append(
            f"{r['method']:<12} {r['accuracy_mean']:>8.4f} ± {r['accuracy_std']:.4f} {r['accuracy_mean'] / dense:>9.3f} "
            f"{r['sparsity']:>9.3f} {r['weights_nonzero']:>9d} {r['flops_fraction']:>7.3f} {itop} {r['seconds']:>6.1f}"
        )
    table = "\n".join(lines)
    print(
        f"\nMLP 64-128-128-10 on scikit-learn digits, {epochs} epochs, mean ± std over {seeds} seeds\n{table}"
    )
    write_json(out / "results.json", {"seeds": seeds, "epochs": epochs, "rows": rows})
    write_atomic(out / "table.txt", (table + "\n").encode())
    plot_curves(rows, out / "accuracy.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'accuracy.png'}")
    return rows


def plot_curves(rows: list[dict[str, object]], path: Path) -> None:
    """Test accuracy per epoch, one line per method."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = r["curve"]
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            label=str(r["method"]),
            linewidth=2.2 if r["method"] == "dense" else 1.4,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("digits MLP at 90% sparsity vs dense")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseapps", description="Sparse-from-scratch training.")
    parser.add_argument("--version", action="version", version=f"sparseapps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, threads, kernels and data available here")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_demo = sub.add_parser(
        "demo",
        help="core digits demo, then the recsys main job (ML-100K dense vs DSL); tables and plots in --out",
    )
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p_demo.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p_demo.add_argument("--epochs", type=int, default=20, help="epochs per run")
    p_demo.add_argument("--core-only", action="store_true", help="run only the core digits demo")
    p_demo.add_argument(
        "--rescale-init",
        action="store_true",
        help="rescale sparse initial weights to the dense output variance",
    )
    for module_name in DOMAIN_COMMANDS:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``sparseapps`` command; returns its exit code (2 for a refused input, file or output directory)."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (CorruptFileError, OutputConflictError, ConfigMismatchError, NonFiniteGradientError) as error:
        # The domains catch these themselves; this keeps any path that does not from ending in a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: checkpoints written so far are kept; run the same command again (with --resume where "
            "the command has it) to continue",
            file=sys.stderr,
        )
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "info":
        data = info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for key, value in data.items():
                if isinstance(value, dict):
                    print(f"{key}:")
                    for k, v in value.items():
                        print(f"  {k}: {v}")
                else:
                    print(f"{key}: {value}")
        return 0
    if args.command == "demo":
        if args.seeds < 1 or args.epochs < 1:
            print(
                f"error: --seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}",
                file=sys.stderr,
            )
            return 2
        os.environ.setdefault("PYTHONHASHSEED", "0")
        run_demo(args.out / "core", args.seeds, args.epochs, args.rescale_init)
        if not args.core_only and importlib.util.find_spec("sparseapps.recsys.train") is not None:
            recsys = importlib.import_module("sparseapps.recsys.train")
            if hasattr(recsys, "run_demo"):
                print("\nrecsys: ML-100K, dense vs DSL (the main job)")
                recsys.run_demo(args.out / "recsys")
        return 0
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
