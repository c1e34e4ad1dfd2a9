"""Distributed sparse training, launched by ``torchrun``: an MLP under DDP, or DSL MF-BPR on torchrec DMP.

    # two CPU processes (gloo), RigL on a synthetic classification task
    torchrun --nproc_per_node=2 scripts/dist_train.py --task mlp --out runs/dist-mlp
    # DSL MF-BPR on ML-100K with table-wise sharded tables
    torchrun --nproc_per_node=2 scripts/dist_train.py --task mf --sharding table_wise --out runs/dist-mf
    # one GPU per process (NCCL), or across nodes: see docs/distributed.md
    torchrun --nproc_per_node=8 scripts/dist_train.py --task mlp --device cuda

Each rank trains on its share of every global batch (``--batch-size`` is global). Every topology update is
checked across ranks (masks identical on every rank for DDP and replicated tables). Rank 0 prints and writes
``results.json`` to ``--out``: the final metric, training samples per second and the number of cross-rank checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparseapps.core import SparsityConfig
from sparseapps.core.distributed import DistributedSparsity


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments (one per field)."""

    task: str = field(default="mlp", metadata={"help": "mlp (DDP + core engine) or mf (DMP + sharded DSL)"})
    steps: int = field(default=400, metadata={"help": "mlp: optimizer steps"})
    epochs: int = field(default=10, metadata={"help": "mf: epochs over the ML-100K train pairs"})
    batch_size: int = field(default=0, metadata={"help": "global batch (0: 256 for mlp, 2048 for mf)"})
    lr: float = field(
        default=0.0, metadata={"help": "learning rate (0: 0.05 for mlp; 100 for mf, SGD on a mean loss)"}
    )
    preset: str = field(default="rigl", metadata={"help": "mlp: core preset (rigl, set, snfs, ...)"})
    sparsity: float = field(default=0.8, metadata={"help": "fraction of zeros (mf: of the embedding tables)"})
    sync: str = field(
        default="verify", metadata={"help": "mlp: verify (checksums) or broadcast (rank 0's masks)"}
    )
    sharding: str = field(
        default="table_wise", metadata={"help": "mf: data_parallel, table_wise, column_wise or row_wise"}
    )
    seed: int = field(default=0, metadata={"help": "seed of data, weights and masks"})
    device: str = field(default="cpu", metadata={"help": "cpu (gloo) or cuda (nccl, one GPU per process)"})
    threads: int = field(default=1, metadata={"help": "torch threads per process"})
    out: str = field(default="", metadata={"help": "directory for results.json (rank 0); empty: print only"})


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Args):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"]
        )
    args = Args(**vars(parser.parse_args(argv)))
    if args.task not in ("mlp", "mf"):
        parser.error(f"--task must be 'mlp' or 'mf', got {args.task!r}")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be 'cpu' or 'cuda', got {args.device!r}")
    return args


def init_distributed(args: Args) -> torch.device:
    """The process group from torchrun's environment; gloo on CPU, NCCL with one GPU per local rank."""
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc_per_node=2 scripts/dist_train.py ...")
    timeout = datetime.timedelta(minutes=10)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout)
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- MLP under DDP
FEATURES, HIDDEN, CLASSES = 64, 256, 10


def synthetic_classification(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random teacher MLP labels Gaussian inputs (the same data on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, 32, generator=generator), torch.randn(32, CLASSES, generator=generator)
    targets = (torch.tanh(inputs @ teacher[0]) @ teacher[1]).argmax(1)
    return inputs, targets


def train_mlp(args: Args, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = args.batch_size or 256
    if batch % world:
        raise SystemExit(f"--batch-size {batch} must be divisible by the world size {world}")
    lr = args.lr or 0.05
    inputs, targets = synthetic_classification(args.steps * batch + 4096, args.seed)
    test_x, test_y = inputs[-4096:].to(device), targets[-4096:].to(device)
    torch.manual_seed(args.seed)
    module = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    ).to(device)
    model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = SparsityConfig.preset(args.preset, sparsity=args.sparsity, update_interval=50, seed=args.seed)
    sparsity = DistributedSparsity.attach(model, optimizer, config, args.steps, sync=args.sync)  # type: ignore[arg-type]
    local = batch // world
    warmup = min(10, args.steps // 4)
    start = 0.0
    for step in range(args.steps):
        if step == warmup:
            dist.barrier()
            start = time.perf_counter()
        offset = step * batch + rank * local
        x, y = inputs[offset : offset + local].to(device), targets[offset : offset + local].to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    dist.barrier()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = module(test_x)
        accuracy = float((logits.argmax(1) == test_y).float().mean())
        loss = float(F.cross_entropy(logits, test_y))
    return {
        "metric": "test_accuracy",
        "value": accuracy,
        "test_loss": loss,
        "samples_per_second": (args.steps - warmup) * batch / seconds,
        "density": sparsity.engine.density,
        "topology_updates": len(sparsity.engine.history),
        "cross_rank_checks": sparsity.checks,
    }


# --------------------------------------------------------------------------------------------- MF on DMP
def train_mf(args: Args, device: torch.device) -> dict[str, Any]:
    from sparseapps.recsys.data import BPRSampler, DataConfig, load_split
    from sparseapps.recsys.distributed import ShardedSparseEmbeddings, ShardingConfig, shard_model
    from sparseapps.recsys.dsl import DSL_SPARSITY, DSLConfig
    from sparseapps.recsys.metrics import evaluate_split
    from sparseapps.recsys.models import MatrixFactorization, ModelConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    batch = args.batch_size or 2048
    if batch % world:
        raise SystemExit(f"--batch-size {batch} must be divisible by the world size {world}")
    split = load_split(DataConfig(dataset="ml-100k", download=False, seed=args.seed), progress=False)
    collection = "embedding_bag" if args.sharding == "data_parallel" else "embedding"
    torch.manual_seed(args.seed)
    model = MatrixFactorization(
        split.n_users,
        split.n_items,
        ModelConfig(dim=64, layout="per_table", collection=collection),  # type: ignore[arg-type]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dmp, optimizer = shard_model(
            model,
            ShardingConfig(sharding=args.sharding, learning_rate=args.lr or 100.0),  # type: ignore[arg-type]
        )
    sampler = BPRSampler(split, batch_size=batch, seed=args.seed, drop_last=True)
    total_steps = args.epochs * len(sampler)
    popularity = (
        torch.bincount(torch.as_tensor(split.train[:, 0]), minlength=split.n_users).numpy(),
        torch.bincount(torch.as_tensor(split.train[:, 1]), minlength=split.n_items).numpy(),
    )
    sparse = ShardedSparseEmbeddings(
        dmp,
        optimizer,
        DSLConfig(
            density=round(1.0 - args.sparsity, 12),
            init="nested",
            sparsity=DSL_SPARSITY.replace(grow="gradient", update_interval=50),
        ),
        total_steps,
        user_popularity=popularity[0],
        item_popularity=popularity[1],
    )
    local = batch // world
    seconds, samples = 0.0, 0
    for epoch in range(args.epochs):
        dist.barrier()
        start = time.perf_counter()
        for users, positives, negatives in sampler:
            part = slice(rank * local, (rank + 1) * local)
            optimizer.zero_grad()
            dmp.module.loss(users[part], positives[part], negatives[part]).backward()
            optimizer.step()
        dist.barrier()
        if epoch > 0:  # the first epoch warms up
            seconds += time.perf_counter() - start
            samples += len(sampler) * batch
    tables = sparse.full_tables()
    users_weight, items_weight = tables["user_table"][0], tables["item_table"][0]
    items_t = items_weight.t().contiguous()
    metrics = evaluate_split(lambda ids: users_weight[ids] @ items_t, split, "test", ks=(20,))
    nnz = sum(int(mask.sum()) for _, mask in tables.values())
    return {
        "metric": "test_recall@20",
        "value": metrics["recall@20"],
        "test_ndcg@20": metrics["ndcg@20"],
        "samples_per_second": samples / seconds if seconds else float("nan"),
        "density": nnz / sum(mask.numel() for _, mask in tables.values()),
        "topology_updates": len(sparse.history),
        "sharding": args.sharding,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = init_distributed(args)
    try:
        result = train_mlp(args, device) if args.task == "mlp" else train_mf(args, device)
        result.update(
            task=args.task, world_size=dist.get_world_size(), backend=dist.get_backend(), args=vars(args)
        )
        if dist.get_rank() == 0:
            print(json.dumps(result, indent=2))
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
