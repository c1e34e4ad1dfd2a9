"""MF-BPR, LightGCN and NeuMF on torchrec tables: lookups, scores, the normalized graph, propagation and NeuMF's
MLP head (hand formula, chunked full ranking, compact serving, DSL)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseapps.recsys import models
from sparseapps.recsys.dsl import (
    DSL_SPARSITY,
    CompactEmbeddings,
    CompactScorer,
    DSLConfig,
    SparseEmbeddings,
    export_compact,
)
from sparseapps.recsys.models import (
    LightGCN,
    MatrixFactorization,
    ModelConfig,
    NeuMF,
    NeuMFHead,
    UserItemTables,
    bpr_loss,
    build_model,
    gmf_column_mask,
    neumf_widths,
    normalized_adjacency,
)

PAIRS = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [2, 0]])


@pytest.mark.parametrize("layout", ["joint", "per_table"])
@pytest.mark.parametrize("collection", ["embedding", "embedding_bag"])
def test_lookup_returns_the_table_rows(layout: str, collection: str) -> None:
    tables = UserItemTables(4, 6, 5, layout=layout, collection=collection)
    user_weight, item_weight = tables.weights()
    for users, items in (([0, 3], [5, 1, 1]), ([2, 1, 0], [4])):
        user_rows, item_rows = tables.lookup(torch.tensor(users), torch.tensor(items))
        assert torch.equal(user_rows, user_weight[users])
        assert torch.equal(item_rows, item_weight[items])
    assert torch.equal(tables.stacked(), torch.cat([user_weight, item_weight]))


def test_features_hold_both_id_lists_in_one_keyed_jagged_tensor() -> None:
    tables = UserItemTables(4, 6, 5, layout="joint")
    features = tables.features(torch.tensor([1, 2]), torch.tensor([0, 5, 3]))
    assert features.keys() == ["user", "item"]
    assert features.stride() == 3
    assert features.lengths().tolist() == [1, 1, 0, 1, 1, 1]
    assert features.values().tolist() == [1, 2, 4, 9, 7]  # items offset by 4 users in the joint table


def test_table_fqns_name_the_engine_tensors() -> None:
    model = MatrixFactorization(3, 4, ModelConfig(layout="per_table"))
    names = dict(model.named_parameters())
    for fqn in model.tables.table_fqns("tables").values():
        assert fqn in names


def test_mf_loss_is_bpr_on_dot_products_and_only_touches_batch_rows() -> None:
    model = MatrixFactorization(3, 5, ModelConfig(dim=4))
    users, positives, negatives = torch.tensor([0, 2]), torch.tensor([1, 4]), torch.tensor([3, 3])
    loss = model.loss(users, positives, negatives, reg_weight=0.1)
    u, i = (w.detach() for w in model.tables.weights())
    positive = (u[users] * i[positives]).sum(1)
    negative = (u[users] * i[negatives]).sum(1)
    l2 = 0.5 * (u[users].pow(2).sum() + i[positives].pow(2).sum() + i[negatives].pow(2).sum()) / 2
    expected = -F.logsigmoid(positive - negative).mean() + 0.1 * l2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    weight = next(model.parameters())
    touched = weight.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 2, 3 + 1, 3 + 3, 3 + 4]


def test_mf_forward_scores_candidate_lists() -> None:
    model = MatrixFactorization(3, 5, ModelConfig(dim=4))
    scores = model(torch.tensor([0, 1]), torch.tensor([[0, 1, 2], [2, 3, 4]]))
    full = model.scorer()(torch.tensor([0, 1]))
    torch.testing.assert_close(scores, torch.stack([full[0, :3], full[1, 2:]]))


def test_bpr_loss_hand_value() -> None:
    value = bpr_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert value.item() == pytest.approx(np.log1p(np.exp(-2.0)))


def test_normalized_adjacency_hand_case() -> None:
    # user 0 - item 0, user 1 - item 0: degrees 1, 1, 2 -> weights 1/sqrt(2)
    adjacency = normalized_adjacency(np.array([[0, 0], [1, 0]]), 2, 1).to_dense()
    w = 1 / np.sqrt(2)
    expected = torch.tensor([[0, 0, w], [0, 0, w], [w, w, 0]], dtype=torch.float32)
    torch.testing.assert_close(adjacency, expected)


def test_normalized_adjacency_is_symmetric_with_empty_rows_for_isolated_nodes() -> None:
    adjacency = normalized_adjacency(PAIRS, 4, 3).to_dense()
    torch.testing.assert_close(adjacency, adjacency.t())
    assert adjacency[3].abs().sum() == 0  # user 3 has no interactions


def test_normalized_adjacency_rejects_bad_pairs() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\) x \[0, 3\)"):
        normalized_adjacency(np.array([[0, 5]]), 3, 3)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        normalized_adjacency(np.array([1, 2, 3]), 3, 3)


def test_lightgcn_propagation_and_gradient_match_a_dense_reference() -> None:
    model = LightGCN(3, 3, PAIRS, ModelConfig(model="lightgcn", dim=4, layers=2))
    adjacency = normalized_adjacency(PAIRS, 3, 3).to_dense()
    layer0 = model.tables.stacked()
    reference = (layer0 + adjacency @ layer0 + adjacency @ adjacency @ layer0) / 3
    users, items = model.final_embeddings()
    torch.testing.assert_close(torch.cat([users, items]), reference)

    users_b, positives, negatives = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([2, 1])
    model.loss(users_b, positives, negatives, reg_weight=0.01).backward()
    weight = next(model.parameters())
    got = weight.grad.clone()
    weight.grad = None
    final = (layer0 + adjacency @ layer0 + adjacency @ adjacency @ layer0) / 3
    u, i = final[:3], final[3:]
    loss = bpr_loss((u[users_b] * i[positives]).sum(1), (u[users_b] * i[negatives]).sum(1))
    ego = layer0[torch.tensor([0, 2, 3 + 1, 3 + 0, 3 + 2, 3 + 1])]
    (loss + 0.01 * 0.5 * ego.pow(2).sum() / 2).backward()
    torch.testing.assert_close(got, weight.grad)


def test_lightgcn_scores_are_final_dot_products() -> None:
    model = LightGCN(3, 3, PAIRS, ModelConfig(model="lightgcn", dim=4, layers=1))
    users, items = model.final_embeddings()
    torch.testing.assert_close(model.scorer()(torch.tensor([1])), (users[1:2] @ items.t()).detach())
    torch.testing.assert_close(
        model(torch.tensor([1]), torch.tensor([[2, 0]])), (users[1] @ items[[2, 0]].t()).unsqueeze(0)
    )


def test_build_model_and_bad_configs() -> None:
    assert isinstance(build_model(ModelConfig(model="mf"), 3, 3), MatrixFactorization)
    assert isinstance(build_model(ModelConfig(model="lightgcn"), 3, 3, PAIRS), LightGCN)
    with pytest.raises(ValueError, match="lightgcn needs train_pairs"):
        build_model(ModelConfig(model="lightgcn"), 3, 3)
    with pytest.raises(ValueError, match="model must be one of 'mf', 'lightgcn', 'neumf', got 'ncf'"):
        ModelConfig(model="ncf")
    with pytest.raises(ValueError, match="layout must be one of"):
        ModelConfig(layout="rows")
    with pytest.raises(ValueError, match="init_std must be a finite number > 0, got -1"):
        ModelConfig(init_std=-1)
    with pytest.raises(ValueError, match=r"MatrixFactorization needs config\.model 'mf'"):
        MatrixFactorization(3, 3, ModelConfig(model="lightgcn"))
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        build_model({"model": "mf"}, 3, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_users must be an integer >= 1, got 0"):
        UserItemTables(0, 3, 4)


def test_mf_learns_a_planted_preference() -> None:
    # users 0-3 like items 0-3, users 4-7 like items 4-7: a few hundred BPR steps must rank them first
    torch.manual_seed(0)
    model = MatrixFactorization(8, 8, ModelConfig(dim=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    users = torch.arange(8).repeat_interleave(4)
    liked = (users // 4) * 4 + torch.arange(4).repeat(8)
    for _ in range(150):
        negatives = (liked + 4) % 8
        optimizer.zero_grad()
        model.loss(users, liked, negatives).backward()
        optimizer.step()
    top = model.scorer()(torch.arange(8)).topk(4, dim=1).indices.sort(1).values
    assert torch.equal(top, torch.tensor([[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4))


# ---------------------------------------------------------------------------------------------------------------
# NeuMF


def test_neumf_widths_halve_and_gmf_columns_are_spread_over_every_prefix() -> None:
    assert neumf_widths(64) == (32, (32, 16, 8))
    assert neumf_widths(13) == (6, (7, 3, 1))
    assert neumf_widths(8, gmf_dim=2, mlp_layers=2) == (2, (6, 3))
    assert gmf_column_mask(4, 2).tolist() == [True, False, True, False]
    for dim, gmf in ((13, 6), (64, 32), (10, 3)):
        mask = gmf_column_mask(dim, gmf)
        prefix_counts = mask.cumsum(0).tolist()
        assert prefix_counts == [math.ceil(k * gmf / dim) for k in range(1, dim + 1)]


def tiny_neumf(n_users: int = 5, n_items: int = 7, dim: int = 8, **changes: object) -> NeuMF:
    torch.manual_seed(0)
    return NeuMF(n_users, n_items, ModelConfig(model="neumf", dim=dim, **changes))  # type: ignore[arg-type]


def test_neumf_shapes_and_parameters() -> None:
    model = tiny_neumf()
    users, items = torch.tensor([0, 4, 2]), torch.tensor([[1, 2], [6, 0], [3, 3]])
    assert model(users, items).shape == (3, 2)
    assert model.scorer()(users).shape == (3, 7)
    assert model.loss(users, items[:, 0], items[:, 1], reg_weight=0.1).shape == ()
    names = [name for name, _ in model.named_parameters()]
    assert names == [
        "tables.collection.embeddings.nodes.weight",
        "head.mlp.0.weight",
        "head.mlp.0.bias",
        "head.mlp.1.weight",
        "head.mlp.1.bias",
        "head.mlp.2.weight",
        "head.mlp.2.bias",
        "head.output.weight",
    ]
    assert [tuple(p.shape) for _, p in model.head.named_parameters()] == [
        (4, 8), (4,), (2, 4), (2,), (1, 2), (1,), (1, 5),
    ]  # fmt: skip
    assert model.parameter_count() == (5 + 7) * 8  # the tables; the head is small and dense
    with pytest.raises(NotImplementedError, match="use scorer"):
        model.final_embeddings()


def test_neumf_scores_equal_the_hand_formula() -> None:
    # D = 4: columns 0 and 2 feed GMF, 1 and 3 the MLP; tower 4 -> 2 -> 1
    model = tiny_neumf(n_users=2, n_items=3, dim=4, mlp_layers=2)
    head = model.head
    assert head.gmf_columns.tolist() == [0, 2] and head.mlp_columns.tolist() == [1, 3]
    u, i = (w.detach() for w in model.tables.weights())
    w1, b1 = head.mlp[0].weight.detach(), head.mlp[0].bias.detach()
    w2, b2 = head.mlp[1].weight.detach(), head.mlp[1].bias.detach()
    w = head.output.weight.detach()[0]
    expected = torch.empty(2, 3)
    for user in range(2):
        for item in range(3):
            gmf = u[user, [0, 2]] * i[item, [0, 2]]
            mlp_in = torch.cat([u[user, [1, 3]], i[item, [1, 3]]])
            mlp = torch.relu(w2 @ torch.relu(w1 @ mlp_in + b1) + b2)
            expected[user, item] = w[:2] @ gmf + w[2:] @ mlp
    torch.testing.assert_close(model.scorer()(torch.tensor([0, 1])), expected)
    candidates = torch.tensor([[2, 0], [1, 1]])
    torch.testing.assert_close(
        model(torch.tensor([0, 1]), candidates).detach(),
        torch.stack([expected[0, [2, 0]], expected[1, [1, 1]]]),
    )


def test_neumf_loss_is_bpr_plus_l2_and_only_touches_batch_rows() -> None:
    model = tiny_neumf(n_users=3, n_items=5, dim=4, mlp_layers=2)
    users, positives, negatives = torch.tensor([0, 2]), torch.tensor([1, 4]), torch.tensor([3, 3])
    loss = model.loss(users, positives, negatives, reg_weight=0.1)
    full = model.scorer()(users)
    u, i = (w.detach() for w in model.tables.weights())
    l2 = 0.5 * (u[users].pow(2).sum() + i[positives].pow(2).sum() + i[negatives].pow(2).sum()) / 2
    expected = bpr_loss(full[[0, 1], positives], full[[0, 1], negatives]) + 0.1 * l2
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    touched = model.tables.stacked().grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 2, 3 + 1, 3 + 3, 3 + 4]
    assert model.head.output.weight.grad.abs().sum() > 0


def test_neumf_chunked_full_ranking_equals_unchunked_and_the_pair_scores() -> None:
    torch.manual_seed(1)
    head = NeuMFHead(16)
    users, items = torch.randn(6, 16), torch.randn(37, 16)
    with torch.no_grad():
        whole = head.rank_scores(users, items, chunk_elements=1 << 30)
        for chunk_elements in (1, 6 * 8 * 5, 1000):  # one item per block, 5 items, uneven blocks
            torch.testing.assert_close(head.rank_scores(users, items, chunk_elements=chunk_elements), whole)
        pairs = head.pair_scores(users.repeat_interleave(37, 0), items.repeat(6, 1)).reshape(6, 37)
    torch.testing.assert_close(whole, pairs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_elements must be an integer >= 1, got 0"):
        head.rank_scores(users, items, chunk_elements=0)


def test_neumf_bad_sizes_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"dim must be >= 2 for neumf \(GMF and MLP columns\), got 1"):
        ModelConfig(model="neumf", dim=1)
    with pytest.raises(ValueError, match="gmf_dim must be an integer >= 1 and <= 7, got 8"):
        ModelConfig(model="neumf", dim=8, gmf_dim=8)
    with pytest.raises(ValueError, match="gmf_dim must be an integer >= 1, got 0"):
        ModelConfig(model="neumf", gmf_dim=0)
    with pytest.raises(
        ValueError, match=r"mlp_layers must be at most 3 for 4 MLP columns \(widths 4, 2, 1\), got 4"
    ):
        ModelConfig(model="neumf", dim=8, mlp_layers=4)
    with pytest.raises(ValueError, match="mlp_layers must be an integer >= 1, got 0"):
        ModelConfig(model="neumf", mlp_layers=0)
    assert ModelConfig(model="mf", dim=1).dim == 1  # the NeuMF sizes only bind NeuMF
    with pytest.raises(ValueError, match=r"NeuMF needs config\.model 'neumf', got 'mf'"):
        NeuMF(3, 3, ModelConfig(model="mf"))
    assert isinstance(build_model(ModelConfig(model="neumf", dim=8), 3, 4), NeuMF)


N_USERS, N_ITEMS = 12, 20


def sparse_neumf(density: float = 0.25) -> tuple[NeuMF, torch.optim.Optimizer, SparseEmbeddings]:
    model = tiny_neumf(N_USERS, N_ITEMS, dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    popularity = np.random.default_rng(0).integers(0, 30, N_USERS + N_ITEMS)
    schedule = DSL_SPARSITY.replace(update_interval=5, drop_fraction=0.5, end_fraction=0.9)
    config = DSLConfig(density=density, sparsity=schedule)
    sparse = SparseEmbeddings(
        model,
        optimizer,
        config,
        40,
        user_popularity=popularity[:N_USERS],
        item_popularity=popularity[N_USERS:],
    )
    return model, optimizer, sparse


def run_steps(model: NeuMF, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        users = torch.randint(0, N_USERS, (16,), generator=generator)
        positives, negatives = torch.randint(0, N_ITEMS, (2, 16), generator=generator)
        optimizer.zero_grad()
        model.loss(users, positives, negatives, reg_weight=1e-3).backward()
        optimizer.step()


def test_neumf_dsl_keeps_the_budget_and_the_zeros_and_leaves_the_head_dense() -> None:
    model, optimizer, sparse = sparse_neumf()
    assert sparse.engine.config.embedding_rows == "looked_up"  # NeuMF reads its tables only by lookups
    nested = sparse.stacked_mask().clone()
    # nested prefixes: every row of k entries has ceil(k / 2) GMF columns and the rest MLP columns
    gmf = nested[:, model.head.gmf_columns].sum(1)
    assert torch.equal(gmf, (nested.sum(1) + 1) // 2)
    nnz = sparse.nnz
    head_before = [p.detach().clone() for p in model.head.parameters()]
    run_steps(model, optimizer, 30)
    assert len(sparse.engine.history) == 6
    assert sparse.nnz == nnz == round(0.25 * (N_USERS + N_ITEMS) * 8)
    mask = sparse.stacked_mask()
    assert not torch.equal(mask, nested)
    assert bool((model.tables.stacked().detach()[~mask] == 0).all())
    state = optimizer.state[model.tables.stacked()]
    assert all(bool((state[key][~mask] == 0).all()) for key in ("exp_avg", "exp_avg_sq"))
    assert all(bool((p != 0).all()) for p in model.head.parameters())  # the head is not masked
    assert not torch.equal(head_before[-1], model.head.output.weight)


def test_neumf_compact_serving_equals_the_masked_dense_model() -> None:
    model, optimizer, sparse = sparse_neumf()
    run_steps(model, optimizer, 12)
    compact = CompactEmbeddings.from_dict(export_compact(model).to_dict())
    assert compact.model == "neumf" and compact.nnz == sparse.nnz
    assert compact.head_nbytes == 4 * sum(p.numel() for p in model.head.parameters())
    users = torch.arange(N_USERS)
    expected = model.scorer()(users)
    got = CompactScorer(compact)(users)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.topk(5).indices.sort(1).values, expected.topk(5).indices.sort(1).values)
    headless = CompactEmbeddings(users=compact.users, items=compact.items, model="neumf")
    with pytest.raises(ValueError, match="needs the exported MLP head"):
        CompactScorer(headless)


def test_neumf_learns_a_planted_preference() -> None:
    # users 0-3 like items 0-3, users 4-7 like items 4-7
    model = tiny_neumf(8, 8, dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    users = torch.arange(8).repeat_interleave(4)
    liked = (users // 4) * 4 + torch.arange(4).repeat(8)
    for _ in range(150):
        optimizer.zero_grad()
        model.loss(users, liked, (liked + 4) % 8).backward()
        optimizer.step()
    top = model.scorer()(torch.arange(8)).topk(4, dim=1).indices.sort(1).values
    assert torch.equal(top, torch.tensor([[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4))


def test_docstring_examples() -> None:
    result = doctest.testmod(models, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
