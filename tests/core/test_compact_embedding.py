"""CompactEmbedding: lookups equal to the masked table, a sparse backward, re-packing, checkpoints, the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.compact import CompactEmbedding, compact_lookup
from sparseapps.core.compact.embedding import _DenseView
from sparseapps.core.compact.storage import CompactTensor
from sparseapps.core.distributions import target_nnz
from sparseapps.core.masks import draw_mask

# Row sizes 1, 2, 4, 0, 3 of a 5 x 4 table: prefixes, an empty row and a full one.
MASK = torch.arange(4) < torch.tensor([[1], [2], [4], [0], [3]])


def table(dtype: torch.dtype = torch.float32) -> tuple[nn.Embedding, CompactEmbedding]:
    torch.manual_seed(0)
    dense = nn.Embedding(5, 4).to(dtype)
    return dense, CompactEmbedding.from_embedding(dense, MASK)


def test_structure_hand_case() -> None:
    _, compact = table()
    assert compact.row_ptr.tolist() == [0, 1, 3, 7, 7, 10]
    assert compact.col_indices.tolist() == [0, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert compact.col_indices.dtype == torch.uint8 and compact.nnz == 10
    assert compact.row_sizes().tolist() == [1, 2, 4, 0, 3]
    assert torch.equal(compact.mask(), MASK)
    wide = CompactEmbedding(torch.zeros(2, 300), torch.ones(2, 300, dtype=torch.bool))
    assert wide.col_indices.dtype == torch.int16


def test_lookup_equals_the_masked_table_and_its_gradient() -> None:
    dense, compact = table()
    ids = torch.tensor([2, 0, 3, 2, 4, 1, 2])
    masked = dense.weight * MASK
    assert torch.equal(compact(ids), masked[ids])
    assert torch.equal(compact(ids.reshape(7, 1)), masked[ids].reshape(7, 1, 4))
    upstream = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    (compact(ids) * upstream).sum().backward()
    (dense(ids) * upstream).sum().backward()
    # the gradient of the active entries is the dense table's (repeated row 2 summed), nothing else is stored
    assert torch.allclose(compact.values.grad, dense.weight.grad[MASK], atol=1e-6)
    assert compact.values.grad.shape == (10,)


def test_bag_lookup_sums_each_bag_like_an_embedding_bag() -> None:
    torch.manual_seed(0)
    bags = nn.EmbeddingBag(5, 4, mode="sum", include_last_offset=True)
    compact = CompactEmbedding.from_embedding(bags, MASK)
    ids, offsets = torch.tensor([2, 0, 4, 1, 2]), torch.tensor([0, 2, 2, 5])  # an empty bag in the middle
    expected = nn.functional.embedding_bag(
        ids, bags.weight * MASK, offsets, mode="sum", include_last_offset=True
    )
    assert torch.allclose(compact(ids, offsets=offsets), expected, atol=1e-6)
    assert compact(ids, offsets=offsets)[1].abs().sum() == 0


def test_lookup_backward_passes_gradcheck() -> None:
    _, compact = table(torch.float64)
    ids = torch.tensor([2, 0, 3, 2, 4])
    values = compact.values.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: compact_lookup(ids, v, compact), (values,))
    assert torch.autograd.gradcheck(lambda v: compact_lookup(ids, v, compact).pow(2).sum(), (values,))


def test_dense_view_is_differentiable_in_the_active_entries() -> None:
    _, compact = table(torch.float64)
    weight = compact.dense()
    assert torch.equal(weight.detach(), compact.to_dense_weight())
    assert bool((weight.detach()[~MASK] == 0).all())
    values = compact.values.detach().clone().requires_grad_(True)
    adjacency = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda v: adjacency @ _DenseView.apply(v, compact).tanh(), (values,))


def test_capture_adds_the_looked_up_rows_full_gradients() -> None:
    dense, compact = table()
    compact.capture_dense_grad = True
    ids = torch.tensor([2, 0, 2])
    compact(ids).sum().backward()
    dense(ids).sum().backward()
    assert compact.dense_grad is not None and torch.equal(compact.dense_grad, dense.weight.grad)


def test_capture_holds_the_looked_up_rows_only_and_sums_like_the_dense_table() -> None:
    """Two backward passes with repeated ids: the held rows are the ids seen, and every entry equals the dense
    table's gradient bit for bit (the same additions in the same order)."""
    torch.manual_seed(1)
    dense = nn.Embedding(50, 8)
    compact = CompactEmbedding.from_embedding(dense, torch.rand(50, 8) < 0.4)
    compact.capture_dense_grad = True
    for ids in (torch.tensor([7, 3, 7, 41, 3, 7]), torch.tensor([41, 0, 7])):
        upstream = torch.randn(len(ids), 8)
        (compact(ids) * upstream).sum().backward()
        (dense(ids) * upstream).sum().backward()
    rows, grad = compact.gradient_rows()
    assert rows is not None and rows.tolist() == [0, 3, 7, 41] and grad.shape == (4, 8)
    assert torch.equal(grad, dense.weight.grad[rows]) and torch.equal(compact.dense_grad, dense.weight.grad)
    compact.dense_grad = None
    rows, grad = compact.gradient_rows()
    assert rows is not None and rows.numel() == 0 and grad.shape == (0, 8) and compact.dense_grad is None


def test_capture_of_a_dense_view_and_lookups_in_one_step_holds_the_whole_table() -> None:
    """A dense view (graph propagation) captures all rows; lookups in the same step add to it, in either order."""
    torch.manual_seed(2)
    dense = nn.Embedding(12, 4)
    mask = torch.rand(12, 4) < 0.5
    ids, upstream = torch.tensor([3, 3, 10]), torch.randn(12, 4)
    want = upstream.clone().index_add_(0, ids, torch.ones(3, 4))
    for view_first in (True, False):
        compact = CompactEmbedding.from_embedding(dense, mask)
        compact.capture_dense_grad = True
        for use_view in (view_first, not view_first):
            out = (compact.dense() * upstream).sum() if use_view else compact(ids).sum()
            out.backward()
        rows, grad = compact.gradient_rows()
        assert rows is None and torch.allclose(grad, want) and torch.allclose(compact.dense_grad, want)


def test_repack_moves_values_gradient_and_adam_state_hand_case() -> None:
    """Row 0 keeps column 0 and grows 3; row 2 drops 1 and 2; row 3 grows column 1; the others stay."""
    _, compact = table()
    compact.values.grad = torch.arange(10.0)
    optimizer = torch.optim.Adam([compact.values], lr=0.1)
    optimizer.step()
    state = optimizer.state[compact.values]
    state["exp_avg"] = torch.arange(10.0) + 100
    state["exp_avg_sq"] = torch.arange(10.0) + 200
    old_values = compact.values.detach().clone()
    new_mask = MASK.clone()
    new_mask[0, 3] = True
    new_mask[2, 1:3] = False
    new_mask[3, 1] = True
    record = CompactTensor("weight", compact, "embedding", budget=10)
    grown = record.write_mask(new_mask, optimizer)
    assert grown.nonzero().tolist() == [[0, 3], [3, 1]]
    # old entries 0 | 1 2 | 3 4 5 6 | - | 7 8 9 -> new 0 [grown] | 1 2 | 3 6 | [grown] | 7 8 9
    moved = [0, None, 1, 2, 3, 6, None, 7, 8, 9]
    assert compact.row_ptr.tolist() == [0, 2, 4, 6, 7, 10]
    assert compact.col_indices.tolist() == [0, 3, 0, 1, 0, 3, 1, 0, 1, 2]
    for name, tensor, base in (
        ("values", compact.values.detach(), None),
        ("grad", compact.values.grad, torch.arange(10.0)),
        ("exp_avg", state["exp_avg"], torch.arange(10.0) + 100),
        ("exp_avg_sq", state["exp_avg_sq"], torch.arange(10.0) + 200),
    ):
        source = old_values if base is None else base
        expected = torch.tensor([0.0 if m is None else float(source[m]) for m in moved])
        assert torch.equal(tensor, expected), name
    assert compact.values is optimizer.param_groups[0]["params"][0]
    assert torch.equal(compact.mask(), new_mask)


def test_state_dict_round_trip_across_topologies() -> None:
    _, compact = table()
    grown = MASK.clone()
    grown[3] = True
    compact.set_mask(grown)
    with torch.no_grad():
        compact.values.add_(1.0)
    _, other = table()
    other.load_state_dict(compact.state_dict())
    assert other.nnz == compact.nnz == 14
    assert torch.equal(other.to_dense_weight(), compact.to_dense_weight())
    assert torch.equal(other(torch.tensor([3, 1])), compact(torch.tensor([3, 1])))
    broken = compact.state_dict()
    broken["row_ptr"] = broken["row_ptr"].flip(0)
    with pytest.raises(ValueError, match="expected a CSR structure of 5 rows"):
        other.load_state_dict(broken)


def test_bad_inputs_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="expected a bool mask of shape"):
        CompactEmbedding(torch.zeros(5, 4), torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected a 2-D floating-point weight"):
        CompactEmbedding(torch.zeros(5, dtype=torch.long), MASK)
    with pytest.raises(TypeError, match=r"expected an nn\.Embedding or nn\.EmbeddingBag, got Linear"):
        CompactEmbedding.from_embedding(nn.Linear(4, 5), MASK)
    with pytest.raises(ValueError, match="got mode 'mean', include_last_offset=True"):
        CompactEmbedding.from_embedding(nn.EmbeddingBag(5, 4, mode="mean", include_last_offset=True), MASK)
    with pytest.raises(ValueError, match="got mode 'sum', include_last_offset=False"):
        CompactEmbedding.from_embedding(nn.EmbeddingBag(5, 4, mode="sum"), MASK)
    _, compact = table()
    with pytest.raises(IndexError, match=r"expected ids in \[0, 5\), got values from 0 to 5"):
        compact(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="expected no per_sample_weights"):
        compact(torch.tensor([0]), offsets=torch.tensor([0, 1]), per_sample_weights=torch.ones(1))


class Tables(nn.Module):
    def __init__(self, compact: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.users = nn.Embedding(30, 8)
        self.items = nn.Embedding(40, 8)
        if compact:
            generator = torch.Generator().manual_seed(7)  # the engine's draws, seeded as it seeds them
            config = SparsityConfig.preset("rigl", sparsity=0.75, module_types=("embedding",), seed=7)
            shapes = {"users.weight": (30, 8), "items.weight": (40, 8)}
            budgets = target_nnz(shapes, config.density, config.distribution)
            user_mask = draw_mask((30, 8), budgets["users.weight"], config, generator)
            item_mask = draw_mask((40, 8), budgets["items.weight"], config, generator)
            self.users = CompactEmbedding.from_embedding(self.users, user_mask)
            self.items = CompactEmbedding.from_embedding(self.items, item_mask)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users(users) * self.items(items)).sum(1)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.users, CompactEmbedding) and isinstance(self.items, CompactEmbedding):
            return self.users.to_dense_weight(), self.items.to_dense_weight()
        return self.users.weight.detach(), self.items.weight.detach()


def test_engine_drives_compact_and_masked_tables_to_the_same_masks() -> None:
    masks = {}
    weights = {}
    for storage in ("masked", "compact"):
        model = Tables(storage == "compact")
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        config = SparsityConfig.preset(
            "rigl", sparsity=0.75, module_types=("embedding",), seed=7, update_interval=3, storage=storage
        )
        engine = DynamicSparsity(model, optimizer, config, total_steps=30)
        generator = torch.Generator().manual_seed(0)
        seen = []
        for _ in range(24):
            users = torch.randint(0, 30, (16,), generator=generator)
            items = torch.randint(0, 40, (16,), generator=generator)
            optimizer.zero_grad()
            (model(users, items) - 1).pow(2).mean().backward()
            optimizer.step()
            seen.append({fqn: mask.clone() for fqn, mask in engine.masks.items()})
        masks[storage], weights[storage] = seen, model.dense()
        assert len(engine.history) == 7
    for step_masks, other in zip(masks["masked"], masks["compact"], strict=True):
        assert all(torch.equal(step_masks[fqn], other[fqn]) for fqn in step_masks)
    for a, b in zip(weights["masked"], weights["compact"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_engine_refuses_compact_tables_that_the_config_cannot_drive() -> None:
    model = Tables(compact=True)
    optimizer = torch.optim.Adam(model.parameters())
    base = dict(sparsity=0.75, module_types=("embedding",), seed=7)
    with pytest.raises(
        ValueError, match=r"the model holds compact modules .* use a config with storage='compact'"
    ):
        DynamicSparsity(model, optimizer, SparsityConfig.preset("rigl", **base), total_steps=10)
    momentum = SparsityConfig.preset("rigl", **base, grow="momentum", storage="compact")
    with pytest.raises(ValueError, match="grow='momentum' read a gradient momentum tracked every step"):
        DynamicSparsity(model, optimizer, momentum, total_steps=10)
