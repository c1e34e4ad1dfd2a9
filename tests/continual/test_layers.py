"""Isolated layers: new weights' scale, task routing, the engine's view of a layer, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseapps.continual.layers import FREE, IsolatedConv2d, IsolatedLinear, TaskModule
from sparseapps.continual.models import TaskHeads
from sparseapps.core.masks import get_mask


def test_new_weights_start_at_the_scale_of_their_fan_in():
    layer = IsolatedLinear(100, 3, n_tasks=1)
    mask = torch.zeros(3, 100, dtype=torch.bool)
    mask[0, :4] = True  # fan-in 4: bound 1/2
    mask[1, :] = True  # fan-in 100: bound 1/10
    values = layer.initial_values(torch.Generator().manual_seed(0), mask)
    assert bool((values[~mask] == 0).all())
    assert 0.2 < float(values[0, :4].abs().max()) <= 0.5
    assert 0.08 < float(values[1].abs().max()) <= 0.1
    dense = layer.initial_values(torch.Generator().manual_seed(0))  # PyTorch's bound 1/sqrt(100)
    assert 0.08 < float(dense.abs().max()) <= 0.1 and bool((dense != 0).all())
    conv = IsolatedConv2d(2, 1, 3, n_tasks=1)
    conv_mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    conv_mask[0, 0] = True  # fan-in 9 of 18: bound 1/3
    conv_values = conv.initial_values(torch.Generator().manual_seed(1), conv_mask)
    assert 0.2 < float(conv_values.abs().max()) <= 1 / 3 and bool((conv_values[0, 1] == 0).all())


@pytest.mark.parametrize(
    ("layer", "kind"),
    [
        (IsolatedLinear(5, 3, n_tasks=2), nn.Linear),
        (IsolatedConv2d(2, 4, 3, n_tasks=2, padding=1), nn.Conv2d),
    ],
)
def test_engine_view_shares_the_weight_and_the_mask_and_draws_nothing(layer, kind):
    state = torch.get_rng_state()
    view = layer.engine_view()
    assert torch.equal(torch.get_rng_state(), state)  # built on the meta device: no initialization
    assert type(view) is kind and view.bias is None
    assert view.weight is layer.weight and get_mask(view) is layer.weight_mask
    assert sum(b.numel() for b in view.buffers()) == layer.weight_mask.numel()


def test_forward_needs_an_active_task_in_range():
    layer = IsolatedConv2d(1, 2, 3, n_tasks=2)
    with pytest.raises(RuntimeError, match=r"no active task"):
        layer(torch.zeros(1, 1, 4, 4))
    layer.active_task = 2
    with pytest.raises(ValueError, match=r"task id: expected one in \[0, 2\), got 2"):
        layer(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"n_tasks must be an integer >= 1 and <= 255, got 256"):
        TaskHeads(4, 2, n_tasks=256)
    with pytest.raises(ValueError, match=r"kernel_size must be an integer >= 1, got 0"):
        IsolatedConv2d(1, 2, 0, n_tasks=2)
    assert FREE == 255 and issubclass(TaskHeads, TaskModule)
