"""Self-check of the SparseProp peer: by default the quick MLP 784-256-256-10 at 90% (ERK), batch 64, 1 thread.

    .venv/bin/python scripts/peers/check.py             # sets up .peers-venv first if it is missing
    .venv/bin/python scripts/peers/check.py --steps 40  # longer dense-vs-SparseProp comparison
    .venv/bin/python scripts/peers/check.py --model block --full --batch 256 --threads 2

Prints SparseProp's ms/step over 5 steps and its training memory, then dense torch against SparseProp in one
worker process, interleaved step by step (medians after warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import PeerProcess, available, setup_peers

WIDTHS = {  # bench_training.py's sizes: (quick, full)
    "mlp": ([784, 256, 256, 10], [784, 4096, 4096, 10]),
    "block": ([128, 512, 128], [768, 3072, 768]),
}


def mb(memory: dict[str, int]) -> str:
    train = (memory["params"] + memory["grads"] + memory["optimizer"]) / 2**20
    return (
        f"{train:.3f} MB train (params {memory['params']}, grads {memory['grads']}, "
        f"AdamW {memory['optimizer']} B), {memory['structure'] / 2**20:.3f} MB structure"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=30, help="interleaved steps per variant in the comparison"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--model", choices=sorted(WIDTHS), default="mlp")
    parser.add_argument(
        "--full", action="store_true", help="bench_training's full sizes instead of --quick's"
    )
    args = parser.parse_args()
    if not available():
        setup_peers()
    widths = WIDTHS[args.model][args.full]
    point = dict(model=args.model, widths=widths, batch=args.batch, sparsity=args.sparsity, seed=0)
    point["threads"] = args.threads
    print(f"{args.model} {'-'.join(map(str, widths))}, batch {args.batch}, sparsity {args.sparsity} (ERK)")
    with PeerProcess() as peer:
        info = peer.info()
        print(f"worker: torch {info['torch']}, sparseprop {info['sparseprop']}, CPU {info['cpu']!r}")
        built = peer.build(name="sparseprop", **point)
        for layer in built["layers"]:
            kind = "SparseLinear" if layer["sparseprop"] else "nn.Linear (dense under ERK)"
            density = layer["nnz"] / (layer["shape"][0] * layer["shape"][1])
            print(
                f"  layer {layer['fqn']} {layer['shape']}: nnz {layer['nnz']} (density {density:.3f}) -> {kind}"
            )
        print(f"  threads {built['threads']} (OpenMP max {built['omp_max_threads']})")
        ms = peer.steps(5, name="sparseprop")
        print("sparseprop 5 steps, ms:", " ".join(f"{t:.2f}" for t in ms))
        print("sparseprop memory:", mb(peer.memory(name="sparseprop")))

        peer.build(name="dense", dense=True, **point)
        for _ in range(args.warmup):
            for name in ("dense", "sparseprop"):
                peer.steps(1, name=name)
        times: dict[str, list[float]] = {"dense": [], "sparseprop": []}
        in_optimizer: dict[str, list[float]] = {"dense": [], "sparseprop": []}
        for _ in range(args.steps):
            for name in times:
                answer = peer.request("steps", n=1, name=name)
                times[name] += answer["ms"]
                in_optimizer[name] += answer["optimizer_ms"]
        dense = statistics.median(times["dense"])
        print(f"interleaved, {args.steps} steps each, batch {args.batch}, {args.threads} thread(s):")
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"  {name:<10} median {median:8.3f} ms/step  ({median / dense:.3f}x dense; AdamW.step "
                f"{statistics.median(in_optimizer[name]):.3f} ms)  {mb(peer.memory(name=name))}"
            )


if __name__ == "__main__":
    main()
