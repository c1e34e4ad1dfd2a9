"""``embedding_rows="looked_up"``: per-step work on the looked-up rows gives the whole-table results."""

import copy

import pytest
import torch
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, embedding_rows

USERS, ITEMS, DIM = 40, 30, 8


@pytest.fixture(autouse=True)
def small_tables_use_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tables are tiny; the engine processes tables below ``embedding_rows.MIN_ROWS`` rows whole."""
    monkeypatch.setattr(embedding_rows, "MIN_ROWS", 1)


def test_small_tables_are_processed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding_rows, "MIN_ROWS", 35)  # users (40 rows) in row mode, items (30) not
    _, _, engine = make("looked_up")
    assert engine.rows.fqns == ("users.weight",)


class TwoTower(nn.Module):
    """MF-style: each table is read only through its module's forward (``nn.Embedding`` / ``nn.EmbeddingBag``)."""

    def __init__(self, bag: bool = False, direct_read: bool = False) -> None:
        super().__init__()
        self.users = nn.Embedding(USERS, DIM)
        self.items = nn.EmbeddingBag(ITEMS, DIM, mode="sum") if bag else nn.Embedding(ITEMS, DIM)
        self.bag = bag
        self.direct_read = direct_read

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.users(input=users)  # keyword call, as torchrec's collections make it
        i = self.items(items.reshape(-1, 1)) if self.bag else self.items(items)
        scores = (u * i).sum(-1)
        if self.direct_read:  # a LightGCN-like read of the whole table outside the module's forward
            scores = scores + 1e-3 * self.items.weight.sum()
        return scores


def make(rows: str, grow: str = "momentum", seed: int = 0, **model_kwargs):
    torch.manual_seed(seed)
    model = TwoTower(**model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    config = SparsityConfig(
        method="dst",
        sparsity=0.75,
        distribution="uniform",
        drop="magnitude",
        grow=grow,
        update_interval=5,
        drop_fraction=0.3,
        end_fraction=0.9,
        momentum=0.9,
        module_types=("embedding",),
        embedding_rows=rows,
        seed=seed,
    )
    engine = DynamicSparsity(model, optimizer, config, total_steps=40)
    return model, optimizer, engine


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # small batches: most rows are absent from a given step
        yield torch.randint(0, USERS, (6,), generator=g), torch.randint(0, ITEMS, (6,), generator=g)


def train(model, optimizer, engine, data, on_update=None, check: bool = True) -> None:
    for users, items in data:
        optimizer.zero_grad(set_to_none=True)
        target = torch.ones(len(users))
        torch.nn.functional.binary_cross_entropy_with_logits(model(users, items), target).backward()
        optimizer.step()
        for fqn, t in engine.tensors.items():  # the invariant holds after every step, for every row
            if check:
                assert bool((t.param.detach()[~t.mask] == 0).all()), fqn
        if on_update is not None and engine.history and engine.history[-1]["step"] == engine.step:
            on_update(engine)


@pytest.mark.parametrize("grow", ["momentum", "gradient"])
@pytest.mark.parametrize("bag", [False, True])
def test_looked_up_rows_match_whole_tables(grow: str, bag: bool) -> None:
    runs = {}
    for rows in ("all", "looked_up"):
        model, optimizer, engine = make(rows, grow, bag=bag)
        masks_at_updates: list[dict[str, torch.Tensor]] = []
        train(
            model,
            optimizer,
            engine,
            batches(40),
            lambda e, seen=masks_at_updates: seen.append(copy.deepcopy(e.masks)),
        )
        runs[rows] = (model, engine, masks_at_updates)
    (dense_model, dense_engine, dense_masks), (row_model, row_engine, row_masks) = (
        runs["all"],
        runs["looked_up"],
    )
    assert len(dense_masks) == len(row_masks) >= 5
    for a, b in zip(dense_masks, row_masks, strict=True):
        for fqn in a:
            assert torch.equal(a[fqn], b[fqn]), fqn
    for (name, p), (_, q) in zip(dense_model.named_parameters(), row_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    if grow == "momentum":
        for fqn, m in dense_engine.momentum.items():
            row_engine.rows.catch_up(row_engine.momentum, fqn, row_engine.step)
            torch.testing.assert_close(m, row_engine.momentum[fqn], rtol=1e-5, atol=1e-7)


def test_momentum_is_scaled_between_full_steps() -> None:
    model, optimizer, engine = make("looked_up")
    users, items = torch.tensor([1, 2, 2]), torch.tensor([3, 4, 5])
    for _ in range(3):  # the first step is a full one (it checks the tables), the next two work on rows
        optimizer.zero_grad()
        model(users, items).sum().backward()
        optimizer.step()
    assert (
        engine.rows.momentum_base["users.weight"] == 1
    )  # the stored momentum is scaled by 0.9 ** -(step - 1)
    untouched = torch.ones(USERS, dtype=torch.bool)
    untouched[[1, 2]] = False
    stored = engine.momentum["users.weight"].clone()
    engine.rows.catch_up(engine.momentum, "users.weight", 3)
    torch.testing.assert_close(engine.momentum["users.weight"][untouched], 0.81 * stored[untouched])


def test_a_non_elementwise_optimizer_is_refused() -> None:
    class Shove(torch.optim.Optimizer):
        """Plain SGD that also moves every entry, whatever its gradient: not elementwise as the row mode needs."""

        def __init__(self, params, lr: float) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
                    p.add_(1e-3)

    torch.manual_seed(0)
    model = TwoTower()
    optimizer = Shove(model.parameters(), lr=0.1)
    config = SparsityConfig(
        method="static", grow="none", sparsity=0.5, module_types=("embedding",), embedding_rows="looked_up"
    )
    engine = DynamicSparsity(model, optimizer, config, total_steps=10)
    with pytest.raises(RuntimeError, match=r"Shove changed \d+ masked entries of 'users.weight'"):
        train(model, optimizer, engine, batches(10), check=False)


def test_direct_read_of_a_looked_up_table_is_refused() -> None:
    model, optimizer, engine = make("looked_up", direct_read=True)
    before = {fqn: t.param.detach().clone() for fqn, t in engine.tensors.items()}
    with pytest.raises(ValueError, match=r"items\.weight.*embedding_rows='all'"):
        train(model, optimizer, engine, batches(40))
    assert engine.step == 0  # refused at the first step, before the optimizer changed anything
    for fqn, t in engine.tensors.items():
        assert torch.equal(before[fqn], t.param.detach()), fqn


def test_resume_mid_interval_is_bitwise() -> None:
    data = list(batches(40))
    model, optimizer, engine = make("looked_up")
    train(model, optimizer, engine, data)

    model2, optimizer2, engine2 = make("looked_up")
    train(model2, optimizer2, engine2, data[:13])  # between updates: momenta are lazily behind
    checkpoint = copy.deepcopy(
        {"model": model2.state_dict(), "optim": optimizer2.state_dict(), "sparse": engine2.state_dict()}
    )
    model3, optimizer3, engine3 = make("looked_up")
    with torch.no_grad():  # another state, overwritten by the checkpoint
        for p in model3.parameters():
            p.add_(1.0)
    model3.load_state_dict(checkpoint["model"])
    optimizer3.load_state_dict(checkpoint["optim"])
    engine3.load_state_dict(checkpoint["sparse"])
    train(model3, optimizer3, engine3, data[13:])
    for (name, p), (_, q) in zip(model.named_parameters(), model3.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for fqn in engine.momentum:
        assert torch.equal(engine.momentum[fqn], engine3.momentum[fqn]), fqn


def test_embedding_rows_is_validated() -> None:
    with pytest.raises(ValueError, match="embedding_rows must be one of 'all', 'looked_up', got 'some'"):
        SparsityConfig(embedding_rows="some")
