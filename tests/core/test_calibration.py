"""The obs and sparsegpt presets: what they collect in the steps before the one-shot step, what they prune, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, obs, sparsegpt

TOTAL, WINDOW = 20, 4  # the one-shot step is 10 (start_fraction 0.5); steps 7-10 are collected


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator))
        for _ in range(steps)
    ]


def _train(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _engine(method: str, model: nn.Module, **overrides: object) -> DynamicSparsity:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = SparsityConfig.preset(
        method, **{"sparsity": 0.75, "calibration_steps": WINDOW, "seed": 0, **overrides}
    )
    return DynamicSparsity(model, optimizer, config, total_steps=TOTAL)


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(6, 3), (5, 2, 6)),
        (nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=2, dilation=2), (4, 2, 11)),
        (nn.Conv2d(2, 3, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)), (2, 2, 5, 7)),
    ],
)
def test_layer_inputs_are_the_rows_the_weight_multiplies(module: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    rows = sparsegpt.layer_inputs(module, x)
    out = module(x)
    weight = module.weight.reshape(module.weight.shape[0], -1)
    products = rows @ weight.T + module.bias
    if isinstance(module, nn.Linear):
        expected = out.reshape(-1, 3)
    else:
        expected = out.flatten(2).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(products, expected, atol=1e-5, rtol=1e-5)


def test_obs_preset_prunes_once_at_the_one_shot_step_from_the_window_gradients() -> None:
    batches = _batches(TOTAL)
    engine = _engine("obs", _model())
    model = engine.model
    # The same run by hand: train to step 9, record the dense gradient of steps 7-10, take step 10, then prune.
    manual = _model()  # the same weights, without the engine's hooks
    optimizer = torch.optim.SGD(manual.parameters(), lr=0.05)
    recorded: dict[str, list[torch.Tensor]] = {"0.weight": [], "2.weight": []}
    for step, (x, y) in enumerate(batches[:10], start=1):
        optimizer.zero_grad()
        F.cross_entropy(manual(x), y).backward()
        if step >= 7:
            for name in recorded:
                recorded[name].append(manual.get_parameter(name).grad.clone())
        optimizer.step()
    _train(model, engine.optimizer, batches[:10])
    assert [record["step"] for record in engine.history] == [10]
    reference = _engine("one_shot", manual)  # dense masks, same budgets, never prunes within these steps
    obs.prune_from_gradients(reference, {name: torch.stack(g) for name, g in recorded.items()})
    for name in recorded:
        torch.testing.assert_close(model.get_parameter(name), manual.get_parameter(name))
    for fqn, t in engine.tensors.items():
        assert int(t.mask.sum()) == t.budget
        assert torch.equal(t.mask, reference.tensors[fqn].mask)
    assert all(value.numel() == 0 for per in engine.traces.values() for value in per.values())  # released
    _train(model, engine.optimizer, batches[10:])  # fine-tuning keeps the masks
    assert len(engine.history) == 1 and all(
        bool((t.param[~t.mask] == 0).all()) for t in engine.tensors.values()
    )


def test_sparsegpt_preset_reconstructs_from_the_inputs_of_the_window() -> None:
    batches = _batches(TOTAL)
    engine = _engine("sparsegpt", _model())
    model = engine.model
    manual = _model()  # the same weights, without the engine's hooks
    optimizer = torch.optim.SGD(manual.parameters(), lr=0.05)
    inputs: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
    hooks = [
        manual.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: inputs[name].append(i[0].detach())
        )
        for name in inputs
    ]
    for step, (x, y) in enumerate(batches[:10], start=1):
        for per in inputs.values():
            if step <= 7:  # keep the forwards of steps 7-10
                per.clear()
        optimizer.zero_grad()
        F.cross_entropy(manual(x), y).backward()
        optimizer.step()
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        model.eval()
        model(batches[0][0])  # an evaluation forward inside the window is not collected
        model.train()
    _train(model, engine.optimizer, batches[:10])
    for name, per in inputs.items():
        x = torch.cat(per).double()
        assert len(per) == WINDOW
        weight = manual.get_submodule(name).weight.detach()
        expected, mask = sparsegpt.prune_layer(weight, 2 * x.T @ x / len(x), sparsity=0.75)
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(engine.tensors[f"{name}.weight"].mask, mask)


@pytest.mark.parametrize("method", ["obs", "sparsegpt"])
def test_a_checkpoint_inside_the_window_resumes_bit_for_bit(method: str) -> None:
    batches = _batches(TOTAL)
    straight = _engine(method, _model())
    _train(straight.model, straight.optimizer, batches)

    first = _engine(method, _model())
    _train(first.model, first.optimizer, batches[:8])  # steps 7 and 8 collected
    saved = copy.deepcopy((first.model.state_dict(), first.optimizer.state_dict(), first.state_dict()))
    resumed = _engine(method, _model())
    resumed.model.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    resumed.load_state_dict(saved[2])
    _train(resumed.model, resumed.optimizer, batches[8:])
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_window_longer_than_the_steps_before_the_pruning_step_starts_at_step_one() -> None:
    engine = _engine("obs", _model(), calibration_steps=50)
    assert (engine.calibration.first_step, engine.calibration.prune_step) == (1, 10)
    _train(engine.model, engine.optimizer, _batches(10))
    assert round(engine.density, 2) == 0.25


def test_what_the_presets_cannot_prune_is_refused_by_name() -> None:
    table = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0\.weight' is an embedding table"):
        DynamicSparsity(table, torch.optim.SGD(table.parameters(), lr=0.1), SparsityConfig.preset("obs"), 100)
    grouped = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"cannot prune '0.weight' \(Conv1d\): groups=2"):
        DynamicSparsity(
            grouped, torch.optim.SGD(grouped.parameters(), lr=0.1), SparsityConfig.preset("sparsegpt"), 100
        )
    with pytest.raises(ValueError, match="calibration_steps"):
        SparsityConfig.preset("obs", calibration_steps=0)
    with pytest.raises(ValueError, match="storage='compact'"):
        SparsityConfig.preset("sparsegpt", storage="compact")


def test_obs_gradients_must_cover_every_tensor_and_match_its_size() -> None:
    engine = _engine("one_shot", _model())
    with pytest.raises(ValueError, match=r"missing \['2.weight'\]"):
        obs.prune_from_gradients(engine, {"0.weight": torch.zeros(3, 16, 8)})
    with pytest.raises(ValueError, match=r"'2\.weight' have 5 entries per row"):
        obs.prune_from_gradients(engine, {"0.weight": torch.zeros(3, 16, 8), "2.weight": torch.zeros(3, 5)})
