"""Diagnostics: ReDo dormant neurons, mask turnover, recovery of returns after drift shifts (hand-computed)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from sparseapps.rl.diagnostics import (
    DormantNeurons,
    dormant_mask,
    find_dormant_neurons,
    mask_turnover,
    neuron_scores,
    shift_recovery,
)
from sparseapps.rl.drift import DriftSchedule, DriftWrapper

# ----------------------------------------------------------------------------------------------- dormant neurons


def test_neuron_scores_linear_by_hand() -> None:
    # mean |a| per neuron: [2, 0, 2]; layer mean 4/3 -> scores [1.5, 0, 1.5]
    scores = neuron_scores(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]]))
    torch.testing.assert_close(scores, torch.tensor([1.5, 0.0, 1.5]))


def test_neuron_scores_conv_average_over_space() -> None:
    # [B=1, C=2, H=1, W=2]: channel means [2, 1] -> layer mean 1.5 -> scores [4/3, 2/3]
    activations = torch.tensor([[[[1.0, -3.0]], [[0.5, 1.5]]]])
    torch.testing.assert_close(neuron_scores(activations), torch.tensor([4 / 3, 2 / 3]))


def test_dormant_mask_threshold_is_inclusive_and_zero_layer_is_dormant() -> None:
    # means [1, 39] -> scores [1/20, 39/20]: dormant at tau 0.05 (<=), not at 0.049
    activations = torch.tensor([[1.0, 39.0]])
    assert dormant_mask(activations, tau=0.05).tolist() == [True, False]
    assert dormant_mask(activations, tau=0.049).tolist() == [False, False]
    assert dormant_mask(torch.zeros(4, 3), tau=0.0).tolist() == [True, True, True]


def test_neuron_scores_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        neuron_scores(torch.ones(3))
    with pytest.raises(ValueError, match="at least one sample"):
        neuron_scores(torch.ones(0, 3))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        neuron_scores([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        dormant_mask(torch.ones(2, 2), tau=-0.1)


def _hand_set_mlp() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.01, 0.0]]))
        net[2].bias.zero_()
    return net


def test_find_dormant_neurons_by_hand() -> None:
    # x = [[1, 2], [3, 4]]
    # layer "1": ReLU([[1, 2, -3], [3, 4, -7]]) -> means [2, 3, 0], layer mean 5/3 -> scores [1.2, 1.8, 0]
    # layer "3": ReLU([[1, 0.02], [3, 0.04]]) -> means [2, 0.03], layer mean 1.015 -> scores [1.970, 0.02956]
    # the output Linear is not an activation and is not counted
    net = _hand_set_mlp()
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    report = find_dormant_neurons(net, inputs)
    assert isinstance(report, DormantNeurons)
    assert {k: v.tolist() for k, v in report.masks.items()} == {
        "1": [False, False, True],
        "3": [False, False],
    }
    assert report.per_layer == pytest.approx({"1": 1 / 3, "3": 0.0})
    assert (report.n_dormant, report.n_neurons, report.fraction) == (1, 5, pytest.approx(0.2))
    strict = find_dormant_neurons(net, inputs, tau=0.03)
    assert strict.per_layer == pytest.approx({"1": 1 / 3, "3": 0.5})
    assert strict.fraction == pytest.approx(0.4)
    linear = find_dormant_neurons(net, inputs, layer_types=(nn.Linear,))
    assert list(linear.masks) == ["0", "2", "4"]


def test_shared_activation_module_counts_once_per_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(3, 4), nn.Linear(4, 5), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc2(self.act(self.fc1(x))))

    report = find_dormant_neurons(Shared(), torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    assert {k: v.numel() for k, v in report.masks.items()} == {"act[0]": 4, "act[1]": 5}


def test_find_dormant_neurons_leaves_module_and_rng_untouched() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.drop = nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.act(self.fc(x) + torch.randn(x.shape[0], 4)))

    net = Noisy()
    net.train()
    net.drop.eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    find_dormant_neurons(net, torch.ones(5, 3))
    torch.testing.assert_close(torch.rand(3), expected)
    assert (net.training, net.fc.training, net.drop.training) == (True, True, False)
    assert all(not sub._forward_hooks for sub in net.modules())


def test_find_dormant_neurons_takes_several_inputs() -> None:
    class Critic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3 + 1, 6), nn.ReLU(), nn.Linear(6, 1))

        def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
            return self.net(torch.cat([observations, actions], dim=1))

    report = find_dormant_neurons(Critic(), (torch.randn(7, 3), torch.randn(7, 1)))
    assert list(report.masks) == ["net.1"] and report.n_neurons == 6


def test_find_dormant_neurons_rejects_bad_input() -> None:
    net = _hand_set_mlp()
    with pytest.raises(ValueError, match=r"no submodule of types \(ReLU\).*layer_types=\(nn.Linear,\)"):
        find_dormant_neurons(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2), layer_types=(nn.ReLU,))

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(2, 2), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    with pytest.raises(ValueError, match="no submodule of the requested types ran during Unused"):
        find_dormant_neurons(Unused(), torch.ones(1, 2))
    with pytest.raises(ValueError, match="tau must be"):
        find_dormant_neurons(net, torch.ones(2, 2), tau=math.nan)
    with pytest.raises(ValueError, match="B >= 1"):
        find_dormant_neurons(net, torch.ones(0, 2))
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        find_dormant_neurons(net, [[1.0, 2.0]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="layer_types"):
        find_dormant_neurons(net, torch.ones(2, 2), layer_types=())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        find_dormant_neurons(lambda x: x, torch.ones(2, 2))  # type: ignore[arg-type]


def test_find_dormant_neurons_on_sb3_policies() -> None:
    from stable_baselines3 import PPO, SAC

    ppo = PPO("MlpPolicy", "CartPole-v1", device="cpu", seed=0)
    observations = torch.as_tensor(np.stack([ppo.observation_space.sample() for _ in range(16)]))
    report = find_dormant_neurons(ppo.policy, observations)
    assert sorted(report.masks) == [
        "mlp_extractor.policy_net.1",
        "mlp_extractor.policy_net.3",
        "mlp_extractor.value_net.1",
        "mlp_extractor.value_net.3",
    ]
    assert report.n_neurons == 4 * 64
    sac = SAC("MlpPolicy", "Pendulum-v1", device="cpu", seed=0, buffer_size=1)
    observations = torch.as_tensor(np.stack([sac.observation_space.sample() for _ in range(16)]))
    actions = torch.as_tensor(np.stack([sac.action_space.sample() for _ in range(16)]))
    critic = find_dormant_neurons(sac.critic, (observations, actions))
    assert critic.n_neurons == 2 * 2 * 256  # two Q networks, two hidden ReLU layers of 256
    assert 0.0 <= critic.fraction <= 1.0


# ----------------------------------------------------------------------------------------------- mask turnover


def test_mask_turnover_by_hand() -> None:
    before = {
        "a": torch.tensor([True, True, False, False]),
        "b": torch.tensor([[True, False], [False, False]]),
    }
    after = {
        "a": torch.tensor([True, False, True, False]),
        "b": torch.tensor([[True, False], [False, False]]),
    }
    turnover = mask_turnover(before, after)
    assert turnover.per_tensor == {"a": 0.5, "b": 0.0}  # a: 1 dropped + 1 grown over 2 + 2 active
    assert (turnover.n_dropped, turnover.n_grown, turnover.n_active_before, turnover.n_active_after) == (
        1,
        1,
        3,
        3,
    )
    assert turnover.total == pytest.approx(1 / 3)


def test_mask_turnover_when_nnz_changes_and_when_empty() -> None:
    shrink = mask_turnover(
        {"w": torch.tensor([True, True, True, False])}, {"w": torch.tensor([True, False, False, False])}
    )
    assert shrink.total == 0.5  # 2 dropped over 3 + 1 active
    empty = mask_turnover({"w": torch.zeros(3, dtype=torch.bool)}, {"w": torch.zeros(3, dtype=torch.bool)})
    assert (empty.total, empty.per_tensor) == (0.0, {"w": 0.0})
    disjoint = mask_turnover({"w": torch.tensor([True, False])}, {"w": torch.tensor([False, True])})
    assert disjoint.total == 1.0


def test_mask_turnover_rejects_bad_input() -> None:
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"missing after \['b'\], new after \['c'\]"):
        mask_turnover({"a": mask, "b": mask}, {"a": mask, "c": mask})
    with pytest.raises(ValueError, match="'a' changed shape"):
        mask_turnover({"a": mask}, {"a": torch.tensor([True, False, True])})
    with pytest.raises(TypeError, match=r"after\['a'\] must be a torch.bool tensor, got torch.float32"):
        mask_turnover({"a": mask}, {"a": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match="at least one mask"):
        mask_turnover({}, {})
    with pytest.raises(TypeError, match="mapping"):
        mask_turnover([mask], [mask])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- shift recovery

RETURNS = [10, 20, 100, 100, 20, 60, 100, 100, 50, 50]
STEPS = [10, 30, 130, 230, 250, 310, 410, 510, 600, 700]
PHASES = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_shift_recovery_by_hand() -> None:
    first, second = shift_recovery(RETURNS, STEPS, PHASES, window=2, fraction=0.9)
    # 0 -> 1: level = mean(100, 100) = 100, target 90; moving averages 20, 40, 80, 100 -> recovered at step 510
    assert (first.phase_before, first.phase_after, first.shift_step) == (0, 1, 230)
    assert (first.mean_before, first.mean_after, first.level_before) == (57.5, 70.0, 100.0)
    assert first.target == pytest.approx(90.0)
    assert (first.recovery_step, first.steps_to_recover) == (510, 280)
    assert (first.n_episodes_before, first.n_episodes_after) == (4, 4)
    # 1 -> 2: level 100, target 90; moving averages 50, 50 -> never within phase 2
    assert (second.phase_before, second.phase_after, second.shift_step) == (1, 2, 510)
    assert (second.mean_before, second.mean_after) == (70.0, 50.0)
    assert (second.recovery_step, second.steps_to_recover) == (None, None)


def test_shift_recovery_partial_window_and_override() -> None:
    # window 10 but only one post-shift episode so far: its return 95 >= 90 counts at once
    (result,) = shift_recovery([100, 100, 95], [100, 200, 260], [0, 0, 1], window=10, fraction=0.9)
    assert (result.recovery_step, result.steps_to_recover) == (260, 60)
    (result,) = shift_recovery(
        RETURNS[:8], STEPS[:8], PHASES[:8], window=2, fraction=0.9, shift_steps={1: 200}
    )
    assert (result.shift_step, result.steps_to_recover) == (200, 310)


def test_shift_recovery_negative_returns_and_baseline() -> None:
    returns = [-1000, -200, -150, -150, -900, -300, -160, -168]
    steps = [200, 400, 600, 800, 1000, 1200, 1400, 1600]
    phases = [0, 0, 0, 0, 1, 1, 1, 1]
    # level -150; baseline 0: target -150 - 0.1 * 150 = -165; moving averages -900, -600, -230, -164 -> step 1600
    (plain,) = shift_recovery(returns, steps, phases, window=2, fraction=0.9)
    assert plain.target == pytest.approx(-165.0)
    assert plain.recovery_step == 1600
    # baseline -1000 (a random policy): target -150 - 0.1 * 850 = -235 -> -230 suffices at step 1400
    (gap,) = shift_recovery(returns, steps, phases, window=2, fraction=0.9, baseline=-1000)
    assert gap.target == pytest.approx(-235.0)
    assert (gap.recovery_step, gap.steps_to_recover) == (1400, 600)


def test_shift_recovery_edge_cases() -> None:
    assert shift_recovery([], [], []) == []
    assert shift_recovery([1.0, 2.0], [5, 9], [0, 0]) == []
    (skipped,) = shift_recovery([1.0, 2.0], [5, 9], [0, 2])
    assert (skipped.phase_before, skipped.phase_after, skipped.shift_step) == (0, 2, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(returns=[1.0], steps=[1, 2], phases=[0, 0]), "lengths 1, 2, 2"),
        (dict(phases=[0, 1, 0]), r"phases must be non-decreasing, got 0 at phases\[2\] after 1"),
        (dict(steps=[5, 3, 9]), r"steps must be non-decreasing, got 3 at steps\[1\]"),
        (dict(steps=[-1, 3, 9]), r"steps\[0\] must be an integer >= 0"),
        (dict(returns=[1.0, math.nan, 2.0]), r"returns\[1\] must be a finite number"),
        (dict(window=0), "window must be an integer >= 1, got 0"),
        (dict(fraction=0.0), r"fraction must be a finite number in \(0, 1\], got 0.0"),
        (dict(fraction=1.5), r"fraction must be a finite number in \(0, 1\], got 1.5"),
        (dict(baseline=math.inf), "baseline must be a finite number"),
        (dict(shift_steps={2: 3}), "shift_steps has no entry for phase 1"),
        (dict(shift_steps={1: 10}), r"shift_steps\[1\] = 10 is after the end of that phase's first episode"),
    ],
)
def test_shift_recovery_rejects_bad_input(kwargs: dict, message: str) -> None:
    arguments = dict(returns=[1.0, 2.0, 3.0], steps=[2, 5, 9], phases=[0, 1, 1])
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        shift_recovery(**arguments)


def test_shift_recovery_reads_the_drift_wrapper_info() -> None:
    # Random CartPole episodes through a drifting env: the info contract feeds shift_recovery directly.
    env = DriftWrapper(gym.make("CartPole-v1"), "length", DriftSchedule(shifts=[(60, 2.0)]))
    env.action_space.seed(0)
    env.reset(seed=0)
    returns, steps, phases, total = [], [], [], 0.0
    while len(returns) < 12:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += float(reward)
        if terminated or truncated:
            returns.append(total)
            steps.append(info["drift_env_step"])
            phases.append(info["drift_phase"])
            total = 0.0
            env.reset()
    (result,) = shift_recovery(returns, steps, phases, window=3)
    assert (result.phase_before, result.phase_after) == (0, 1)
    assert result.shift_step >= 60  # shifts wait for the episode that was running at step 60 to end
    assert result.n_episodes_before + result.n_episodes_after == 12
    assert result.n_episodes_before == sum(1 for step in steps if step <= result.shift_step)
