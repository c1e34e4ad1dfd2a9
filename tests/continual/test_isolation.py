"""Parameter isolation on the core engine: ownership invariants, frozen tasks bit for bit, a registered criterion
used unchanged, the ITOP rate, state round trips, bad input."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.continual.capacity import plan_capacity
from sparseapps.continual.isolation import (
    FREE,
    IsolatedLinear,
    IsolationConfig,
    TaskIsolation,
    set_active_task,
)
from sparseapps.continual.models import IsolatedCNN, IsolatedMLP, TaskBatchNorm2d
from sparseapps.core import DynamicSparsity, SparsityConfig, scores

SHAPE = (1, 4, 4)


def _config(sparsity: float = 0.7, *, forward_transfer: bool = False, capacity: str = "equal", **core: Any):
    core.setdefault("grow", "random")
    if core["grow"] == "none":
        core["method"] = "static"
    return IsolationConfig(
        sparsity=SparsityConfig(sparsity=sparsity, distribution=core.pop("distribution", "uniform"), **core),
        forward_transfer=forward_transfer,
        capacity=capacity,
    )


def _mlp(n_tasks: int = 3, hidden: tuple[int, ...] = (20, 12)) -> IsolatedMLP:
    return IsolatedMLP(input_shape=SHAPE, n_outputs=3, n_tasks=n_tasks, hidden=hidden)


def _data(task: int, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + task)
    x = torch.rand(n, *SHAPE, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def _steps(model, optimizer, task, steps, *, offset=0, set_to_none=True, check=None):
    x, y = _data(task)
    model.train()
    for step in range(offset, offset + steps):
        batch = slice((step * 16) % 48, (step * 16) % 48 + 16)
        optimizer.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x[batch], task), y[batch]).backward()
        optimizer.step()  # the task's engine masks, updates the topology and keeps the ownership map
        if check is not None:
            check()


def _train(model, isolation, optimizer, task, steps, **kwargs):
    isolation.begin_task(task, optimizer, total_steps=steps)
    _steps(model, optimizer, task, steps, **kwargs)
    isolation.end_task()


def _outputs(model, task):
    model.eval()
    with torch.no_grad():
        return model(_data(task)[0], task)


# ----------------------------------------------------------------------------------------------- the engine


def test_each_task_runs_on_a_core_engine_restricted_to_its_capacity():
    model = _mlp()
    isolation = TaskIsolation(model, _config(update_interval=2, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, isolation, optimizer, 0, 4)
    assert isolation.engine is None
    isolation.begin_task(1, optimizer, total_steps=8)
    engine = isolation.engine
    assert isinstance(engine, DynamicSparsity) and engine.optimizer is optimizer
    assert sorted(engine.masks) == ["backbone.1.weight", "backbone.3.weight"]
    for fqn, layer in isolation.layers.items():
        assert engine.masks[f"{fqn}.weight"] is layer.weight_mask  # the engine writes the layer's own mask
        assert engine.tensors[f"{fqn}.weight"].param is layer.weight
        region = engine.growth_regions[f"{fqn}.weight"]
        assert torch.equal(region, (layer.owner == FREE) | (layer.owner == 1))
        assert not bool((region & (layer.owner == 0)).any())  # task 0's weights are out of reach
    assert engine.generator is isolation.generator
    _steps(model, optimizer, 1, 8)
    assert len(engine.history) == 2  # steps 2 and 4 (end_fraction 0.75 of 8)
    isolation.end_task()
    assert isolation.engine is None and not optimizer._optimizer_step_pre_hooks  # the engine detached
    assert [h["task"] for h in isolation.history] == [0, 1, 1]
    assert isolation.history[-1]["tensors"]["backbone.1.weight"]["grown"] > 0


@pytest.mark.parametrize(
    ("drop", "grow"),
    [
        ("magnitude", "random"),
        ("magnitude", "unfired"),
        ("magnitude", "gradient"),
        ("random", "momentum"),
        ("signed_magnitude", "random"),
    ],
)
def test_dst_stays_within_own_and_free_weights(drop, grow):
    model = _mlp()
    isolation = TaskIsolation(model, _config(drop=drop, grow=grow, update_interval=2, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, isolation, optimizer, 0, 6)
    owners_after_task_0 = {fqn: owner.clone() for fqn, owner in isolation.ownership().items()}

    def check():
        for fqn, layer in isolation.layers.items():
            mask, owner = layer.weight_mask, layer.owner
            assert torch.equal(mask, owner == 1)
            assert int(mask.sum()) == isolation.plan[1][fqn]  # nnz never changes
            assert bool((layer.weight[~mask] == 0).all())
            assert torch.equal(owner == 0, owners_after_task_0[fqn] == 0)  # task 0 untouched
            for value in optimizer.state[layer.weight].values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    assert bool((value[~mask] == 0).all())

    isolation.begin_task(1, optimizer, total_steps=12)
    masks_at_start = {fqn: layer.weight_mask.clone() for fqn, layer in isolation.layers.items()}
    _steps(model, optimizer, 1, 12, check=check)
    isolation.end_task()
    updates = [h for h in isolation.history if h["task"] == 1]
    assert len(updates) == 4  # steps 2, 4, 6, 8 (end_fraction 0.75 of 12)
    assert all(t["dropped"] == t["grown"] for u in updates for t in u["tensors"].values())
    assert all(t["grown"] > 0 for t in updates[0]["tensors"].values())
    owner = isolation.ownership()["backbone.1"]
    assert int((owner == 1).sum()) == isolation.plan[1]["backbone.1"]
    assert not torch.equal(masks_at_start["backbone.1"], owner == 1)  # the topology moved


def test_a_registered_grow_criterion_works_unchanged():
    """A criterion registered with scores.register_grow grows, in each layer, the free entries it ranks first."""
    calls = []

    @scores.register_grow("test_fixed_ranking", needs=(), tie_noise=False)
    def _fixed_ranking(ctx: scores.ScoreContext) -> torch.Tensor:
        calls.append(ctx.fqn)
        return _ranking(ctx.mask.shape)

    try:
        model = _mlp()
        isolation = TaskIsolation(model, _config(grow="test_fixed_ranking", update_interval=2, seed=0))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        _train(model, isolation, optimizer, 0, 4)
        calls.clear()
        isolation.begin_task(1, optimizer, total_steps=12)
        before = {}

        def remember(new_masks):
            before.update({fqn: layer.owner.clone() for fqn, layer in isolation.layers.items()})
            before.update(
                {f"{fqn} mask": layer.weight_mask.clone() for fqn, layer in isolation.layers.items()}
            )

        isolation.engine.commit_hooks.insert(0, remember)
        _steps(model, optimizer, 1, 2)  # the first update, at step 2
        assert calls == ["backbone.1.weight", "backbone.3.weight"]
        for fqn, layer in isolation.layers.items():
            free = before[fqn] == FREE
            grown = layer.weight_mask & ~before[f"{fqn} mask"]
            assert bool(grown.any()) and not bool((grown & ~free).any())
            rank = _ranking(layer.weight.shape)
            # every free entry grown ranks above every free entry left: the custom score decided
            assert float(rank[grown].min()) > float(rank[free & ~layer.weight_mask].max())
        isolation.end_task()
    finally:
        scores.unregister("grow", "test_fixed_ranking")


def _ranking(shape: torch.Size) -> torch.Tensor:
    """A fixed score per entry: a seeded permutation of 0 .. numel - 1."""
    numel = int(torch.tensor(shape).prod())
    return torch.randperm(numel, generator=torch.Generator().manual_seed(numel)).float().reshape(shape)


def test_itop_rate_per_task_and_overall():
    model = _mlp()
    isolation = TaskIsolation(model, _config(update_interval=2, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    total = sum(layer.weight.numel() for layer in isolation.layers.values())
    for task in range(2):
        _train(model, isolation, optimizer, task, 8)
    itop = isolation.itop()
    owned = [t["weights"] / total for t in isolation.capacity()["tasks"]]
    assert [t["task"] for t in itop["tasks"]] == [0, 1]
    for record, share in zip(itop["tasks"], owned, strict=True):
        assert share < record["rate"] <= 1.0  # dynamic: more weights were active than a task keeps
        assert set(record["per_layer"]) == set(isolation.layers)
    assert max(t["rate"] for t in itop["tasks"]) < itop["overall"] <= sum(t["rate"] for t in itop["tasks"])

    static = TaskIsolation(_mlp(), _config(grow="none", seed=0))
    optimizer = torch.optim.Adam(static.model.parameters(), lr=1e-2)
    _train(static.model, static, optimizer, 0, 4)
    assert static.itop()["tasks"][0]["rate"] == static.capacity()["tasks"][0]["fraction"]


def test_layers_where_a_task_owns_nothing_stay_zero():
    # ERK gives the 4x4 first layer its whole size to the first task; with forward transfer the second task
    # reuses it read-only and owns nothing there.
    model = IsolatedMLP(input_shape=(1, 2, 2), n_outputs=2, n_tasks=2, hidden=(4, 64))
    config = _config(
        0.4, distribution="erk", capacity="free", forward_transfer=True, update_interval=2, seed=0
    )
    isolation = TaskIsolation(model, config)
    assert isolation.plan[1]["backbone.1"] == 0 and isolation.plan[1]["backbone.3"] > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    for task in range(2):
        isolation.begin_task(task, optimizer, total_steps=6)
        for _ in range(6):
            optimizer.zero_grad()
            F.cross_entropy(model(x, task), y).backward()
            optimizer.step()
            if task == 1:
                assert int(isolation.layers["backbone.1"].weight.count_nonzero()) == 0
        if task == 1:
            assert sorted(isolation.engine.masks) == ["backbone.3.weight"]
        isolation.end_task()
    assert not optimizer._optimizer_step_pre_hooks


# ----------------------------------------------------------------------------------------------- freezing


def test_end_task_moves_weights_to_buffers_and_freezes_task_parameters():
    model = _mlp()
    isolation = TaskIsolation(model, _config(seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _data(0)
    isolation.begin_task(0, optimizer, total_steps=1)
    F.cross_entropy(model(x, 0), y).backward()
    optimizer.step()
    layer = isolation.layers["backbone.1"]
    trained = layer.weight.detach().clone()
    mask = layer.weight_mask.clone()
    assert optimizer.state[layer.weight]
    isolation.end_task()
    assert torch.equal(layer.frozen_weight, trained * mask)
    assert int(layer.weight.count_nonzero()) == 0 and not bool(layer.weight_mask.any())
    assert torch.equal(layer.owner == 0, mask)
    assert layer.weight not in optimizer.state
    assert not layer.biases[0].requires_grad and layer.biases[1].requires_grad
    assert not any(p.requires_grad for p in model.heads.heads[0].parameters())
    assert bool(model.heads.frozen_tasks[0]) and not bool(model.heads.frozen_tasks[1])
    capacity = isolation.capacity()
    assert capacity["tasks"][0]["weights"] + capacity["free"] == capacity["total"]


@pytest.mark.parametrize("forward_transfer", [False, True])
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ],
)
def test_finished_tasks_compute_the_same_outputs_bit_for_bit(forward_transfer, make_optimizer):
    model = _mlp()
    isolation = TaskIsolation(
        model, _config(grow="gradient", update_interval=3, forward_transfer=forward_transfer)
    )
    optimizer = make_optimizer(model.parameters())
    _train(model, isolation, optimizer, 0, 9, set_to_none=False)
    before = _outputs(model, 0)
    frozen = {fqn: layer.frozen_weight.clone() for fqn, layer in isolation.layers.items()}
    _train(model, isolation, optimizer, 1, 9, set_to_none=False)
    _train(model, isolation, optimizer, 2, 9, set_to_none=False)
    assert torch.equal(_outputs(model, 0), before)
    for fqn, layer in isolation.layers.items():
        assert torch.equal(layer.frozen_weight[layer.owner == 0], frozen[fqn][layer.owner == 0])


def test_forward_transfer_reads_earlier_tasks_and_strict_does_not():
    model = _mlp()
    isolation = TaskIsolation(model, _config(forward_transfer=True, seed=0))
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, isolation, optimizer, 0, 2)
    layer = isolation.layers["backbone.1"]
    isolation.begin_task(1, optimizer, total_steps=1)
    assert torch.equal(layer.task_weight(1), layer.weight + layer.frozen_weight)
    isolation.end_task()
    assert torch.equal(layer.task_weight(1), layer.frozen_weight * (layer.owner <= 1))
    layer.forward_transfer = False
    assert torch.equal(layer.task_weight(1), layer.frozen_weight * (layer.owner == 1))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 3, 3)])
def test_cnn_fits_cifar_mnist_and_tiny_images(shape):
    model = IsolatedCNN(input_shape=shape, n_outputs=4, n_tasks=2, channels=(4, 8), hidden=16)
    assert model(torch.zeros(2, *shape), torch.tensor([1, 1])).shape == (2, 4)
    isolation = TaskIsolation(model, _config(0.6))
    assert len(isolation.layers) == 3  # two convolutions and the hidden layer (pooling stops at 1x1)


def test_frozen_batch_norm_statistics_never_drift():
    model = IsolatedCNN(input_shape=SHAPE, n_outputs=3, n_tasks=2, channels=(4,), hidden=8, batch_norm=True)
    isolation = TaskIsolation(model, _config(0.5, seed=0))
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, isolation, optimizer, 0, 3)
    norm = next(m for m in model.modules() if isinstance(m, TaskBatchNorm2d))
    statistics = norm.norms[0].running_mean.clone()
    before = _outputs(model, 0)
    _train(model, isolation, optimizer, 1, 3)
    model.train()
    set_active_task(model, 0)
    model(_data(0)[0], 0)  # a forward of the frozen task in training mode
    assert torch.equal(norm.norms[0].running_mean, statistics)
    assert torch.equal(_outputs(model, 0), before)
    assert not torch.equal(norm.norms[1].running_mean, torch.zeros_like(statistics))


# ----------------------------------------------------------------------------------------------- state


def test_state_dict_resumes_bit_for_bit():
    def setup():
        torch.manual_seed(0)
        model = _mlp()
        isolation = TaskIsolation(model, _config(grow="momentum", update_interval=2, seed=5))
        return model, isolation, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, isolation, optimizer = setup()
    _train(model, isolation, optimizer, 0, 4)
    isolation.begin_task(1, optimizer, total_steps=12)
    _steps(model, optimizer, 1, 3)
    saved = copy.deepcopy((model.state_dict(), isolation.state_dict(), optimizer.state_dict()))
    _steps(model, optimizer, 1, 6, offset=3)
    isolation.end_task()

    resumed, resumed_isolation, resumed_optimizer = setup()
    resumed_isolation.begin_task(
        1, resumed_optimizer, total_steps=12
    )  # as a resumed run starts the task anew
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[2])
    resumed_isolation.load_state_dict(saved[1], resumed_optimizer)
    assert len(resumed_optimizer._optimizer_step_pre_hooks) == 1  # one engine: the one of the saved task
    _steps(resumed, resumed_optimizer, 1, 6, offset=3)
    resumed_isolation.end_task()
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert resumed_isolation.history == isolation.history
    assert resumed_isolation.itop() == isolation.itop()
    assert torch.equal(resumed_isolation.generator.get_state(), isolation.generator.get_state())


def test_foreign_states_are_refused():
    model = _mlp()
    isolation = TaskIsolation(model, _config(seed=0))
    optimizer = torch.optim.Adam(model.parameters())
    isolation.begin_task(0, optimizer, total_steps=2)
    state = isolation.state_dict()
    with pytest.raises(ValueError, match=r"must have the config"):
        TaskIsolation(_mlp(), _config(0.8)).load_state_dict(state, optimizer)
    with pytest.raises(ValueError, match=r"optimizer must be the one of task 0, saved in training, got None"):
        TaskIsolation(_mlp(), _config(seed=0)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"version 1 \(written before each task ran on the core engine"):
        TaskIsolation(_mlp(), _config(seed=0)).load_state_dict({**state, "version": 1})


# ----------------------------------------------------------------------------------------------- bad input


def test_model_without_isolated_layers_is_refused():
    with pytest.raises(
        ValueError, match=r"must hold IsolatedLinear / IsolatedConv2d layers .* got Sequential"
    ):
        TaskIsolation(nn.Sequential(nn.Linear(4, 2)), IsolationConfig())


def test_shared_parameters_are_refused():
    model = nn.Sequential(IsolatedLinear(4, 4, n_tasks=2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"shared parameters \['1.weight', '1.bias'\]"):
        TaskIsolation(model, _config(0.5))


def test_task_sequence_errors():
    model = _mlp(n_tasks=2)
    isolation = TaskIsolation(model, _config(0.5))
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"task must be an integer >= 0 and <= 1, got 2"):
        isolation.begin_task(2, optimizer, total_steps=1)
    with pytest.raises(RuntimeError, match=r"no task in training"):
        isolation.end_task()
    isolation.begin_task(0, optimizer, total_steps=1)
    with pytest.raises(RuntimeError, match=r"task 0 is still in training"):
        isolation.begin_task(1, optimizer, total_steps=1)
    isolation.end_task()
    with pytest.raises(ValueError, match=r"task must be one not trained before, got 0"):
        isolation.begin_task(0, optimizer, total_steps=1)
    with pytest.raises(ValueError, match=r"optimizer must hold the isolated weights"):
        isolation.begin_task(1, torch.optim.Adam(model.heads.parameters()), total_steps=1)
    with pytest.raises(ValueError, match=r"n_tasks must be at most 2 \(the model's task slots\), got 3"):
        TaskIsolation(model, IsolationConfig(), n_tasks=3)


def test_more_tasks_than_capacity_is_refused_before_training():
    model = _mlp(n_tasks=6)
    with pytest.raises(ValueError, match=r"capacity: expected n_tasks x \(weights per task\) <= layer size"):
        TaskIsolation(model, _config(0.8))


def test_plan_is_the_capacity_modules_plan():
    model = _mlp()
    isolation = TaskIsolation(model, _config(0.8))
    shapes = {fqn: tuple(layer.weight.shape) for fqn, layer in isolation.layers.items()}
    assert (isolation.target, isolation.plan) == plan_capacity(shapes, 3, isolation.config)
