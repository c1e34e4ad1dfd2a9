"""ReDo and continual backprop on hand-built networks, the plasticity metrics, the permutation drift, the suite's
comparisons and one tiny cell end to end, and scripts/bench_plasticity.py --quick."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import CallbackList
from torch import nn

from sparseapps.core import SparsityConfig
from sparseapps.rl.callback import DynamicSparsityCallback
from sparseapps.rl.cells import cells_on_disk
from sparseapps.rl.diagnostics import dormant_mask
from sparseapps.rl.drift import INFO_PHASE, DriftSchedule
from sparseapps.rl.plasticity import (
    ContinualBackpropCallback,
    PermutedObservations,
    ReDoCallback,
    UnitUtility,
    effective_rank,
    phase_metrics,
    recycle_neurons,
    select_replacements,
    trace_hidden_layers,
    update_utility,
)
from sparseapps.rl.plasticity_suite import (
    METHODS,
    QUICK_ENVS,
    Comparison,
    compare,
    holm_adjust,
    registered_comparisons,
    run_cell,
)
from tests.scripts import assert_runs_resumes_and_summarizes, script_module


# ---------------------------------------------------------------------------------------------- ReDo
def _tiny_network() -> tuple[nn.Sequential, torch.optim.Adam, torch.Tensor]:
    """2 -> 3 (ReLU) -> 2 where hidden neuron 1 is tau-dormant on positive inputs (active, but ~0.2% of the layer's
    mean activation, so it has nonzero gradients and Adam moments), Adam state after one step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.5], [0.001, 0.002], [0.5, 2.0]]))
        net[0].bias.copy_(torch.tensor([0.1, 0.0, 0.2]))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)  # small: neuron 1 stays active
    inputs = torch.rand(8, 2) + 0.1
    net(inputs).pow(2).sum().backward()
    optimizer.step()
    return net, optimizer, inputs


def test_redo_recycles_exactly_the_dormant_neurons() -> None:
    net, optimizer, inputs = _tiny_network()
    [(layer, activations)] = trace_hidden_layers(net, inputs)
    assert layer.incoming is net[0] and layer.outgoing == (net[2],) and layer.name == "1"
    dormant = dormant_mask(activations, 0.025)
    assert dormant.tolist() == [False, True, False] and bool(activations[:, 1].gt(0).all())
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    states = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in net.named_parameters()
    }
    assert recycle_neurons(layer, dormant, optimizer, torch.Generator().manual_seed(3)) == 1

    bound = math.sqrt(6.0 / (2 + 3))  # Xavier-uniform of a [3, 2] weight
    expected = torch.empty(3, 2, dtype=torch.float64).uniform_(
        -bound, bound, generator=torch.Generator().manual_seed(3)
    )
    weight_in, bias_in, weight_out = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach()
    assert torch.equal(weight_in[1], expected[1].float())  # incoming: fresh
    assert torch.equal(weight_in[[0, 2]], before["0.weight"][[0, 2]])  # others untouched
    assert bias_in.tolist() == pytest.approx([before["0.bias"][0].item(), 0.0, before["0.bias"][2].item()])
    assert torch.equal(weight_out[:, 1], torch.zeros(2))  # outgoing: zero
    assert torch.equal(weight_out[:, [0, 2]], before["2.weight"][:, [0, 2]])
    assert torch.equal(net[2].bias.detach(), before["2.bias"])
    for moment in ("exp_avg", "exp_avg_sq"):
        incoming, outgoing = optimizer.state[net[0].weight][moment], optimizer.state[net[2].weight][moment]
        assert torch.equal(incoming[1], torch.zeros(2)) and torch.equal(outgoing[:, 1], torch.zeros(2))
        assert torch.equal(incoming[[0, 2]], states["0.weight"][moment][[0, 2]])
        assert torch.equal(outgoing[:, [0, 2]], states["2.weight"][moment][:, [0, 2]])
        assert optimizer.state[net[0].bias][moment][1] == 0
        # A reset that means something: the recycled entries' moments were nonzero before.
        assert bool(states["0.weight"][moment][1].ne(0).all()) and bool(
            states["2.weight"][moment][:, 1].ne(0).all()
        )
        assert bool(states["0.bias"][moment][1].ne(0))
    # Adam's step count is the tensor's, untouched (as ReDo's optax state keeps its count).
    assert torch.equal(optimizer.state[net[0].weight]["step"], states["0.weight"]["step"])


def test_recycling_moves_the_mean_contribution_into_the_next_bias() -> None:
    net, optimizer, _ = _tiny_network()
    layer = trace_hidden_layers(net, torch.ones(1, 2))[0][0]
    out_before, bias_before = net[2].weight.detach().clone(), net[2].bias.detach().clone()
    shift = torch.tensor([0.0, 0.0, 2.0])
    recycle_neurons(
        layer, torch.tensor([False, False, True]), optimizer, torch.Generator(), outgoing_bias_shift=shift
    )
    assert torch.allclose(net[2].bias.detach(), bias_before + 2.0 * out_before[:, 2])
    with pytest.raises(ValueError, match=r"\[3\] bool"):
        recycle_neurons(layer, torch.tensor([1, 0, 0]), optimizer, torch.Generator())


def _tiny_dqn() -> DQN:
    return DQN(
        "MlpPolicy",
        "CartPole-v1",
        learning_starts=32,
        train_freq=4,
        gradient_steps=1,
        batch_size=16,
        policy_kwargs={"net_arch": [8, 8]},
        seed=0,
        device="cpu",
    )


def test_redo_callback_recycles_a_killed_neuron_of_an_sb3_agent() -> None:
    model = _tiny_dqn()
    first = model.q_net.q_net[0]
    with torch.no_grad():
        first.weight[3] = 0.0
        first.bias[3] = -10.0  # dead on every input
    redo = ReDoCallback(interval=5, seed=0)
    model.learn(64, callback=redo)
    # 8 gradient steps (rollouts end at 36, 40, ..., 64): one round, at the first rollout end after step 5.
    assert [(entry["network"], entry["step"]) for entry in redo.history] == [("q_net", 5)]
    assert redo.history[0]["recycled"]["q_net.1"] >= 1
    assert float(first.bias.detach()[3]) > -1.0 and bool(first.weight.detach()[3].ne(0).any())


def test_recyclers_refuse_sparse_networks() -> None:
    for recycler in (ReDoCallback(interval=5), ContinualBackpropCallback()):
        model = _tiny_dqn()
        sparsity = DynamicSparsityCallback(SparsityConfig.preset("static", sparsity=0.5))
        with pytest.raises(ValueError, match="expected a dense network"):
            model.learn(40, callback=CallbackList([sparsity, recycler]))


# ---------------------------------------------------------------------------------------------- continual backprop
def test_cbp_utility_and_replacements_by_hand() -> None:
    state = UnitUtility.zeros(3)
    activations = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 4.0]])  # mean |h| = 2, 2, 2; mean h = 2, 0, 2
    outgoing = [torch.tensor([[1.0, 0.5, -0.25]]), torch.tensor([[-1.0, 0.0, 0.25]])]  # sum |w| = 2, 0.5, 0.5
    update_utility(state, activations, outgoing, 0.9)
    assert state.utility.tolist() == pytest.approx([0.4, 0.1, 0.1])
    assert state.mean_activation.tolist() == pytest.approx([0.2, 0.0, 0.2])
    assert state.age.tolist() == [1, 1, 1]
    update_utility(state, activations, outgoing, 0.9)
    assert state.utility.tolist() == pytest.approx([0.76, 0.19, 0.19])
    # Bias-corrected: u / (1 - 0.9^2) = 4, 1, 1. Maturity 1: all three eligible; rate 0.5 -> 1.5 replacements.
    chosen = select_replacements(state, 0.5, 1, 0.9)
    assert chosen.tolist() == [False, True, False] and state.pending == pytest.approx(0.5)  # tie: lower index
    state.age[1] = 0
    chosen = select_replacements(state, 0.5, 1, 0.9)  # 2 eligible -> 0.5 + 1.0 = 1.5: one more, unit 2
    assert chosen.tolist() == [False, False, True] and state.pending == pytest.approx(0.5)
    state.age[:] = 0
    assert not select_replacements(state, 0.5, 1, 0.9).any() and state.pending == pytest.approx(0.5)


def test_cbp_callback_replaces_the_count_its_rate_gives() -> None:
    model = _tiny_dqn()
    # Width 8, rate 1/8, maturity 0: every unit is eligible after each step's update, so one replacement per
    # hidden layer per gradient step; 8 gradient steps, 2 hidden layers.
    cbp = ContinualBackpropCallback(replacement_rate=1 / 8, maturity_threshold=0, seed=0)
    model.learn(64, callback=cbp)
    assert cbp.n_replaced == {"q_net": 16}
    assert [layer.name for layer in cbp.layers["q_net"]] == ["q_net.1", "q_net.3"]
    ages = [state.age for state in cbp.states["q_net"].values()]
    assert all(int(age.max()) <= 8 and int((age == 0).sum()) == 1 for age in ages)


# ---------------------------------------------------------------------------------------------- metrics
def test_effective_rank_of_hand_made_matrices() -> None:
    assert effective_rank(torch.eye(5)) == 5
    assert effective_rank(torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5]))) == 1
    assert effective_rank(torch.zeros(4, 3)) == 0
    assert effective_rank(torch.diag(torch.tensor([1.0, 0.005]))) == 1  # 1 / 1.005 >= 0.99
    assert effective_rank(torch.diag(torch.tensor([1.0, 0.02]))) == 2  # 1 / 1.02 < 0.99
    assert effective_rank(torch.diag(torch.tensor([1.0, 0.02])), delta=0.05) == 1
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        effective_rank(torch.ones(3))


def test_phase_metrics_of_a_hand_made_return_log() -> None:
    # Shifts at 100 and 200, run of 300 steps; episodes end at these steps with these returns.
    steps = [40, 100, 130, 160, 200, 250, 300]
    returns = [10.0, 30.0, 5.0, 28.0, 30.0, 2.0, 4.0]
    phases = [0, 0, 1, 1, 1, 2, 2]
    metrics = phase_metrics(returns, steps, phases, [100, 200], 300, window=2, fraction=0.9)
    assert [m.n_episodes for m in metrics] == [2, 3, 2]
    assert [m.final_return for m in metrics] == [20.0, 29.0, 3.0]  # last 2 episodes of each phase
    # AUC: returns weighted by episode lengths (40, 60 | 30, 30, 40 | 50, 50).
    assert metrics[0].auc == pytest.approx((10 * 40 + 30 * 60) / 100)
    assert metrics[1].auc == pytest.approx((5 * 30 + 28 * 30 + 30 * 40) / 100)
    assert metrics[2].auc == pytest.approx(3.0)
    # Phase 1: level 20 (window 2), target 18; moving averages 5, 16.5, 29 -> recovered at step 200.
    assert (metrics[1].steps_to_recover, metrics[1].recovered) == (100, True)
    # Phase 2: level 29, target 26.1; averages 2, 3 never reach it.
    assert (metrics[2].steps_to_recover, metrics[2].recovered) == (None, False)
    assert (metrics[0].steps_to_recover, metrics[0].recovered) == (None, None)
    empty = phase_metrics([1.0, 2.0], [50, 300], [0, 2], [100, 200], 300)
    assert (empty[1].n_episodes, empty[1].final_return, empty[1].auc) == (0, None, None)
    with pytest.raises(ValueError, match="shift_steps must increase"):
        phase_metrics([], [], [], [200, 100], 300)


def test_permuted_observations_change_at_each_shift_and_are_seeded() -> None:
    schedule = DriftSchedule(shifts=[(5, 1.0), (10, 1.0)])
    env = PermutedObservations(gym.make("CartPole-v1"), schedule, seed=4)
    observation, info = env.reset(seed=0)
    assert info[INFO_PHASE] == 0 and np.allclose(observation, env.unwrapped.state)
    assert np.all(env.observation_space.low == -np.inf) and env.observation_space.shape == (4,)
    seen = []
    for _ in range(3):
        for _ in range(5):
            observation, _, terminated, truncated, info = env.step(0)
            if terminated or truncated:
                break
        observation, info = env.reset()
        seen.append(info[INFO_PHASE])
        permutation = env.permutation(info[INFO_PHASE])
        assert np.allclose(observation, np.asarray(env.unwrapped.state)[permutation])
    assert seen == [1, 2, 2]
    assert sorted(env.permutation(1).tolist()) == [0, 1, 2, 3]
    assert not np.array_equal(env.permutation(1), env.permutation(0))
    assert not np.array_equal(env.permutation(2), env.permutation(1))
    again = PermutedObservations(gym.make("CartPole-v1"), schedule, seed=4)
    other = PermutedObservations(gym.make("CartPole-v1"), schedule, seed=5)
    assert all(np.array_equal(again.permutation(k), env.permutation(k)) for k in range(3))
    assert any(not np.array_equal(other.permutation(k), env.permutation(k)) for k in range(1, 3))
    with pytest.raises(ValueError, match="1-D Box"):
        PermutedObservations(gym.make("FrozenLake-v1"), schedule, seed=0)


# ---------------------------------------------------------------------------------------------- comparisons
def test_holm_by_hand() -> None:
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> raised to 0.06.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"p_values\[1\]"):
        holm_adjust([0.1, 1.5])


def test_comparisons_pair_seeds_and_favour_lower_dormant_fractions() -> None:
    def cell(method: str, seed: int, final: float, dormant: float) -> dict:
        return {
            "env": "e",
            "method": method,
            "seed": seed,
            "summary": {"mean_final_return": final, "mean_dormant_fraction": dormant},
        }

    results = [
        *(cell("static", s, 10.0 * s, 0.3) for s in (1, 2, 3)),
        *(cell("rigl", s, 10.0 * s + d, 0.2 + 0.01 * s) for s, d in ((1, 1.0), (2, 2.0), (3, 3.0))),
        cell("rigl-dormant", 1, 0.0, 0.1),
        cell("rigl-dormant", 2, 0.0, 0.1),
    ]
    family = [
        Comparison("e", "rigl", "static", "mean_final_return"),
        Comparison("e", "rigl-dormant", "rigl", "mean_dormant_fraction", False),
        Comparison("e", "set", "static", "mean_final_return"),
    ]
    rigl, dormant, missing = compare(results, family)
    assert rigl["seeds"] == [1, 2, 3] and rigl["differences"] == pytest.approx([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert rigl["ci95"] == pytest.approx((2.0 - half, 2.0 + half), abs=1e-5)
    assert dormant["seeds"] == [1, 2] and dormant["differences"] == pytest.approx(
        [0.11, 0.12]
    )  # rigl - dormant
    # Paired t: rigl t = 2 / (1 / sqrt 3) on 2 df, p = 0.0742; dormant t = 0.115 / (0.00707 / sqrt 2) = 23 on 1 df,
    # p = 0.0277. Holm over the two: 2 x 0.0277 = 0.0553 first, then max(0.0553, 0.0742).
    assert rigl["p"] == pytest.approx(0.07418, abs=1e-4) and dormant["p"] == pytest.approx(0.02767, abs=1e-4)
    assert dormant["p_holm"] == pytest.approx(2 * dormant["p"]) and rigl["p_holm"] == pytest.approx(rigl["p"])
    assert rigl["verdict"] == dormant["verdict"] == "no difference shown"
    assert missing["verdict"] == "too few seeds" and missing["p_holm"] is None
    assert len(registered_comparisons(["a", "b"])) == 18


# ---------------------------------------------------------------------------------------------- end to end
def test_one_tiny_cell_produces_the_metrics() -> None:
    env = QUICK_ENVS["cartpole-permuted"]
    threads = torch.get_num_threads()
    result = run_cell(env, METHODS["dense-redo"], 0, threads=threads + 1)
    assert torch.get_num_threads() == threads  # the cell's thread count is restored after it
    json.dumps(result)
    assert result["total_steps"] == env.total_steps == 9 * 128
    assert [row["phase"] for row in result["phases"]] == list(range(9))
    snapshot = result["phases"][-1]["snapshot"]["policy"]
    assert set(snapshot["width"]) == {"mlp_extractor.policy_net.1", "mlp_extractor.policy_net.3",
                                      "mlp_extractor.value_net.1", "mlp_extractor.value_net.3"}  # fmt: skip
    assert all(0 < rank <= 64 for rank in snapshot["effective_rank"].values())
    assert 0.0 <= snapshot["dormant_fraction"] <= 1.0 and snapshot["weight_norm"] > 0
    summary = result["summary"]
    assert summary["mean_final_return"] is not None and summary["mean_dormant_fraction"] is not None
    assert result["recycled"] >= 0 and {e[2] for e in result["episodes"]} == set(range(9))


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_plasticity") as module:
        yield module


def test_quick_script_runs_resumes_and_summarizes(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--envs",
        "cartpole-length",
        "--methods",
        "static",
        "rigl-dormant",
    ]
    files = [f"cartpole-length/{m}/seed{s}.json" for m in ("rigl-dormant", "static") for s in (0, 1)]
    comparison = "cartpole-length: rigl-dormant vs static (mean_final_return)"
    assert_runs_resumes_and_summarizes(bench, argv, tmp_path, files, comparison, monkeypatch)
    diagnostics = bench.summarize(cells_on_disk(tmp_path))["diagnostics"]["cartpole-length"]
    assert set(diagnostics) == {"static", "rigl-dormant"} and diagnostics["static"]["seeds"] == 2
    assert diagnostics["static"]["topology_updates"] == 0 < diagnostics["rigl-dormant"]["topology_updates"]
    assert all(0 < diagnostics[m][f"srank_{w}"] <= 1 for m in diagnostics for w in ("first", "last"))
    assert "dormant first → last" in (tmp_path / "summary.md").read_text()
    args = bench.parse_args(["--cells", "pendulum-*/dense*/10?", "cartpole-length/rigl/100"])
    assert bench.planned_cells(args) == [  # seed by seed, environments and methods in the suite's order
        ("cartpole-length", "rigl", 100),
        *[("pendulum-mass", m, s) for s in range(100, 110) for m in ("dense", "dense-redo", "dense-cbp")],
    ]
    with pytest.raises(ValueError, match="no cell matches"):
        bench.planned_cells(bench.parse_args(["--cells", "nothing/*/*"]))
