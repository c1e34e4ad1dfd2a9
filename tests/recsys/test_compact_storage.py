"""DSL with compact tables (``storage="compact"``): the same masks and metrics as masked tables, sparse storage."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sparseapps.core.compact import CompactEmbedding
from sparseapps.recsys.dsl import DSL_SPARSITY, DSLConfig, SparseEmbeddings, export_compact, make_compact
from sparseapps.recsys.models import LightGCN, MatrixFactorization, ModelConfig, NeuMF, Recommender
from sparseapps.recsys.train import TrainConfig

N_USERS, N_ITEMS = 12, 20
PAIRS = np.stack(np.divmod(np.random.default_rng(0).choice(N_USERS * N_ITEMS, 90, replace=False), N_ITEMS), 1)
USER_POP = np.bincount(PAIRS[:, 0], minlength=N_USERS)
ITEM_POP = np.bincount(PAIRS[:, 1], minlength=N_ITEMS)
SCHEDULE = DSL_SPARSITY.replace(grow="gradient", update_interval=3, end_fraction=0.9)


def build(
    storage: str,
    *,
    model: str = "mf",
    init: str = "nested",
    layout: str = "joint",
    collection: str = "embedding",
    rescale_init: bool = False,
) -> tuple[Recommender, torch.optim.Optimizer, SparseEmbeddings]:
    torch.manual_seed(0)
    config = ModelConfig(model=model, dim=8, layout=layout, layers=2, collection=collection)  # type: ignore[arg-type]
    net: Recommender
    if model == "mf":
        net = MatrixFactorization(N_USERS, N_ITEMS, config)
    elif model == "neumf":
        net = NeuMF(N_USERS, N_ITEMS, config)
    else:
        net = LightGCN(N_USERS, N_ITEMS, PAIRS, config)
    dsl = DSLConfig(density=0.25, init=init, storage=storage, rescale_init=rescale_init, sparsity=SCHEDULE)  # type: ignore[arg-type]
    if storage == "compact":
        make_compact(net, dsl, user_popularity=USER_POP, item_popularity=ITEM_POP)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    sparse = SparseEmbeddings(net, optimizer, dsl, 40, user_popularity=USER_POP, item_popularity=ITEM_POP)
    return net, optimizer, sparse


def step(net: Recommender, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(PAIRS), (16,), generator=generator).numpy()
    users, positives = torch.from_numpy(PAIRS[index, 0]), torch.from_numpy(PAIRS[index, 1])
    negatives = torch.randint(0, N_ITEMS, (16,), generator=generator)
    optimizer.zero_grad()
    net.loss(users, positives, negatives, reg_weight=1e-3).backward()
    optimizer.step()


@pytest.mark.parametrize("model", ["mf", "neumf", "lightgcn"])
@pytest.mark.parametrize(
    ("init", "layout", "collection"),
    [("nested", "joint", "embedding"), ("random", "per_table", "embedding_bag")],
)
def test_compact_makes_the_masked_runs_masks_at_every_step(
    model: str, init: str, layout: str, collection: str
) -> None:
    masked, compact = (
        build(storage, model=model, init=init, layout=layout, collection=collection)
        for storage in ("masked", "compact")
    )
    assert all(isinstance(m, CompactEmbedding) for m in compact[0].tables.table_modules.values())
    for seed in range(36):
        step(masked[0], masked[1], seed)
        step(compact[0], compact[1], seed)
        assert torch.equal(masked[2].stacked_mask(), compact[2].stacked_mask()), f"step {seed + 1}"
        weights = masked[0].tables.stacked().detach(), compact[0].tables.stacked().detach()
        assert torch.allclose(*weights, atol=1e-5), f"step {seed + 1}"
    assert len(masked[2].engine.history) == len(compact[2].engine.history) == 11
    assert masked[2].nnz == compact[2].nnz == round(0.25 * (N_USERS + N_ITEMS) * 8)
    assert torch.equal(torch.cat(masked[2].row_sizes()), torch.cat(compact[2].row_sizes()))
    # the optimizer holds state of the active entries only
    values = [m.values for m in compact[0].tables.table_modules.values()]  # type: ignore[union-attr]
    state = compact[1].state[values[0]]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == values[0].shape
    # export reads the training storage: the same tables as the masked model's export
    a, b = export_compact(masked[0]), export_compact(compact[0])
    for part in ("users", "items"):
        x, y = getattr(a, part), getattr(b, part)
        assert torch.equal(x.offsets, y.offsets) and torch.equal(x.columns, y.columns)
        assert torch.allclose(x.values, y.values, atol=1e-5)


@pytest.mark.parametrize("rescale_init", [False, True])
def test_mf_compact_steps_are_bitwise_the_masked_ones(rescale_init: bool) -> None:
    masked, compact = (build(storage, rescale_init=rescale_init) for storage in ("masked", "compact"))
    assert torch.equal(masked[0].tables.stacked().detach(), compact[0].tables.stacked().detach())
    for seed in range(20):
        step(masked[0], masked[1], seed)
        step(compact[0], compact[1], seed)
    assert torch.equal(masked[0].tables.stacked().detach(), compact[0].tables.stacked().detach())


def test_compact_state_dicts_resume_bit_for_bit() -> None:
    net, optimizer, sparse = build("compact")
    for seed in range(10):  # three topology updates: the saved topology is not the initial one
        step(net, optimizer, seed)
    saved = (
        copy.deepcopy(net.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(sparse.state_dict()),
    )
    for seed in range(10, 20):
        step(net, optimizer, seed)
    other, other_optimizer, other_sparse = build("compact")
    other.load_state_dict(saved[0])
    other_optimizer.load_state_dict(saved[1])
    other_sparse.load_state_dict(saved[2])
    for seed in range(10, 20):
        step(other, other_optimizer, seed)
    for (name, a), (_, b) in zip(net.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), other_optimizer.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(sparse.stacked_mask(), other_sparse.stacked_mask())


def test_compact_configuration_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="grow='momentum' reads a gradient average over every step"):
        DSLConfig(storage="compact")
    with pytest.raises(ValueError, match="got method 'prune'"):
        DSLConfig(storage="compact", method="prune", sparsity=SCHEDULE)
    with pytest.raises(ValueError, match="storage must be one of"):
        DSLConfig(storage="packed", sparsity=SCHEDULE)  # type: ignore[arg-type]
    assert DSLConfig(storage="compact", method="static").storage == "compact"  # static reads no gradient
    net = MatrixFactorization(N_USERS, N_ITEMS, ModelConfig(dim=8))
    optimizer = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="call make_compact"):
        SparseEmbeddings(net, optimizer, DSLConfig(storage="compact", sparsity=SCHEDULE), 10)
    with pytest.raises(
        ValueError, match="make_compact expects a DSLConfig with storage='compact', got 'masked'"
    ):
        make_compact(net, DSLConfig())
    make_compact(net, DSLConfig(storage="compact", init="prefix", sparsity=SCHEDULE))
    with pytest.raises(ValueError, match="the model's tables are compact"):
        SparseEmbeddings(net, torch.optim.Adam(net.parameters()), DSLConfig(init="prefix"), 10)
    with pytest.raises(ValueError, match="got method 'dense'"):
        TrainConfig(storage="compact")
