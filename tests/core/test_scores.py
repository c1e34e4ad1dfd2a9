"""The score registry: one source of criterion names; a registered criterion drives the engine unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, scores


@pytest.fixture
def registered():
    """Registers grow criterion 'test_fixed' (a fixed ranking) and drop 'test_low_index'; removes them after."""
    ranking = {}

    @scores.register_grow("test_fixed", needs=())
    def fixed(ctx: scores.ScoreContext) -> torch.Tensor:
        return ranking[ctx.fqn]

    @scores.register_drop("test_low_index", needs=(), tie_noise=False)
    def low_index(ctx: scores.ScoreContext) -> torch.Tensor:
        return torch.arange(ctx.mask.numel(), dtype=torch.float32).reshape(ctx.mask.shape)

    yield ranking
    scores.unregister("grow", "test_fixed")
    scores.unregister("drop", "test_low_index")


def test_the_registry_is_the_single_source_of_allowed_names(registered) -> None:
    assert {"magnitude", "signed_magnitude", "random", "weight_gradient"} <= set(scores.drop_names())
    assert {"random", "gradient", "momentum", "cosine", "unfired", "test_fixed"} <= set(scores.grow_names())
    SparsityConfig(grow="test_fixed")
    with pytest.raises(ValueError, match=r"grow must be one of .*'test_fixed'.*got 'nope'"):
        SparsityConfig(grow="nope")
    with pytest.raises(ValueError, match=r"unknown drop criterion 'nope'; registered: .*magnitude"):
        scores.get("drop", "nope")
    with pytest.raises(ValueError, match=r"already registered"):
        scores.register_grow("gradient")(lambda ctx: ctx.grad)
    with pytest.raises(ValueError, match=r"needs must be a subset of .*unknown \['hessian'\]"):
        scores.register_grow("test_bad", needs=("hessian",))
    with pytest.raises(ValueError, match=r"built-in grow criterion"):
        scores.unregister("grow", "gradient")


def test_a_custom_criterion_drives_the_engine(registered) -> None:
    """Drop the lowest-index active entries, grow the entries the custom score ranks first: checked exactly."""
    torch.manual_seed(0)
    model = nn.Linear(10, 6, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    registered["weight"] = torch.rand(6, 10, generator=torch.Generator().manual_seed(3))
    config = SparsityConfig(
        sparsity=0.5,
        drop="test_low_index",
        grow="test_fixed",
        update_interval=1,
        drop_fraction=0.2,
        drop_schedule="constant",
        end_fraction=1.0,
        tie_noise=0.0,
        distribution="uniform",
    )
    sparsity = DynamicSparsity(model, optimizer, config, total_steps=10)
    before = sparsity.masks["weight"].clone()
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    after = sparsity.masks["weight"]
    active = before.reshape(-1).nonzero().squeeze(1)
    dropped = active[:6]  # ceil(0.2 * 30) = 6 lowest indices among the active
    kept = before.clone().reshape(-1)
    kept[dropped] = False
    inactive = (~kept).nonzero().squeeze(1)
    ranking = registered["weight"].reshape(-1)[inactive]
    grown = inactive[torch.argsort(ranking, descending=True)[:6]]
    expected = kept.clone()
    expected[grown] = True
    assert torch.equal(after.reshape(-1), expected)
    assert int(after.sum()) == 30


def test_a_criterion_must_return_the_mask_shape(registered) -> None:
    registered["weight"] = torch.rand(3)
    model = nn.Linear(4, 6, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SparsityConfig(sparsity=0.5, grow="test_fixed", update_interval=1, distribution="uniform")
    DynamicSparsity(model, optimizer, config, total_steps=10)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(
        ValueError, match=r"'test_fixed' must return a tensor of shape \(6, 4\) for 'weight', got \(3,\)"
    ):
        optimizer.step()


def test_gradient_is_collected_only_when_a_criterion_declares_it() -> None:
    model = nn.Linear(4, 6)
    config = SparsityConfig.preset("set", sparsity=0.5)
    engine = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=10)
    assert not engine.needs_dense_gradient()
    config = SparsityConfig.preset("rigl", sparsity=0.5)
    engine = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=10)
    assert engine.needs_dense_gradient()
