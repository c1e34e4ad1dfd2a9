"""Worker functions of the sharded-DSL tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sparseapps.recsys.distributed import ShardedSparseEmbeddings, ShardingConfig, shard_model
from sparseapps.recsys.dsl import DSL_SPARSITY, DSLConfig
from sparseapps.recsys.models import MatrixFactorization, ModelConfig

N_USERS, N_ITEMS, DIM = 12, 20, 8
GLOBAL_BATCH = 16
STEPS = 24


def make_model(collection: str = "embedding", layout: str = "per_table") -> MatrixFactorization:
    torch.manual_seed(0)
    return MatrixFactorization(
        N_USERS,
        N_ITEMS,
        ModelConfig(dim=DIM, layout=layout, collection=collection),  # type: ignore[arg-type]
    )


def dsl_config(**overrides: Any) -> DSLConfig:
    """DSL at density 0.5 from random masks, gradient growth every 4 steps; ``overrides`` of the engine's
    settings (``grow``, ``update_interval``, ...) go to the held SparsityConfig."""
    own = {name: overrides.pop(name) for name in ("density", "init", "method") if name in overrides}
    engine: dict[str, Any] = dict(grow="gradient", update_interval=4, drop_fraction=0.3, end_fraction=0.75)
    engine.update(overrides)
    return DSLConfig(**{"density": 0.5, "init": "random", **own}, sparsity=DSL_SPARSITY.replace(**engine))


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randint(0, N_USERS, (GLOBAL_BATCH,), generator=generator),
            torch.randint(0, N_ITEMS, (GLOBAL_BATCH,), generator=generator),
            torch.randint(0, N_ITEMS, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def setup(
    sharding: str, collection: str, layout: str, column_shards: int = 0, **dsl: Any
) -> tuple[Any, Any, ShardedSparseEmbeddings]:
    config = ShardingConfig(sharding=sharding, learning_rate=0.5, column_shards=column_shards)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dmp, optimizer = shard_model(make_model(collection, layout), config)
    sparse = ShardedSparseEmbeddings(dmp, optimizer, dsl_config(**dsl), total_steps=STEPS)
    return dmp, optimizer, sparse


def run_steps(
    dmp: Any, optimizer: Any, sparse: ShardedSparseEmbeddings, rank: int, world: int, steps: range
) -> list:
    """Trains on this rank's share of each global batch; returns the assembled tables after every update."""
    local = GLOBAL_BATCH // world
    data = batches()
    snapshots = []
    for step in steps:
        users, positives, negatives = (t[rank * local : (rank + 1) * local] for t in data[step])
        optimizer.zero_grad()
        dmp.module.loss(users, positives, negatives).backward()
        optimizer.step()
        if sparse.history and sparse.history[-1]["step"] == sparse.step:
            snapshots.append(sparse.full_tables())
    return snapshots


def lookup_all(dmp: Any, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user and item row through the sharded lookup (each rank asks for its half; gathered)."""
    users = torch.arange(N_USERS).chunk(world)[rank]
    items = torch.arange(N_ITEMS).chunk(world)[rank]
    with torch.no_grad():
        user_rows, item_rows = dmp.module.tables.lookup(users, items)
    gathered_users = [torch.zeros(len(c), DIM) for c in torch.arange(N_USERS).chunk(world)]
    gathered_items = [torch.zeros(len(c), DIM) for c in torch.arange(N_ITEMS).chunk(world)]
    torch.distributed.all_gather(gathered_users, user_rows.contiguous())
    torch.distributed.all_gather(gathered_items, item_rows.contiguous())
    return torch.cat(gathered_users), torch.cat(gathered_items)


def train(
    rank: int, world: int, sharding: str, collection: str, layout: str, column_shards: int = 0, **dsl: Any
) -> dict[str, Any]:
    dmp, optimizer, sparse = setup(sharding, collection, layout, column_shards, **dsl)
    initial = sparse.full_tables()
    snapshots = run_steps(dmp, optimizer, sparse, rank, world, range(STEPS))
    final = sparse.full_tables()
    return {
        "initial": initial,
        "snapshots": snapshots,
        "final": final,
        "lookups": lookup_all(dmp, rank, world),
        "shard_shapes": [(s.fqn, s.offsets, tuple(s.mask.shape), s.budget) for s in sparse.shards],
        "history": sparse.history,
    }


def checkpoint_round_trip(rank: int, world: int, sharding: str, path: str) -> dict[str, Any]:
    """Train 12 steps, save with DCP, train 12 more; then restore into fresh modules and train the same 12."""
    import torch.distributed.checkpoint as dcp

    half = STEPS // 2
    dmp, optimizer, sparse = setup(sharding, "embedding", "per_table", grow="momentum")
    run_steps(dmp, optimizer, sparse, rank, world, range(half))
    dcp.save({"model": dmp.state_dict(), "sparsity": sparse.state_dict()}, checkpoint_id=path)
    run_steps(dmp, optimizer, sparse, rank, world, range(half, STEPS))
    expected = sparse.full_tables()

    torch.manual_seed(123)  # other initial weights: the checkpoint must overwrite them
    dmp2, optimizer2, sparse2 = setup(sharding, "embedding", "per_table", grow="momentum")
    state = {"model": dmp2.state_dict(), "sparsity": sparse2.state_dict()}
    dcp.load(state, checkpoint_id=path)
    dmp2.load_state_dict(state["model"])
    sparse2.load_state_dict(state["sparsity"])
    restored_step = sparse2.step
    run_steps(dmp2, optimizer2, sparse2, rank, world, range(half, STEPS))
    return {"expected": expected, "resumed": sparse2.full_tables(), "restored_step": restored_step}


def refuse(rank: int, world: int, sharding: str, collection: str, column_shards: int = 0) -> dict[str, Any]:
    shard_model(make_model(collection), ShardingConfig(sharding=sharding, column_shards=column_shards))  # type: ignore[arg-type]
    return {}


def corrupt_replicated(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 flips one entry of a replicated (data-parallel) table's mask; the check must name it."""
    _, _, sparse = setup("data_parallel", "embedding_bag", "per_table")
    if rank == 1:
        sparse.shards[0].mask[0, 0] = ~sparse.shards[0].mask[0, 0]
    sparse.verify_replicated()
    return {}


def train_growing_by(rank: int, world: int, grow: str) -> dict[str, Any]:
    """:func:`train` with column-wise shards and the growth criterion ``grow`` (a score registry name)."""
    return train(rank, world, "column_wise", "embedding", "per_table", grow=grow)


def refuse_criterion(rank: int, world: int, grow: str) -> dict[str, Any]:
    """Builds sharded DSL with a growth criterion that shards cannot feed (the error comes back)."""
    setup("column_wise", "embedding", "per_table", grow=grow)
    return {}
