"""Sparse torchrec tables under DistributedModelParallel with two gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparseapps.recsys.distributed import ShardedSparseEmbeddings, ShardingConfig, shard_model
from tests.distributed import recsys_workers as workers
from tests.distributed.launch import run_distributed

CASES = {
    "table_wise": "embedding",
    "column_wise": "embedding",
    "row_wise": "embedding",
    "data_parallel": "embedding_bag",
}


def check_invariants(result: dict, sharding: str) -> None:
    """Masks applied to the real shards, nnz per shard and per table constant, topology actually updated."""
    initial_nnz = {name: int(mask.sum()) for name, (_, mask) in result["initial"].items()}
    assert len(result["snapshots"]) == 4
    for tables in [*result["snapshots"], result["final"]]:
        for name, (weight, mask) in tables.items():
            assert int(mask.sum()) == initial_nnz[name]
            assert bool((weight[~mask] == 0).all())
    for record in result["history"]:
        for stats in record["tensors"].values():
            assert stats["dropped"] == stats["grown"]
    assert sum(s["grown"] for s in result["history"][0]["tensors"].values()) > 0
    budgets = {(fqn, offsets): budget for fqn, offsets, _, budget in result["shard_shapes"]}
    for record in result["history"]:
        for key, stats in record["tensors"].items():
            fqn, offsets = key.split("@")
            assert stats["nnz"] == budgets[(fqn, tuple(int(v) for v in offsets.strip("()").split(",")))]
    # the sharded lookup returns the masked tables
    users, items = result["lookups"]
    final = result["final"]
    torch.testing.assert_close(users, final["user_table"][0], rtol=0, atol=0)
    torch.testing.assert_close(items, final["item_table"][0], rtol=0, atol=0)


def covered_once(ranks: list[dict], sharding: str) -> None:
    """The ranks' shards tile each table exactly once (twice, i.e. once per rank, when replicated)."""
    counts = {
        "tables.collection.embeddings.user_table.weight": torch.zeros(
            workers.N_USERS, workers.DIM, dtype=torch.int64
        ),
        "tables.collection.embeddings.item_table.weight": torch.zeros(
            workers.N_ITEMS, workers.DIM, dtype=torch.int64
        ),
    }
    for result in ranks:
        for fqn, (row, col), (rows, cols), _ in result["shard_shapes"]:
            counts[fqn.replace("embedding_bags", "embeddings")][row : row + rows, col : col + cols] += 1
    expected = len(ranks) if sharding == "data_parallel" else 1
    assert all(bool((c == expected).all()) for c in counts.values())


@pytest.mark.parametrize(
    "sharding", [s if s == "column_wise" else pytest.param(s, marks=pytest.mark.slow) for s in CASES]
)
def test_sharded_dsl_keeps_masks_with_shards(sharding: str) -> None:
    ranks = run_distributed(workers.train, sharding, CASES[sharding], "per_table")
    assert all("error" not in r for r in ranks), [r.get("traceback") for r in ranks]
    covered_once(ranks, sharding)
    reference = workers.make_model(CASES[sharding]).tables.table_modules
    for result in ranks:
        check_invariants(result, sharding)
        for name, (weight, mask) in result["initial"].items():  # every table starts from the model's weights
            assert torch.equal(weight, reference[name].weight.detach() * mask), name
    # every rank assembles the same tables (replicated tables: the same masks on both ranks at every update)
    for first, second in zip(ranks[0]["snapshots"], ranks[1]["snapshots"], strict=True):
        for name in first:
            assert torch.equal(first[name][1], second[name][1])
            assert torch.equal(first[name][0], second[name][0])


def test_any_registered_criterion_grows_sharded_tables() -> None:
    """Growth by name from the score registry, as the single-process engine: random growth needs no gradient, so
    none is collected; a criterion reading what shards cannot provide (ever-active entries) is refused by name."""
    ranks = run_distributed(workers.train_growing_by, "random")
    assert all("error" not in r for r in ranks), [r.get("traceback") for r in ranks]
    for result in ranks:
        check_invariants(result, "column_wise")
        assert set(result["history"][0]) == {"step", "drop_fraction", "tensors"}  # UpdateRecord.to_dict()
    for first, second in zip(ranks[0]["snapshots"], ranks[1]["snapshots"], strict=True):
        assert all(torch.equal(first[name][1], second[name][1]) for name in first)
    (result,) = run_distributed(workers.refuse_criterion, "unfired", world_size=1)
    assert result["error"] == "ValueError"
    assert "grow='unfired' need ['ever_active']" in result["message"]


@pytest.mark.parametrize(
    "sharding",
    [
        "table_wise",
        pytest.param("data_parallel", marks=pytest.mark.slow),
        pytest.param("column_wise", marks=pytest.mark.slow),
    ],
)
def test_two_processes_match_one_process(sharding: str) -> None:
    """Same shards on 1 rank as on 2 (table-wise: whole tables; replicated: whole tables; column-wise: 2 column
    shards per table, both on rank 0 in the 1-process run), same global batch: the same masks and weights."""
    ranks = run_distributed(workers.train, sharding, CASES[sharding], "per_table", 2)
    one = run_distributed(workers.train, sharding, CASES[sharding], "per_table", 2, world_size=1)[0]
    two = ranks[0]
    if sharding != "data_parallel":  # the same shards (and budgets), on one rank or spread over two
        assert sorted(one["shard_shapes"]) == sorted(s for r in ranks for s in r["shard_shapes"])
    assert "error" not in two and "error" not in one, (two.get("traceback"), one.get("traceback"))
    for first, second in zip(two["snapshots"], one["snapshots"], strict=True):
        for name in first:
            assert torch.equal(first[name][1], second[name][1]), name
            torch.testing.assert_close(first[name][0], second[name][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sharding", [pytest.param("table_wise", marks=pytest.mark.slow), "column_wise"])
def test_sharded_checkpoint_round_trip(sharding: str, tmp_path: Path) -> None:
    ranks = run_distributed(workers.checkpoint_round_trip, sharding, str(tmp_path / "checkpoint"))
    for result in ranks:
        assert "error" not in result, result.get("traceback")
        assert result["restored_step"] == workers.STEPS // 2
        for name, (weight, mask) in result["expected"].items():
            assert torch.equal(result["resumed"][name][1], mask), name
            torch.testing.assert_close(result["resumed"][name][0], weight, atol=1e-6, rtol=1e-5)


def test_divergent_replicated_masks_name_the_rank() -> None:
    for result in run_distributed(workers.corrupt_replicated):
        assert result["error"] == "MaskDivergenceError"
        assert "rank 1 has other replicated table masks than rank 0 for ['user_table']" in result["message"]


def test_unsupported_combinations_are_refused() -> None:
    (result,) = run_distributed(workers.refuse, "data_parallel", "embedding", world_size=1)
    assert result["error"] == "ValueError" and "collection='embedding_bag'" in result["message"]
    (result,) = run_distributed(workers.refuse, "column_wise", "embedding", 3, world_size=1)
    assert result["error"] == "ValueError" and "number of column shards 3, got dim=8" in result["message"]
    with pytest.raises(ValueError, match="column_shards must be an integer >= 0, got -1"):
        ShardingConfig(column_shards=-1)
    with pytest.raises(ValueError, match="'grid_shard' needs tables split across hosts"):
        ShardingConfig(sharding="grid_shard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'diagonal'"):
        ShardingConfig(sharding="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'adam'"):
        ShardingConfig(optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning_rate"):
        ShardingConfig(learning_rate=0.0)


def test_missing_process_group_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"no torch\.distributed process group"):
        shard_model(workers.make_model(), ShardingConfig())
    model = workers.make_model()
    with pytest.raises(RuntimeError, match=r"no torch\.distributed process group"):
        ShardedSparseEmbeddings(model, torch.optim.SGD(model.parameters(), lr=0.1), workers.dsl_config(), 10)
