"""DSL on torchrec tables: aligned masks, budgets, updates through the core engine, compact export and serving."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseapps.core import SparsityConfig, rules, scores
from sparseapps.recsys.dsl import (
    DSL_SPARSITY,
    CompactEmbeddings,
    CompactScorer,
    CompactTable,
    DSLConfig,
    SparseEmbeddings,
    export_compact,
    nested_row_sizes,
    prefix_masks,
)
from sparseapps.recsys.models import LightGCN, MatrixFactorization, ModelConfig

N_USERS, N_ITEMS = 12, 20


def random_pairs(seed: int = 0, n: int = 90) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.choice(N_USERS * N_ITEMS, size=n, replace=False)
    return np.stack([keys // N_ITEMS, keys % N_ITEMS], axis=1)


PAIRS = random_pairs()
USER_POP = np.bincount(PAIRS[:, 0], minlength=N_USERS)
ITEM_POP = np.bincount(PAIRS[:, 1], minlength=N_ITEMS)


def make_sparse(
    config: DSLConfig, *, layout: str = "joint", model: str = "mf", total_steps: int = 40, dim: int = 8
) -> tuple[torch.nn.Module, torch.optim.Optimizer, SparseEmbeddings]:
    torch.manual_seed(0)
    model_config = ModelConfig(model=model, dim=dim, layout=layout, layers=2)
    net = (
        MatrixFactorization(N_USERS, N_ITEMS, model_config)
        if model == "mf"
        else LightGCN(N_USERS, N_ITEMS, PAIRS, model_config)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    sparse = SparseEmbeddings(
        net, optimizer, config, total_steps, user_popularity=USER_POP, item_popularity=ITEM_POP
    )
    return net, optimizer, sparse


def run_steps(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(PAIRS), (16,), generator=generator)
        users, positives = (
            torch.from_numpy(PAIRS[index.numpy(), 0]),
            torch.from_numpy(PAIRS[index.numpy(), 1]),
        )
        negatives = torch.randint(0, N_ITEMS, (16,), generator=generator)
        optimizer.zero_grad()
        net.loss(users, positives, negatives, reg_weight=1e-3).backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------------------------
# Row sizes and masks


def test_nested_row_sizes_hand_cases() -> None:
    # weights 1, 4, 16 -> scale 0.4 -> ideal 1 (clipped), 1.6, 6.4 -> largest remainder gives row 1 the extra
    assert nested_row_sizes(np.array([0, 3, 15]), 9, 8, 1.0).tolist() == [1, 2, 6]
    # equal sizes; the remainder goes to the most popular row
    assert nested_row_sizes(np.array([5, 1, 9]), 7, 4, 0.0).tolist() == [2, 2, 3]
    # the cap binds: popular rows stop at dim and the rest share what is left
    assert nested_row_sizes(np.array([1000, 0, 0, 0]), 10, 4, 1.0).tolist() == [4, 2, 2, 2]


@settings(max_examples=60, deadline=None)
@given(
    popularity=st.lists(st.integers(0, 500), min_size=1, max_size=40),
    dim=st.integers(1, 16),
    exponent=st.floats(0.0, 2.0),
    fraction=st.floats(0.0, 1.0),
)
def test_nested_row_sizes_properties(
    popularity: list[int], dim: int, exponent: float, fraction: float
) -> None:
    rows = len(popularity)
    budget = rows + round(fraction * rows * (dim - 1))
    sizes = nested_row_sizes(np.array(popularity), budget, dim, exponent)
    assert int(sizes.sum()) == budget
    assert sizes.min() >= 1 and sizes.max() <= dim
    order = np.argsort(popularity, kind="stable")
    # more popular rows never get more than one entry less than a less popular row (rounding only)
    assert all(sizes[order[j]] - sizes[order[k]] <= 1 for j in range(rows) for k in range(j, rows))


def test_nested_row_sizes_rejects_impossible_budgets() -> None:
    with pytest.raises(ValueError, match=r"budget must be in \[3, 12\] for 3 rows of sizes 1..4, got 13"):
        nested_row_sizes(np.array([1, 2, 3]), 13, 4, 1.0)
    with pytest.raises(ValueError, match="popularity must be a non-empty"):
        nested_row_sizes(np.array([-1, 2]), 2, 4, 1.0)


def test_prefix_masks() -> None:
    assert prefix_masks(np.array([0, 2, 3]), 3).int().tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------------
# Attaching to a model


@pytest.mark.parametrize("init", ["prefix", "nested"])
def test_aligned_initial_masks_are_prefixes_at_the_exact_budget(init: str) -> None:
    net, _, sparse = make_sparse(DSLConfig(density=0.25, init=init))
    mask = sparse.stacked_mask()
    sizes = mask.sum(1)
    assert torch.equal(mask, prefix_masks(sizes, 8))
    assert int(mask.sum()) == round(0.25 * (N_USERS + N_ITEMS) * 8) == sparse.nnz
    weight = net.tables.stacked()
    assert bool((weight[~mask] == 0).all())
    if init == "nested":  # more popular rows are longer
        users, items = sparse.row_sizes()
        assert users[USER_POP.argmax()] >= users[USER_POP.argmin()]
        assert items[ITEM_POP.argmax()] > items[ITEM_POP.argmin()]


def test_per_table_budget_gives_each_table_the_density() -> None:
    _, _, sparse = make_sparse(DSLConfig(density=0.25, init="random"), layout="per_table")
    users, items = sparse.row_sizes()
    assert int(users.sum()) == round(0.25 * N_USERS * 8)
    assert int(items.sum()) == round(0.25 * N_ITEMS * 8)
    assert len(sparse.engine.masks) == 2


def test_rescale_init_keeps_row_norms() -> None:
    torch.manual_seed(0)
    reference = MatrixFactorization(N_USERS, N_ITEMS, ModelConfig(dim=8)).tables.stacked().detach().clone()
    net, _, sparse = make_sparse(DSLConfig(density=0.25, init="prefix", rescale_init=True))
    sizes = sparse.stacked_mask().sum(1, keepdim=True).float()
    expected = reference * sparse.stacked_mask() * (8 / sizes).sqrt()
    torch.testing.assert_close(net.tables.stacked().detach(), expected)


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_dsl_updates_keep_the_budget_and_the_zeros(grow: str, model: str) -> None:
    schedule = DSL_SPARSITY.replace(grow=grow, update_interval=5, drop_fraction=0.5, end_fraction=0.9)
    net, optimizer, sparse = make_sparse(DSLConfig(density=0.25, sparsity=schedule), model=model)
    before = sparse.stacked_mask().clone()
    nnz = sparse.nnz
    run_steps(net, optimizer, 30)
    assert len(sparse.engine.history) == 6  # after steps 5, 10, ..., 30 (updates stop at 0.9 * 40 = 36)
    assert sparse.nnz == nnz
    mask = sparse.stacked_mask()
    assert not torch.equal(mask, before)
    weight = net.tables.stacked().detach()
    assert bool((weight[~mask] == 0).all())
    state = optimizer.state[next(net.parameters())]
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((state[key][~mask] == 0).all())
    users, items = sparse.row_sizes()
    assert int(users.sum() + items.sum()) == nnz


def test_config_maps_to_the_engine() -> None:
    fqns = ("tables.collection.embeddings.nodes.weight",)
    schedule = DSL_SPARSITY.replace(grow="gradient", update_interval=7)
    dsl = DSLConfig(density=0.2, sparsity=schedule).sparsity_config(fqns)
    assert (dsl.method, dsl.drop, dsl.grow, dsl.update_interval, dsl.drop_fraction) == (
        "dst",
        "magnitude",
        "gradient",
        7,
        0.5,
    )
    assert dsl.drop_schedule == "cosine" and dsl.include == fqns and dsl.module_types == ("embedding",)
    assert dsl == schedule.replace(include=fqns)  # DSL sets the density and the tables, nothing else
    assert DSLConfig(method="static").sparsity_config(fqns).method == "static"
    prune = DSLConfig(method="prune", prune_fraction=0.3).sparsity_config(fqns)
    assert (prune.method, prune.start_fraction) == ("one_shot", 0.3)


def test_static_mask_never_changes_and_settles_at_once() -> None:
    net, optimizer, sparse = make_sparse(DSLConfig(density=0.25, method="static", init="nested"))
    before = sparse.stacked_mask().clone()
    assert sparse.settle_step == 0 and sparse.settled()
    run_steps(net, optimizer, 12)
    assert torch.equal(sparse.stacked_mask(), before)


def test_prune_trains_dense_then_prunes_by_magnitude() -> None:
    torch.manual_seed(0)
    net = MatrixFactorization(N_USERS, N_ITEMS, ModelConfig(dim=8))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    # weights after each step, before the engine's hook (registered later) prunes them
    seen: list[torch.Tensor] = []
    optimizer.register_step_post_hook(lambda *_: seen.append(net.tables.stacked().detach().clone()))
    sparse = SparseEmbeddings(net, optimizer, DSLConfig(density=0.25, method="prune", prune_fraction=0.5), 40)
    assert sparse.density == 1.0 and sparse.settle_step == 20
    run_steps(net, optimizer, 19)
    assert sparse.density == 1.0 and not sparse.settled()
    run_steps(net, optimizer, 1, seed=1)
    assert sparse.settled()
    kept = sparse.stacked_mask()
    assert sparse.nnz == round(0.25 * kept.numel())
    magnitude = seen[-1].abs()
    assert magnitude[kept].min() >= magnitude[~kept].max() * (1 - 1e-4)


def test_state_dict_round_trip_resumes_identically() -> None:
    config = DSLConfig(density=0.25, sparsity=DSL_SPARSITY.replace(update_interval=4, end_fraction=0.9))
    net, optimizer, sparse = make_sparse(config)
    run_steps(net, optimizer, 10)
    saved = (
        {k: v.clone() for k, v in net.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(sparse.state_dict()),
    )
    run_steps(net, optimizer, 10, seed=5)
    expected = net.tables.stacked().detach().clone()

    other, other_optimizer, other_sparse = make_sparse(config)
    other.load_state_dict(saved[0])
    other_optimizer.load_state_dict(saved[1])
    other_sparse.load_state_dict(saved[2])
    run_steps(other, other_optimizer, 10, seed=5)
    assert torch.equal(other.tables.stacked().detach(), expected)


def test_a_registered_grow_criterion_works_unchanged_in_dsl() -> None:
    """A criterion registered with scores.register_grow is one more name: DSL grows what it ranks first."""
    ranking = torch.randperm(2 * (N_USERS + N_ITEMS) * 4, generator=torch.Generator().manual_seed(3)).float()

    @scores.register_grow("test_fixed_ranking", needs=(), tie_noise=False)
    def fixed_ranking(ctx: scores.ScoreContext) -> torch.Tensor:
        # entries active before the update rank last, so only never-active entries compete (by `ranking`)
        return torch.where(ctx.mask, -1.0, ranking[: ctx.mask.numel()].reshape(ctx.mask.shape))

    try:
        schedule = DSL_SPARSITY.replace(grow="test_fixed_ranking", update_interval=5, end_fraction=0.9)
        net, optimizer, sparse = make_sparse(DSLConfig(density=0.25, init="random", sparsity=schedule))
        fqn = sparse.fqns["nodes"]
        run_steps(net, optimizer, 4)
        before = sparse.engine.masks[fqn].clone()
        run_steps(net, optimizer, 1)  # step 5: the first update
    finally:
        scores.unregister("grow", "test_fixed_ranking")
    after = sparse.engine.masks[fqn]
    (record,) = sparse.engine.history
    n_grown = record["tensors"][fqn]["grown"]
    assert n_grown == rules.drop_counts({fqn: before}, record["drop_fraction"])[fqn] > 0
    expected = rules.select_top(
        fixed_ranking(
            scores.ScoreContext(
                fqn=fqn, weight=before.float(), mask=before, step=5, generator=torch.Generator()
            )
        ),
        ~before,
        n_grown,
    )
    assert torch.equal(after & ~before, expected)
    assert int(after.sum()) == int(before.sum())


def test_load_state_dict_refuses_another_configuration() -> None:
    _, _, sparse = make_sparse(DSLConfig(density=0.25))
    _, _, other = make_sparse(DSLConfig(density=0.5))
    with pytest.raises(ValueError, match="another SparsityConfig"):
        other.load_state_dict(sparse.state_dict())


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ValueError, match=r"density must be a finite number in \(0, 1\], got 0"):
        DSLConfig(density=0)
    with pytest.raises(ValueError, match=r"grow must be one of 'none', 'random', .*, got 'unknown'"):
        DSLConfig(sparsity=DSL_SPARSITY.replace(grow="unknown"))
    with pytest.raises(
        ValueError, match="grow='cosine' reads layer activations, which embedding tables do not"
    ):
        DSLConfig(sparsity=DSL_SPARSITY.replace(grow="cosine"))
    with pytest.raises(ValueError, match="update_interval must be an integer >= 1, got 0"):
        DSLConfig(sparsity=DSL_SPARSITY.replace(update_interval=0))
    with pytest.raises(ValueError, match=r"sparsity must be a 'dst' SparsityConfig .*, got method='static'"):
        DSLConfig(sparsity=SparsityConfig(method="static", grow="none"))
    with pytest.raises(TypeError, match="sparsity must be a SparsityConfig, got dict"):
        DSLConfig(sparsity={"grow": "gradient"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rescale_init must be True or False, got 1"):
        DSLConfig(rescale_init=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a sparseapps\.recsys Recommender"):
        SparseEmbeddings(torch.nn.Linear(2, 2), None, DSLConfig(), 10)  # type: ignore[arg-type]
    net = MatrixFactorization(N_USERS, N_ITEMS, ModelConfig(dim=8))
    optimizer = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="nested masks need user_popularity and item_popularity"):
        SparseEmbeddings(net, optimizer, DSLConfig(init="nested"), 10)


# ---------------------------------------------------------------------------------------------------------------
# Compact storage and serving


def test_compact_table_hand_case_and_round_trip() -> None:
    weight = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    table = CompactTable.from_dense(weight)
    assert table.values.tolist() == [2.0, 1.0, 3.0]
    assert table.columns.dtype == torch.uint8 and table.columns.tolist() == [1, 0, 2]
    assert table.offsets.dtype == torch.int32 and table.offsets.tolist() == [0, 1, 3, 3]
    assert table.nbytes == 3 * 4 + 3 * 1 + 4 * 4
    assert table.row_sizes().tolist() == [1, 2, 0]
    assert torch.equal(table.to_dense(), weight)
    assert torch.equal(table.rows(torch.tensor([2, 1, 1])), weight[[2, 1, 1]])
    assert torch.equal(table.to_sparse_csr().to_dense(), weight)
    assert torch.equal(CompactTable.from_dict(table.to_dict()).to_dense(), weight)


def test_compact_table_keeps_masked_zeros_and_widens_indices() -> None:
    weight = torch.zeros(2, 300)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[1, 299] = True
    table = CompactTable.from_dense(weight, mask)
    assert table.nnz == 1 and table.columns.dtype == torch.int16 and table.columns.tolist() == [299]


def test_compact_table_rejects_inconsistent_arrays() -> None:
    with pytest.raises(ValueError, match=r"offsets must be \[R \+ 1\] ending at nnz=2"):
        CompactTable(
            values=torch.ones(2),
            columns=torch.zeros(2, dtype=torch.uint8),
            offsets=torch.tensor([0, 1]),
            dim=4,
        )
    with pytest.raises(ValueError, match=r"columns must be torch\.uint8 for dim 4, got torch\.int64"):
        CompactTable(
            values=torch.ones(1),
            columns=torch.zeros(1, dtype=torch.int64),
            offsets=torch.tensor([0, 1]),
            dim=4,
        )


def test_export_at_density_0_2_takes_under_30_percent_of_dense_bytes() -> None:
    net, _, sparse = make_sparse(DSLConfig(density=0.2, init="random"), dim=64)
    compact = export_compact(net)
    assert compact.nnz == sparse.nnz
    assert compact.dense_nbytes == 4 * (N_USERS + N_ITEMS) * 64
    # 5 bytes per value with its uint8 index + 4 bytes per row offset: 0.25 + 8 / (64 * 4) per row
    expected = compact.nnz * 5 + 4 * (N_USERS + 1) + 4 * (N_ITEMS + 1)
    assert compact.nbytes == expected
    assert compact.nbytes / compact.dense_nbytes <= 0.30


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_compact_scorer_matches_the_masked_dense_model(model: str) -> None:
    config = DSLConfig(density=0.25, sparsity=DSL_SPARSITY.replace(update_interval=5))
    net, optimizer, _ = make_sparse(config, model=model)
    run_steps(net, optimizer, 12)
    compact = CompactEmbeddings.from_dict(export_compact(net).to_dict())
    scorer = CompactScorer(compact, PAIRS if model == "lightgcn" else None)
    users = torch.arange(N_USERS)
    expected = net.scorer()(users)
    got = scorer(users)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.topk(5).indices.sort(1).values, expected.topk(5).indices.sort(1).values)


def test_compact_scorer_needs_the_graph_for_lightgcn() -> None:
    net, _, _ = make_sparse(DSLConfig(density=0.25), model="lightgcn")
    with pytest.raises(ValueError, match="needs train_pairs"):
        CompactScorer(export_compact(net))


def test_dense_export_stores_every_nonzero() -> None:
    net = MatrixFactorization(N_USERS, N_ITEMS, ModelConfig(dim=4))
    compact = export_compact(net)
    assert compact.nnz == (N_USERS + N_ITEMS) * 4
    assert compact.nbytes == compact.nnz * 5 + 4 * (N_USERS + 1) + 4 * (N_ITEMS + 1)
