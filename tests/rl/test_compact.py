"""SB3 agents on compact layers: the masked-dense run's masks and weights, every algorithm, targets, save / load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import polyak_update
from torch import nn

from sparseapps.core import SparsityConfig
from sparseapps.core.compact import CompactLinear
from sparseapps.core.kernels import CondenseConfig
from sparseapps.rl.callback import DynamicSparsityCallback, count_optimizer_steps
from sparseapps.rl.compact import make_compact, swap_parameter
from sparseapps.rl.policies import condense_policy
from tests.rl.test_callback import ALGORITHMS, assert_compact_invariants, make_model

MLP = {"net_arch": [64, 64]}
# algorithm -> (SB3 kwargs over tests.rl.test_callback's, env steps) of the compact vs masked-dense comparison.
# PPO runs without gradient clipping: on the update steps of gradient growth the masked storage leaves gradients
# dense for the engine, so SB3's clip_grad_norm_ measures the dense gradient there and the compact storage the
# sparse one (measured with SB3's max_grad_norm=0.5: the same masks at all 7 updates, weights 4e-6 to 5e-4 apart,
# relative, after 32 gradient steps).
# The third entry: the RigL update interval in gradient steps.
EQUIVALENCE: dict[str, tuple[dict[str, Any], int, int]] = {
    "sac": ({"learning_starts": 50, "policy_kwargs": MLP}, 300, 10),
    "td3": ({"learning_starts": 50, "policy_kwargs": MLP}, 300, 10),
    "ppo": ({"max_grad_norm": 1e9, "policy_kwargs": MLP}, 512, 3),
}
RELATIVE_TOLERANCE = 1e-5


def rigl(storage: str, **overrides: Any) -> SparsityConfig:
    values = {"sparsity": 0.9, "update_interval": 10, "seed": 0, "storage": storage, **overrides}
    return SparsityConfig.preset("rigl", **values)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


class RecordUpdates(BaseCallback):
    """Records ``(network, step, new masks)`` of every topology update of the sparsity callback's engines."""

    def __init__(self, sparsity: DynamicSparsityCallback) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.updates: list[tuple[str, int, dict[str, torch.Tensor]]] = []

    def _on_step(self) -> bool:
        return True

    def _on_training_start(self) -> None:
        for name, engine in self.sparsity.engines.items():

            def record(new: Any, name: str = name, engine: Any = engine) -> None:
                self.updates.append((name, engine.step, {fqn: m.clone() for fqn, m in new.items()}))

            engine.commit_hooks.append(record)


def dense_weights(model: BaseAlgorithm) -> dict[str, torch.Tensor]:
    """Every Linear weight of the policy (online and target networks) as a dense ``[out, in]`` tensor."""
    weights = {}
    for name, module in model.policy.named_modules():
        if isinstance(module, CompactLinear):
            weights[name] = module.to_dense_weight()
        elif isinstance(module, nn.Linear):
            weights[name] = module.weight.detach().clone()
    return weights


def train(name: str, storage: str) -> tuple[BaseAlgorithm, DynamicSparsityCallback, RecordUpdates]:
    overrides, steps, interval = EQUIVALENCE[name]
    model, _ = make_model(name, **overrides)
    callback = DynamicSparsityCallback(rigl(storage, update_interval=interval))
    recorder = RecordUpdates(callback)
    model.learn(steps, callback=[callback, recorder])
    return model, callback, recorder


@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_compact_training_equals_masked_dense(name: str) -> None:
    """Same seed: the same masks at every topology update of every network, and every weight (targets included)
    within 1e-5 relative of the masked-dense run (measured: SAC 3e-8 to 7e-8 and TD3 3e-8 to 3e-7 after 250
    gradient steps and 18 updates per network, PPO 7e-9 to 7e-8 after 32 steps and 7 updates)."""
    masked, masked_callback, masked_updates = train(name, "masked")
    compact, compact_callback, compact_updates = train(name, "compact")
    assert len(compact_updates.updates) == len(masked_updates.updates) >= 7 * len(compact_callback.engines)
    for (network, step, expected), (got_network, got_step, got) in zip(
        masked_updates.updates, compact_updates.updates, strict=True
    ):
        assert (got_network, got_step) == (network, step)
        assert expected.keys() == got.keys()
        for fqn, mask in expected.items():
            assert torch.equal(got[fqn], mask), (network, step, fqn)
    expected_weights, got_weights = dense_weights(masked), dense_weights(compact)
    assert expected_weights.keys() == got_weights.keys()
    assert any(isinstance(m, CompactLinear) for m in compact.policy.modules())
    for layer, weight in expected_weights.items():
        got = got_weights[layer]
        assert torch.equal(got != 0, weight != 0), layer
        relative = float((got - weight).norm() / weight.norm())
        assert relative <= RELATIVE_TOLERANCE, (layer, relative)
    for network, engine in compact_callback.engines.items():
        assert engine.step == masked_callback.engines[network].step


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_trains_on_compact_layers(name: str) -> None:
    model, steps = make_model(name)
    expected = count_optimizer_steps(model, steps)
    callback = DynamicSparsityCallback(
        SparsityConfig.preset("rigl", sparsity=0.8, update_interval=5, seed=0, storage="compact")
    )
    model.learn(steps, callback=callback)
    assert {n: e.step for n, e in callback.engines.items()} == expected
    assert all(engine.history for engine in callback.engines.values())
    assert_compact_invariants(callback)
    assert 0 < callback.training_flops()["ratio"] < 1
    for network in callback.networks.values():
        if network.target is not None:  # Polyak updates pair values of the same topology
            polyak_update(network.network.parameters(), network.target.parameters(), 0.5)
    assert_compact_invariants(callback)


def test_the_actor_loss_through_the_critic_is_not_in_the_critics_growth_gradient() -> None:
    """SAC's actor loss backpropagates through the critic after the critic's step: the dense gradient a compact
    critic layer captures for growth holds the critic's loss only, as the masked weight's ``.grad`` does."""
    model, _ = make_model("sac", learning_starts=50, policy_kwargs=MLP)
    callback = DynamicSparsityCallback(rigl("compact"))
    callback.init_callback(model)
    callback.attach(model, 1_000)
    layer = model.critic.qf0[0]
    layer.capture_dense_grad = True
    model.critic(torch.randn(4, 3), torch.randn(4, 1))[0].sum().backward()
    assert layer.dense_grad is not None
    model.actor.optimizer.step()  # the actor's step ends what its loss put into the critic
    assert layer.dense_grad is None
    callback.detach()
    layer.capture_dense_grad = False


def test_swap_parameter_moves_optimizer_state_to_the_active_entries() -> None:
    weight, other = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([other, weight], lr=0.1)
    optimizer.state[weight] = {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3)}
    mask = torch.tensor([[True, False, True], [False, True, False]])
    values = nn.Parameter(torch.zeros(3))
    swap_parameter([optimizer], weight, values, mask)
    assert optimizer.param_groups[0]["params"][1] is values
    assert weight not in optimizer.state
    assert torch.equal(optimizer.state[values]["exp_avg"], torch.tensor([0.0, 2.0, 4.0]))
    assert float(optimizer.state[values]["step"]) == 3.0


def test_make_compact_starts_from_given_masks_and_keeps_a_masked_models_optimizer_state() -> None:
    model, _ = make_model("ppo", policy_kwargs={"net_arch": [8]})
    policy = model.policy
    linear = policy.mlp_extractor.policy_net[0]
    policy.optimizer.state[linear.weight] = {"exp_avg": torch.arange(32.0).view(8, 4)}
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[0, 1] = mask[3, 2] = mask[7, 0] = True
    layers = make_compact(
        policy, policy.optimizer, rigl("compact"), {"mlp_extractor.policy_net.0.weight": mask}
    )
    layer = layers["mlp_extractor.policy_net.0.weight"]
    assert policy.mlp_extractor.policy_net[0] is layer and torch.equal(layer.mask(), mask)
    assert torch.equal(layer.values.detach(), linear.weight.detach()[mask])
    assert torch.equal(policy.optimizer.state[layer.values]["exp_avg"], torch.tensor([1.0, 14.0, 28.0]))
    with pytest.raises(ValueError, match="storage='compact'"):
        make_compact(policy, policy.optimizer, rigl("masked"))


@pytest.mark.parametrize("name", ["ppo", "sac", "dqn"])
def test_compact_models_save_load_and_continue(name: str, tmp_path: Path) -> None:
    """``Algorithm.load`` rebuilds the compact layers inside the optimizers before their states load: the same
    tensors, the same actions, and a later ``learn`` with the callback continues from the saved topology."""
    model, steps = make_model(name)
    config = SparsityConfig.preset("rigl", sparsity=0.8, update_interval=5, seed=0, storage="compact")
    callback = DynamicSparsityCallback(config)
    model.learn(steps, callback=callback)
    model.save(tmp_path / "model.zip")
    loaded = type(model).load(tmp_path / "model.zip", device="cpu")
    saved_state, loaded_state = model.policy.state_dict(), loaded.policy.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert any(key.endswith(".values") for key in loaded_state)
    for key, value in saved_state.items():
        assert torch.equal(value, loaded_state[key]), key
    for network in callback.networks:
        optimizer = "policy.optimizer" if name in ("ppo", "dqn") else f"{network}.optimizer"
        saved_optimizer = model.get_parameters()[optimizer]
        loaded_optimizer = loaded.get_parameters()[optimizer]
        for index, state in saved_optimizer["state"].items():
            for key, value in state.items():
                assert torch.equal(loaded_optimizer["state"][index][key], value), (optimizer, index, key)
    observations = np.stack([model.observation_space.sample() for _ in range(5)])
    np.testing.assert_allclose(
        loaded.predict(observations, deterministic=True)[0],
        model.predict(observations, deterministic=True)[0],
    )
    loaded.set_env(model.get_env())
    again = DynamicSparsityCallback(config)
    again.init_callback(loaded)
    again.attach(loaded, loaded.num_timesteps + steps)
    for network, engine in again.engines.items():
        for fqn, record in engine.tensors.items():
            assert torch.equal(record.mask, callback.engines[network].tensors[fqn].mask), fqn
    assert_compact_invariants(again)
    again.detach()


def test_policy_save_and_load_keep_compact_layers(tmp_path: Path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0, policy_kwargs=MLP)
    model.learn(64, callback=DynamicSparsityCallback(rigl("compact", update_interval=2)))
    model.policy.save(tmp_path / "policy.pt")
    policy = model.policy_class.load(tmp_path / "policy.pt", device="cpu")
    layer, expected = policy.mlp_extractor.policy_net[0], model.policy.mlp_extractor.policy_net[0]
    assert isinstance(layer, CompactLinear) and torch.equal(layer.mask(), expected.mask())
    assert torch.equal(layer.values, expected.values)
    assert any(p is layer.values for group in policy.optimizer.param_groups for p in group["params"])
    # condense_policy rebuilds the policy from its state dict (compact layers adopted), then condenses it
    fast = condense_policy(model.policy, CondenseConfig(planner="cost_model"))
    assert not any(isinstance(m, CompactLinear) for m in fast.modules())
    observations = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_array_equal(
        fast.predict(observations, deterministic=True)[0], model.predict(observations, deterministic=True)[0]
    )


def test_a_compact_model_refuses_a_masked_configuration() -> None:
    model, steps = make_model("sac", learning_starts=50, policy_kwargs=MLP)
    model.learn(steps, callback=DynamicSparsityCallback(rigl("compact")))
    with pytest.raises(ValueError, match="storage='compact'"):
        DynamicSparsityCallback(rigl("masked")).attach(model, 1_000)


def test_a_masked_model_continues_on_compact_layers_from_its_masks() -> None:
    model, steps = make_model("sac", learning_starts=50, policy_kwargs=MLP)
    masked = DynamicSparsityCallback(rigl("masked"))
    model.learn(steps, callback=masked)
    masks = {name: {k: v.clone() for k, v in e.masks.items()} for name, e in masked.engines.items()}
    compact = DynamicSparsityCallback(rigl("compact"))
    compact.init_callback(model)
    compact.attach(model, 1_000)
    for name, engine in compact.engines.items():
        for fqn, mask in masks[name].items():
            assert torch.equal(engine.tensors[fqn].mask, mask), fqn
    assert_compact_invariants(compact)
    compact.detach()


@pytest.mark.parametrize("name", ["ppo", "sac"])
def test_critic_density_ratio_on_compact_layers(name: str) -> None:
    """PPO's planned per-tensor masks (one network holding actor and critic) and SAC's per-network sparsities both
    become compact layers of those budgets."""
    model, steps = make_model(name, policy_kwargs={"net_arch": [32, 32]})
    callback = DynamicSparsityCallback(
        rigl("compact", sparsity=0.8, update_interval=5), critic_density_ratio=2.0
    )
    model.learn(steps, callback=callback)
    assert_compact_invariants(callback)
    tensors = {fqn: t for engine in callback.engines.values() for fqn, t in engine.tensors.items()}
    roles = {
        fqn: network.role_of(fqn)
        for network in callback.networks.values()
        for fqn in callback.engines[network.name].tensors
    }

    def density(role: str) -> float:
        chosen = [t for fqn, t in tensors.items() if roles[fqn] == role]
        return sum(int(t.mask.sum()) for t in chosen) / sum(t.numel for t in chosen)

    assert density("critic") == pytest.approx(2 * density("actor"), rel=0.02)
