"""A NaN or Inf gradient is caught at the step where it appears, under the right name, before it reaches the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseapps.core import DynamicSparsity, NonFiniteGradientError, SparsityConfig


def _setup(check_finite: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, DynamicSparsity]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = SparsityConfig.preset("rigl", sparsity=0.8, update_interval=100)
    sparsity = DynamicSparsity(model, optimizer, config, total_steps=1000, check_finite=check_finite)
    return model, optimizer, sparsity


@pytest.mark.parametrize(
    ("name", "bad", "counts"),
    [("2.weight", float("nan"), "1 NaN and 0 Inf"), ("0.bias", float("inf"), "0 NaN and 1 Inf")],
)
def test_a_non_finite_gradient_is_named_at_its_step_and_the_weights_stay_finite(
    name: str, bad: float, counts: str
) -> None:
    model, optimizer, sparsity = _setup()
    for _ in range(3):  # ordinary steps first
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    dict(model.named_parameters())[name].grad.view(-1)[0] = bad
    with pytest.raises(NonFiniteGradientError, match=rf"'{name}' holds {counts} entries at step 4"):
        optimizer.step()
    assert sparsity.step == 3
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the step was not taken
    assert isinstance(NonFiniteGradientError("x"), ValueError)


def test_the_check_can_be_turned_off() -> None:
    model, optimizer, sparsity = _setup(check_finite=False)
    optimizer.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    model[0].bias.grad[0] = float("nan")
    optimizer.step()
    assert sparsity.step == 1
    assert bool(torch.isnan(model[0].bias).any())


def test_row_mode_tables_are_checked_on_their_looked_up_rows() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(1 << 14, 8)
    optimizer = torch.optim.Adam(table.parameters(), lr=0.01)
    config = SparsityConfig.preset(
        "rigl", sparsity=0.8, module_types=("embedding",), embedding_rows="looked_up", update_interval=100
    )
    DynamicSparsity(table, optimizer, config, total_steps=1000)
    for step in range(1, 4):
        optimizer.zero_grad()
        table(torch.tensor([3, 5, 7])).sum().backward()
        if step == 3:
            table.weight.grad[5, 0] = float("nan")
            with pytest.raises(
                NonFiniteGradientError, match=r"'weight' holds 1 NaN and 0 Inf entries at step 3"
            ):
                optimizer.step()
        else:
            optimizer.step()
    assert bool(torch.isfinite(table.weight).all())
