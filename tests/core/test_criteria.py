"""Taylor, movement and OBD: hand-computed scores and masks, and the Fisher / Hessian estimates against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, criteria, rules, scores
from sparseapps.core.criteria import (
    accumulate_movement_,
    accumulate_squared_gradient_,
    empirical_fisher_diagonal,
    hutchinson_diagonal,
    obd_scores,
)


def context(weight: torch.Tensor, **fields: torch.Tensor) -> scores.ScoreContext:
    return scores.ScoreContext(
        fqn="w",
        weight=weight,
        mask=torch.ones(weight.shape, dtype=torch.bool),
        step=1,
        generator=torch.Generator().manual_seed(0),
        **fields,
    )


# ---------------------------------------------------------------------------------------------- taylor
def test_taylor_is_registered_with_its_needs_and_preset() -> None:
    criterion = scores.get("drop", "taylor")
    assert criterion.needs == frozenset({"momentum"})
    config = SparsityConfig.preset("taylor", sparsity=0.9)
    assert (config.method, config.drop, config.grow, config.momentum) == ("gmp", "taylor", "none", 0.9)
    assert (config.start_fraction, config.end_fraction) == (0.1, 0.75)


def test_taylor_scores_and_mask_by_hand() -> None:
    """|w * m|: [0.5, 0.2, 3.0, 0.0]; dropping two of four takes entries 3 (0.0) and 1 (0.2)."""
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    momentum = torch.tensor([[0.5, 0.1], [-1.0, 0.0]])
    ctx = context(weight, momentum=momentum)
    got = scores.compute(scores.get("drop", "taylor"), ctx, tie_noise=0.0)
    assert torch.equal(got, torch.tensor([[0.5, 0.2], [3.0, 0.0]]))
    # magnitude would drop entries 0 and 1 instead: the criteria disagree on this case
    assert torch.equal(rules.drop(ctx.mask, got, 2), torch.tensor([[True, False], [True, False]]))
    assert torch.equal(rules.drop(ctx.mask, weight.abs(), 2), torch.tensor([[False, False], [True, True]]))


def test_taylor_without_momentum_names_the_tensor() -> None:
    with pytest.raises(RuntimeError, match=r"'w'.*momentum"):
        scores.get("drop", "taylor").function(context(torch.ones(2)))


def test_taylor_preset_prunes_gradually_by_the_averaged_gradient() -> None:
    """At every GMP pruning step the engine drops the active entries of smallest |w * m|, with m the gradient EMA
    (decay 0.9) recomputed here by hand; the run ends at the target nnz with the pruned weights zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = SparsityConfig.preset(
        "taylor",
        sparsity=0.75,
        pruning_interval=2,
        start_fraction=0.0,
        end_fraction=1.0,
        tie_noise=0.0,
        seed=0,
    )
    engine = DynamicSparsity(model, optimizer, config, total_steps=8)
    commits = []
    engine.commit_hooks.append(
        lambda new: commits.append(
            {
                fqn: (t.param.detach().clone(), t.mask.clone(), new[fqn].clone())
                for fqn, t in engine.tensors.items()
            }
        )
    )
    generator = torch.Generator().manual_seed(1)
    momentum = {fqn: torch.zeros_like(t.param) for fqn, t in engine.tensors.items()}
    expected_momenta = []
    for step in range(1, 9):
        optimizer.zero_grad()
        x, y = torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)
        F.cross_entropy(model(x), y).backward()
        for fqn, t in engine.tensors.items():
            momentum[fqn].mul_(0.9).add_(t.param.grad, alpha=0.1)
        if step % 2 == 0:
            expected_momenta.append({fqn: m.clone() for fqn, m in momentum.items()})
        optimizer.step()
    assert [record["step"] for record in engine.history] == [2, 4, 6, 8]
    assert len(commits) == len(expected_momenta) == 4
    for commit, expected_momentum in zip(commits, expected_momenta, strict=True):
        for fqn, (weight, before, after) in commit.items():
            n_drop = int(before.sum()) - int(after.sum())
            keep_scores = (weight * expected_momentum[fqn]).abs()
            assert torch.equal(after, rules.drop(before, keep_scores, n_drop) if n_drop else before)
    for t in engine.tensors.values():
        assert int(t.mask.sum()) == t.budget
        assert bool((t.param[~t.mask] == 0).all())


# ---------------------------------------------------------------------------------------------- movement
def test_movement_accumulates_minus_gradient_times_weight_by_hand() -> None:
    """Two steps: S = -(g1 * w1) - (g2 * w2); a weight pushed away from zero scores high, one pulled in low."""
    total = torch.zeros(4)
    accumulate_movement_(total, torch.tensor([1.0, 1.0, -2.0, 0.5]), torch.tensor([-1.0, 1.0, 0.5, 0.0]))
    accumulate_movement_(total, torch.tensor([1.5, 0.5, -2.5, 0.5]), torch.tensor([-1.0, 2.0, -0.5, 0.0]))
    assert torch.equal(total, torch.tensor([2.5, -2.0, -0.25, 0.0]))
    # Movement keeps entry 0 (moving out) over entry 1 (moving in), though |w| ranks them the other way at step 1.
    mask = torch.ones(4, dtype=torch.bool)
    assert torch.equal(rules.drop(mask, total, 1), torch.tensor([True, False, True, True]))


def test_movement_accumulator_keeps_its_dtype_and_storage() -> None:
    total = torch.zeros(3, dtype=torch.float64)
    out = accumulate_movement_(total, torch.ones(3, dtype=torch.float32), torch.full((3,), 2.0))
    assert out is total and out.dtype == torch.float64
    assert torch.equal(total, torch.full((3,), -2.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- OBD / Fisher
def test_squared_gradient_average_by_hand() -> None:
    average = torch.zeros(2)
    accumulate_squared_gradient_(average, torch.tensor([2.0, 1.0]), 0.5)  # [2.0, 0.5]
    accumulate_squared_gradient_(average, torch.tensor([0.0, -3.0]), 0.5)  # [1.0, 0.25 + 4.5]
    assert torch.equal(average, torch.tensor([1.0, 4.75]))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        accumulate_squared_gradient_(average, torch.ones(2), 1.0)


def test_obd_scores_and_mask_by_hand() -> None:
    """0.5 * H * w^2 = [0.5, 0.5, 4.5, 8.0]: dropping two takes entries 0 and 1, which |w| alone would not."""
    weight = torch.tensor([1.0, -0.5, 3.0, 4.0])
    hessian = torch.tensor([1.0, 4.0, 1.0, 1.0])
    got = obd_scores(weight, hessian)
    assert torch.equal(got, torch.tensor([0.5, 0.5, 4.5, 8.0]))
    weight = torch.tensor([0.5, 1.0, 3.0, 4.0])
    hessian = torch.tensor([16.0, 1.0, 1.0, 1.0])  # scores [2.0, 0.5, 4.5, 8.0]
    mask = torch.ones(4, dtype=torch.bool)
    assert torch.equal(
        rules.drop(mask, obd_scores(weight, hessian), 1), torch.tensor([True, False, True, True])
    )
    assert torch.equal(rules.drop(mask, weight.abs(), 1), torch.tensor([False, True, True, True]))
    with pytest.raises(ValueError, match=r"weight's shape \(4,\), got \(2,\)"):
        obd_scores(weight, torch.ones(2))


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_empirical_fisher_matches_per_example_autograd() -> None:
    model = _tiny_model()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 3, generator=generator), torch.randint(0, 2, (7,), generator=generator)
    names = ["0.weight", "2.weight", "2.bias"]
    got = empirical_fisher_diagonal(model, F.cross_entropy, x, y, names)
    parameters = dict(model.named_parameters())
    expected = {name: torch.zeros_like(parameters[name]) for name in names}
    for n in range(len(x)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), [parameters[name] for name in names]
        )
        for name, g in zip(names, grads, strict=True):
            expected[name] += g.pow(2) / len(x)
    assert sorted(got) == sorted(names)
    chunked = empirical_fisher_diagonal(model, F.cross_entropy, x, y, names, chunk_size=3)
    for name in names:
        torch.testing.assert_close(got[name], expected[name])
        torch.testing.assert_close(chunked[name], expected[name])
    with pytest.raises(ValueError, match=r"unknown parameter names \['nope'\]"):
        empirical_fisher_diagonal(model, F.cross_entropy, x, y, ["nope"])


def test_empirical_fisher_approximates_the_hessian_of_a_well_specified_model() -> None:
    """Linear regression with unit Gaussian noise, at the true weights: E[F] = H = E[x x^T]; diagonals agree."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    scale = torch.tensor([1.0, 2.0, 0.5])
    x = torch.randn(20_000, 3, generator=generator) * scale
    y = model(x).detach() + torch.randn(20_000, 1, generator=generator)

    def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - targets).pow(2).sum()

    fisher = empirical_fisher_diagonal(model, half_squared_error, x, y, ["weight"])["weight"]
    hessian = (
        torch.autograd.functional.hessian(lambda w: 0.5 * (x @ w.T - y).pow(2).mean(), model.weight.detach())
        .reshape(3, 3)
        .diagonal()
    )
    torch.testing.assert_close(hessian, scale.pow(2), rtol=0.05, atol=0.0)
    torch.testing.assert_close(fisher.reshape(3), hessian, rtol=0.1, atol=0.0)


def test_hutchinson_estimates_the_exact_hessian_diagonal() -> None:
    model = _tiny_model()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 3, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    first = model[0].weight

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model[2](torch.tanh(F.linear(x, w, model[0].bias))), y)

    exact = (
        torch.autograd.functional.hessian(loss_of, first.detach()).reshape(12, 12).diagonal().reshape(4, 3)
    )
    estimate = hutchinson_diagonal(loss, [first], probes=2000, generator=torch.Generator().manual_seed(5))[0]
    assert estimate.shape == first.shape
    torch.testing.assert_close(estimate, exact, rtol=0.0, atol=0.03 * float(exact.abs().max()))
    with pytest.raises(ValueError, match="probes must be a positive integer, got 0"):
        hutchinson_diagonal(loss, [first], probes=0, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------- engine traces
def _traced_run(
    preset: str, steps: int
) -> tuple[DynamicSparsity, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A tiny GMP-scheduled run that records (weight before the step, dense gradient) of layer 0 every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SparsityConfig.preset(preset, sparsity=0.5, seed=0, update_interval=5)
    engine = DynamicSparsity(model, optimizer, config, total_steps=steps)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.arange(4) % 3).backward()
        seen.append((model[0].weight.detach().clone(), model[0].weight.grad.detach().clone()))
        optimizer.step()
    return engine, model, seen


@pytest.mark.parametrize("preset", ["movement", "obd"])
def test_movement_and_obd_presets_are_registered_gmp_runs(preset: str) -> None:
    config = SparsityConfig.preset(preset, sparsity=0.9)
    assert (config.method, config.drop) == ("gmp", preset)
    assert scores.get("drop", preset).needs == frozenset(
        {"movement" if preset == "movement" else "grad_squared"}
    )


def test_the_engine_traces_movement_and_squared_gradients_every_step_by_hand() -> None:
    engine, _, seen = _traced_run("movement", 12)
    expected = torch.zeros(8, 6)
    for weight, grad in seen:  # the gradient before masking: the straight-through dense gradient
        expected -= grad * weight
    torch.testing.assert_close(engine.traces["movement"]["0.weight"], expected, rtol=1e-5, atol=1e-6)
    assert set(engine.traces) == {"movement"} and not engine.momentum

    engine, _, seen = _traced_run("obd", 12)
    beta, average = engine.config.momentum, torch.zeros(8, 6)
    for _, grad in seen:
        average = beta * average + (1 - beta) * grad * grad
    torch.testing.assert_close(engine.traces["grad_squared"]["0.weight"], average, rtol=1e-5, atol=1e-9)


def test_movement_pruning_drops_the_weights_with_the_lowest_movement() -> None:
    engine, _, _ = _traced_run("movement", 40)
    assert engine.history[0]["tensors"]["0.weight"]["dropped"] > 0
    # a further drop by the registered criterion removes exactly the lowest-movement active weights
    t = engine.tensors["0.weight"]
    movement = engine.drop_scores()["0.weight"]  # the trace plus tie noise
    after = rules.drop(t.mask, movement, 3)
    dropped = t.mask & ~after
    assert int(dropped.sum()) == 3
    trace = engine.traces["movement"]["0.weight"]
    assert float(trace[dropped].max()) <= float(trace[after].min())


def test_traces_resume_bit_for_bit_and_are_refused_where_they_cannot_be_kept() -> None:
    engine, model, _ = _traced_run("obd", 7)
    state = engine.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = DynamicSparsity(model, optimizer, engine.config, total_steps=7)
    other.load_state_dict(state)
    for need, per in engine.traces.items():
        for fqn, trace in per.items():
            assert torch.equal(other.traces[need][fqn], trace)
    wrong = {**state, "traces": {}}
    with pytest.raises(ValueError, match="traces"):
        DynamicSparsity(model, optimizer, engine.config, total_steps=7).load_state_dict(wrong)
    table = nn.Sequential(nn.Embedding(20, 4))
    with pytest.raises(ValueError, match="embedding_rows"):
        DynamicSparsity(
            table,
            torch.optim.SGD(table.parameters(), lr=0.1),
            SparsityConfig.preset("movement", sparsity=0.5, embedding_rows="looked_up"),
            total_steps=10,
        )


def test_momentum_magnitude_averages_weight_magnitudes_every_step_and_prunes_by_them() -> None:
    config = SparsityConfig.preset("momentum_magnitude", sparsity=0.9)
    assert (config.method, config.drop, config.momentum) == ("gmp", "momentum_magnitude", 0.99)
    assert scores.get("drop", "momentum_magnitude").needs == frozenset({"magnitude_average"})
    engine, _, seen = _traced_run("momentum_magnitude", 12)
    beta, average = engine.config.momentum, torch.zeros(8, 6)
    for weight, _ in seen:  # the weights before each step (pruned ones are 0)
        average = beta * average + (1 - beta) * weight.abs()
    torch.testing.assert_close(engine.traces["magnitude_average"]["0.weight"], average, rtol=1e-5, atol=1e-7)
    # the registered criterion drops the active weights of the lowest average, not of the lowest current |w|
    t = engine.tensors["0.weight"]
    after = rules.drop(t.mask, engine.drop_scores()["0.weight"], 3)
    dropped = t.mask & ~after
    trace = engine.traces["magnitude_average"]["0.weight"]
    assert int(dropped.sum()) == 3 and float(trace[dropped].max()) <= float(trace[after].min())


def _dst_run(
    grow: str, steps: int
) -> tuple[DynamicSparsity, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """A tiny RigL-scheduled run growing by ``grow``; records (weight before the step, gradient, mask) of layer 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SparsityConfig.preset("rigl", sparsity=0.5, seed=0, update_interval=4, grow=grow, momentum=0.9)
    engine = DynamicSparsity(model, optimizer, config, total_steps=40)
    seen = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.arange(4) % 3).backward()
        seen.append(
            (
                model[0].weight.detach().clone(),
                model[0].weight.grad.detach().clone(),
                engine.masks["0.weight"].clone(),
            )
        )
        optimizer.step()
    return engine, seen


def test_fisher_growth_reads_the_squared_gradient_average_and_grows_its_largest_inactive_entries() -> None:
    assert scores.get("grow", "fisher").needs == frozenset({"grad_squared"})
    engine, seen = _dst_run("fisher", 11)
    average = torch.zeros(8, 6)
    for _, grad, _ in seen:
        average = 0.9 * average + 0.1 * grad * grad
    trace = engine.traces["grad_squared"]["0.weight"]
    torch.testing.assert_close(trace, average, rtol=1e-5, atol=1e-9)
    mask = engine.masks["0.weight"]
    after = rules.grow(mask, engine.grow_scores()["0.weight"], 3)
    grown = after & ~mask
    assert int(grown.sum()) == 3 and float(trace[grown].min()) >= float(trace[~after].max())


def test_last_magnitude_regrowth_brings_back_the_pruned_entries_of_largest_former_magnitude() -> None:
    assert scores.get("grow", "last_magnitude").needs == frozenset({"last_magnitude"})
    engine, seen = _dst_run("last_magnitude", 11)
    last = torch.zeros(8, 6)
    for weight, _, mask in seen:
        last = torch.where(mask, weight.abs(), last)
    trace = engine.traces["last_magnitude"]["0.weight"]
    torch.testing.assert_close(trace, last)
    mask = engine.masks["0.weight"]
    assert bool((trace[~mask] > 0).any())  # entries dropped at the updates remember their magnitude
    after = rules.grow(mask, engine.grow_scores()["0.weight"], 2)
    grown = after & ~mask
    assert float(trace[grown].min()) >= float(trace[~after].max())


def test_dormant_gradient_growth_ranks_connections_into_dormant_neurons_first() -> None:
    assert scores.get("grow", "dormant_gradient").needs == frozenset({"grad", "activations"})
    outputs = torch.tensor([[1.0, -2.0, 3.0], [2.0, -1.0, 1.0]])  # neuron 1 never fires after a ReLU
    assert criteria.dormant_outputs(outputs).tolist() == [False, True, False]
    grad = torch.tensor([[0.9, 0.8], [0.0, 0.0], [0.5, 0.4]])
    mask = torch.tensor([[True, False], [False, False], [False, False]])
    context = scores.ScoreContext(
        fqn="w",
        weight=torch.zeros(3, 2),
        mask=mask,
        step=1,
        generator=torch.Generator().manual_seed(0),
        grad=grad,
        activations=(torch.ones(2, 2), outputs),
    )
    got = scores.compute(scores.get("grow", "dormant_gradient"), context, tie_noise=0.0)
    torch.testing.assert_close(got, grad + 0.9 * torch.tensor([[0.0], [1.0], [0.0]]))
    grown = rules.grow(mask, got, 3) & ~mask
    assert grown[1].all() and int(grown.sum()) == 3  # both inputs of the dead neuron, then |g| (0.8)
    assert bool(grown[0, 1])
    with pytest.raises(RuntimeError, match="no activations were captured"):
        scores.get("grow", "dormant_gradient").function(
            scores.ScoreContext(
                fqn="w", weight=grad, mask=mask, step=1, generator=torch.Generator(), grad=grad
            )
        )


def test_dormant_gradient_growth_runs_in_the_engine() -> None:
    engine, _ = _dst_run("dormant_gradient", 9)
    assert len(engine.history) == 2 and engine.history[0]["tensors"]["0.weight"]["grown"] > 0
