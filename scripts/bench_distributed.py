"""1 -> 2 process scaling of distributed sparse training, with the metric difference to the 1-process run.

Runs ``scripts/dist_train.py`` under ``torchrun`` with 1 and then 2 processes (gloo, one thread each), for
  mlp       RigL at 80% sparsity on an MLP 64-256-256-10 under DDP, global batch 256, 400 steps;
  mf-tw     DSL MF-BPR (dim 64, density 0.2, nested masks, gradient growth) on ML-100K, tables sharded
            table-wise over the ranks (torchrec DMP, fused SGD), global batch 2048, 10 epochs;
  mf-dp     the same with data-parallel (replicated) tables.
Each configuration is repeated; the median training throughput (global samples per second, warm-up excluded)
and the median final metric are reported, with the ratio 2-process / 1-process and the relative metric
difference. Results go to stdout and --out (JSON).

    .venv/bin/python scripts/bench_distributed.py                 # 3 repeats (about 10 minutes)
    .venv/bin/python scripts/bench_distributed.py --quick         # 1 repeat, short runs

On a shared 2-core machine two processes cannot scale much: each process gets one core at best, and the
gradient all-reduce (DDP) or embedding all-to-all (DMP) runs on the same cores as the compute. Run it on a
multi-core node (or GPUs) for real scaling numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, list[str]] = {
    "mlp": ["--task", "mlp", "--steps", "400"],
    "mf-tw": ["--task", "mf", "--sharding", "table_wise", "--epochs", "10"],
    "mf-dp": ["--task", "mf", "--sharding", "data_parallel", "--epochs", "10"],
}
QUICK: dict[str, list[str]] = {
    "mlp": ["--task", "mlp", "--steps", "100"],
    "mf-tw": ["--task", "mf", "--sharding", "table_wise", "--epochs", "3"],
    "mf-dp": ["--task", "mf", "--sharding", "data_parallel", "--epochs", "3"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: list[str], nproc: int) -> dict[str, Any]:
    """One torchrun launch; returns rank 0's results.json."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(ROOT / "scripts" / "dist_train.py"),
            *args,
            "--out",
            out,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
        return json.loads((Path(out) / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per configuration (medians are reported)"
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat of short runs (a smoke test)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--out", default="runs/bench_distributed.json", help="JSON output path")
    options = parser.parse_args()
    cases = QUICK if options.quick else CASES
    repeats = 1 if options.quick else options.repeats
    chosen = [c for c in options.cases.split(",") if c]
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {list(cases)}")
    print(f"cpu cores visible: {os.cpu_count()}; repeats: {repeats}")
    print("note: on a shared 2-core machine, 2 processes cannot scale much (one core each at best, and the")
    print("      communication runs on the same cores); use a multi-core node or GPUs for scaling numbers.\n")
    rows = []
    for case in chosen:
        per_world: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for repeat in range(repeats):
            for nproc in (1, 2):  # alternate, so slow phases of the machine hit both
                started = time.perf_counter()
                result = run(cases[case], nproc)
                per_world[nproc].append(result)
                print(
                    f"  {case} nproc={nproc} repeat={repeat}: {result['metric']}={result['value']:.4f} "
                    f"samples/s={result['samples_per_second']:.0f} ({time.perf_counter() - started:.0f}s wall)"
                )
        medians = {
            n: {
                "samples_per_second": statistics.median(r["samples_per_second"] for r in runs),
                "value": statistics.median(r["value"] for r in runs),
            }
            for n, runs in per_world.items()
        }
        one, two = medians[1], medians[2]
        row = {
            "case": case,
            "metric": per_world[1][0]["metric"],
            "samples_per_second_1": one["samples_per_second"],
            "samples_per_second_2": two["samples_per_second"],
            "speedup_2_over_1": two["samples_per_second"] / one["samples_per_second"],
            "metric_1": one["value"],
            "metric_2": two["value"],
            "metric_relative_difference": abs(two["value"] - one["value"]) / abs(one["value"]),
            "within_1_percent": abs(two["value"] - one["value"]) <= 0.01 * abs(one["value"]),
            "runs": {str(n): runs for n, runs in per_world.items()},
        }
        rows.append(row)
    print()
    header = f"{'case':<7} {'metric':<16} {'1 proc':>9} {'2 proc':>9} {'rel diff':>9} {'samples/s 1':>12} {'samples/s 2':>12} {'2/1':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['case']:<7} {row['metric']:<16} {row['metric_1']:>9.4f} {row['metric_2']:>9.4f} "
            f"{row['metric_relative_difference']:>9.2%} {row['samples_per_second_1']:>12.0f} "
            f"{row['samples_per_second_2']:>12.0f} {row['speedup_2_over_1']:>6.2f}"
        )
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "repeats": repeats, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
