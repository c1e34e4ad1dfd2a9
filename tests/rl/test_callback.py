"""DynamicSparsityCallback on every supported SB3 algorithm: gradient-step counts, invariants, targets, save/load."""

from __future__ import annotations

import copy
import doctest
import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sparseapps.core import ConfigMismatchError, SparsityConfig, scores
from sparseapps.core.compact import CompactLinear
from sparseapps.core.io import load_torch, save_torch
from sparseapps.core.masks import get_mask
from sparseapps.rl.callback import DynamicSparsityCallback, count_optimizer_steps, find_networks
from sparseapps.rl.compact import compact_layers
from sparseapps.rl.policies import SparsePolicyClass
from sparseapps.rl.resume import pickle_environments, random_state, restore_environments, set_random_state
from tests.rl.compare import differences

TINY = {"net_arch": [16, 16]}
# algorithm -> (class, env, kwargs, timesteps); budgets give a few dozen gradient steps each.
ALGORITHMS: dict[str, tuple[type[BaseAlgorithm], str, dict[str, Any], int]] = {
    "ppo": (PPO, "CartPole-v1", {"n_steps": 64, "batch_size": 48, "n_epochs": 2, "policy_kwargs": TINY}, 192),
    "a2c": (A2C, "CartPole-v1", {"n_steps": 8, "policy_kwargs": TINY}, 192),
    "sac": (SAC, "Pendulum-v1", {"learning_starts": 40, "batch_size": 32, "policy_kwargs": TINY}, 100),
    "td3": (TD3, "Pendulum-v1", {"learning_starts": 40, "batch_size": 32, "policy_kwargs": TINY}, 100),
    "ddpg": (DDPG, "Pendulum-v1", {"learning_starts": 40, "batch_size": 32, "policy_kwargs": TINY}, 100),
    "dqn": (
        DQN,
        "CartPole-v1",
        {
            "learning_starts": 40,
            "batch_size": 32,
            "train_freq": 4,
            "gradient_steps": 2,
            "target_update_interval": 8,
            "policy_kwargs": TINY,
        },
        160,
    ),
}


def make_model(name: str, **overrides: Any) -> tuple[BaseAlgorithm, int]:
    cls, env, kwargs, steps = ALGORITHMS[name]
    # SB3 writes into policy_kwargs (e.g. SAC adds use_sde): every model gets its own copy
    kwargs = copy.deepcopy({**kwargs, **overrides})
    return cls("MlpPolicy", env, seed=0, device="cpu", **kwargs), steps


def rigl(**overrides: Any) -> SparsityConfig:
    return SparsityConfig.preset("rigl", **{"sparsity": 0.8, "update_interval": 5, "seed": 0, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


def assert_sparse_invariants(callback: DynamicSparsityCallback) -> None:
    """Masked weights and their Adam state are zero, nnz equals the budget, targets carry the online masks."""
    for name, engine in callback.engines.items():
        network = callback.networks[name]
        for fqn, record in engine.tensors.items():
            assert int(record.mask.sum()) == record.budget, fqn
            assert bool((record.param[~record.mask] == 0).all()), fqn
            for value in network.optimizer.state.get(record.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == record.mask.shape:
                    assert bool((value[~record.mask] == 0).all()), fqn
            if network.target is not None:
                target_module = network.target.get_submodule(fqn.rpartition(".")[0])
                target_mask = get_mask(target_module)
                assert target_mask is not None and torch.equal(target_mask, record.mask), fqn
                assert bool((target_module.weight[~record.mask] == 0).all()), fqn
        for fqn in network.output_layers:
            module = network.network.get_submodule(fqn.rpartition(".")[0])
            assert get_mask(module) is None, f"output layer {fqn} should stay dense"
        for update in engine.history:
            assert {fqn: t["nnz"] for fqn, t in update["tensors"].items()} == {
                fqn: r.budget for fqn, r in engine.tensors.items()
            }


def assert_compact_invariants(callback: DynamicSparsityCallback) -> None:
    """Each sparse Linear is compact with nnz equal to its budget, in its optimizer with state of its size, the
    target's layer has the online topology, and output layers stay dense Linear layers."""
    for name, engine in callback.engines.items():
        network = callback.networks[name]
        held = {id(p) for group in network.optimizer.param_groups for p in group["params"]}
        layers = compact_layers(network.network)
        assert set(layers) == set(engine.tensors), name
        for fqn, layer in layers.items():
            assert layer.nnz == engine.tensors[fqn].budget, fqn
            assert id(layer.values) in held and (layer.bias is None or id(layer.bias) in held), fqn
            for value in network.optimizer.state.get(layer.values, {}).values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.shape == layer.values.shape, fqn
            if network.target is not None:
                target = network.target.get_submodule(fqn.rpartition(".")[0])
                assert isinstance(target, CompactLinear) and torch.equal(target.mask(), layer.mask()), fqn
        assert held <= {id(p) for p in network.network.parameters()}, name  # no replaced weight left behind
        for fqn in network.output_layers:
            module = network.network.get_submodule(fqn.rpartition(".")[0])
            assert isinstance(module, nn.Linear) and get_mask(module) is None, fqn


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_trains_sparse_with_exact_gradient_step_counts(name: str) -> None:
    model, steps = make_model(name)
    expected = count_optimizer_steps(model, steps)
    callback = DynamicSparsityCallback(rigl())
    model.learn(steps, callback=callback)
    assert {n: e.step for n, e in callback.engines.items()} == expected
    assert {n: e.total_steps for n, e in callback.engines.items()} == expected
    assert all(engine.history for engine in callback.engines.values())
    assert_sparse_invariants(callback)
    # the policy keeps its class; the class SB3 rebuilds it from on load builds policies that accept masks
    assert type(model.policy).__module__.startswith("stable_baselines3")
    assert isinstance(model.policy_class, SparsePolicyClass)
    # hooks are gone after training: another optimizer step does not re-mask
    assert not callback._handles


def test_find_networks_pairs_each_network_with_its_optimizer_and_target() -> None:
    sac, _ = make_model("sac")
    networks = {n.name: n for n in find_networks(sac)}
    assert networks["actor"].optimizer is sac.actor.optimizer and networks["actor"].target is None
    assert networks["critic"].target is sac.critic_target
    assert networks["actor"].output_layers == ("mu.weight", "log_std.weight")
    assert networks["critic"].output_layers == ("qf0.4.weight", "qf1.4.weight")
    td3, _ = make_model("td3")
    actor = next(n for n in find_networks(td3) if n.name == "actor")
    assert (
        actor.target is td3.actor_target
        and actor.interval_divisor == 2
        and actor.output_layers == ("mu.4.weight",)
    )
    dqn, _ = make_model("dqn")
    (q_net,) = find_networks(dqn)
    assert q_net.optimizer is dqn.policy.optimizer and q_net.target is dqn.q_net_target
    ppo, _ = make_model("ppo")
    (policy,) = find_networks(ppo)
    assert policy.output_layers == ("action_net.weight", "value_net.weight")
    assert policy.role_of("mlp_extractor.value_net.0.weight") == "critic"
    assert policy.role_of("mlp_extractor.policy_net.0.weight") == "actor"


def test_count_optimizer_steps_follows_each_training_loop() -> None:
    ppo = PPO("MlpPolicy", "CartPole-v1", n_steps=100, batch_size=64, n_epochs=3, device="cpu")
    # 250 steps -> 3 rollouts of 100; each 3 epochs of ceil(100 / 64) = 2 minibatches
    assert count_optimizer_steps(ppo, 250) == {"policy": 18}
    a2c = A2C("MlpPolicy", "CartPole-v1", n_steps=5, device="cpu")
    assert count_optimizer_steps(a2c, 23) == {"policy": 5}
    sac = SAC("MlpPolicy", "Pendulum-v1", learning_starts=10, train_freq=3, gradient_steps=-1, device="cpu")
    # rollouts end at 3, 6, ..., 30; those ending past 10 (12..30: 7 rollouts) train 3 steps each
    assert count_optimizer_steps(sac, 30) == {"actor": 21, "critic": 21}
    td3 = TD3("MlpPolicy", "Pendulum-v1", learning_starts=0, policy_delay=3, device="cpu")
    td3._n_updates = 2
    # gradient steps 3..12 globally: multiples of 3 are 3, 6, 9, 12
    assert count_optimizer_steps(td3, 10) == {"actor": 4, "critic": 10}
    td3.num_timesteps = 4
    assert count_optimizer_steps(td3, 10) == {"actor": 2, "critic": 6}
    dqn = DQN("MlpPolicy", "CartPole-v1", learning_starts=0, train_freq=(1, "episode"), device="cpu")
    with pytest.raises(ValueError, match="episodes"):
        count_optimizer_steps(dqn, 100)


def test_gradients_of_inactive_weights_are_zero_before_clipping_except_on_update_steps() -> None:
    model, _ = make_model("ppo")
    callback = DynamicSparsityCallback(rigl(update_interval=3))
    callback.init_callback(model)
    callback.attach(model, 10_000)
    engine = callback.engines["policy"]
    observations = torch.randn(8, 4)

    def backward() -> None:
        model.policy.optimizer.zero_grad()
        _, values, log_prob = model.policy(observations)
        (values.sum() + log_prob.sum()).backward()

    backward()  # step 1 is not an update step: SB3's clip_grad_norm_ would see only active gradients
    for record in engine.tensors.values():
        assert bool((record.param.grad[~record.mask] == 0).all())
    model.policy.optimizer.step()
    model.policy.optimizer.step()
    backward()  # step 3 is an update step: RigL needs the dense gradient
    assert any(bool((r.param.grad[~r.mask] != 0).any()) for r in engine.tensors.values())
    callback.detach()


class RecordCommits(BaseCallback):
    """Records (step, masks before, masks after) of every topology update of the sparsity callback's engines."""

    def __init__(self, sparsity: DynamicSparsityCallback) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.commits: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def _on_step(self) -> bool:
        return True

    def _on_training_start(self) -> None:
        for engine in self.sparsity.engines.values():

            def record(new: Any, engine: Any = engine) -> None:
                before = {fqn: mask.clone() for fqn, mask in engine.masks.items()}
                self.commits.append((engine.step, before, {fqn: mask.clone() for fqn, mask in new.items()}))

            engine.commit_hooks.append(record)


@pytest.mark.parametrize("name", ["ppo", "sac"])
def test_a_registered_grow_criterion_works_unchanged_through_the_callback(name: str) -> None:
    """A criterion registered with scores.register_grow is used as is: it reads the dense gradient (the callback
    leaves it whole at update steps because the criterion declares "grad"), and the grown entries are the ones
    its scores rank first."""
    seen: dict[tuple[int, str], torch.Tensor] = {}  # (update step, fqn) -> the criterion's scores
    dense_at_inactive: list[bool] = []
    tie_breaker = torch.Generator().manual_seed(0)

    @scores.register_grow("test_gradient_plus_rank", needs=("grad",), tie_noise=False)
    def _score(ctx: scores.ScoreContext) -> torch.Tensor:
        assert ctx.grad is not None
        dense_at_inactive.append(bool((ctx.grad[~ctx.mask] != 0).any()))
        rank = torch.rand(ctx.mask.shape, generator=tie_breaker)
        seen[ctx.step, ctx.fqn] = ctx.grad.abs() + 1e-3 * rank
        return seen[ctx.step, ctx.fqn]

    try:
        model, steps = make_model(name)
        callback = DynamicSparsityCallback(rigl(grow="test_gradient_plus_rank", update_interval=3))
        recorder = RecordCommits(callback)
        model.learn(steps, callback=[callback, recorder])
    finally:
        scores.unregister("grow", "test_gradient_plus_rank")
    assert recorder.commits and any(dense_at_inactive)
    grown_any = False
    for step, before, after in recorder.commits:
        for fqn, new in after.items():
            grown, left_out = new & ~before[fqn], ~new
            if not bool(grown.any()):
                continue
            grown_any = True
            # every grown entry scores at least as high as every inactive entry that was not grown
            assert float(seen[step, fqn][grown].min()) >= float(seen[step, fqn][left_out].max()), fqn
    assert grown_any
    assert_sparse_invariants(callback)


def test_targets_stay_masked_through_polyak_updates_and_topology_changes() -> None:
    model, steps = make_model("td3")
    callback = DynamicSparsityCallback(rigl(update_interval=2))
    model.learn(steps, callback=callback)
    critic = callback.engines["critic"]
    assert len(critic.history) >= 3
    polyak_update(model.critic.parameters(), model.critic_target.parameters(), 0.3)
    assert_sparse_invariants(callback)


def test_critic_density_ratio_gives_the_critic_more_weights_at_the_same_budget() -> None:
    model, _ = make_model("sac", policy_kwargs={"net_arch": [32, 32]})
    callback = DynamicSparsityCallback(
        SparsityConfig.preset("static", sparsity=0.8), critic_density_ratio=2.0
    )
    callback.init_callback(model)
    callback.attach(model, 1_000)
    actor, critic = callback.engines["actor"], callback.engines["critic"]
    assert critic.density == pytest.approx(2 * actor.density, rel=0.01)
    total = sum(t.numel for e in (actor, critic) for t in e.tensors.values())
    nnz = sum(int(t.mask.sum()) for e in (actor, critic) for t in e.tensors.values())
    assert nnz / total == pytest.approx(0.2, abs=0.002)
    callback.detach()

    ppo, _ = make_model("ppo", policy_kwargs={"net_arch": [32, 32]})
    callback = DynamicSparsityCallback(rigl(), critic_density_ratio=3.0)
    callback.init_callback(ppo)
    callback.attach(ppo, 1_000)
    tensors = callback.engines["policy"].tensors
    value = [t for fqn, t in tensors.items() if fqn.startswith("mlp_extractor.value_net")]
    action = [t for fqn, t in tensors.items() if fqn.startswith("mlp_extractor.policy_net")]
    density = lambda ts: sum(int(t.mask.sum()) for t in ts) / sum(t.numel for t in ts)  # noqa: E731
    assert density(value) == pytest.approx(3 * density(action), rel=0.02)
    callback.detach()


def test_sparse_output_layers_on_request() -> None:
    model, _ = make_model("dqn")
    callback = DynamicSparsityCallback(rigl(), dense_output_layers=False)
    callback.init_callback(model)
    callback.attach(model, 1_000)
    assert "q_net.4.weight" in callback.engines["q_net"].tensors
    callback.detach()


@pytest.mark.parametrize("name", ["ppo", "sac", "dqn"])
def test_masks_survive_save_and_load_and_evaluation_uses_them(name: str, tmp_path: Path) -> None:
    model, steps = make_model(name)
    callback = DynamicSparsityCallback(rigl())
    model.learn(steps, callback=callback)
    model.save(tmp_path / "model.zip")
    loaded = type(model).load(tmp_path / "model.zip", device="cpu")
    saved_state, loaded_state = model.policy.state_dict(), loaded.policy.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert any(key.endswith("weight_mask") for key in loaded_state)
    for key, value in saved_state.items():
        assert torch.equal(value, loaded_state[key]), key
    observations = np.stack([model.observation_space.sample() for _ in range(5)])
    expected, _ = model.predict(observations, deterministic=True)
    actual, _ = loaded.predict(observations, deterministic=True)
    np.testing.assert_allclose(actual, expected)

    # training again from the loaded model starts from its masks
    loaded.set_env(model.get_env())
    again = DynamicSparsityCallback(rigl())
    again.init_callback(loaded)
    again.attach(loaded, loaded.num_timesteps + steps)
    for network, engine in again.engines.items():
        for fqn, record in engine.tensors.items():
            assert torch.equal(record.mask, callback.engines[network].tensors[fqn].mask), fqn
    again.detach()


def test_policy_save_and_load_keep_masks(tmp_path: Path) -> None:
    model, steps = make_model("ppo")
    model.learn(steps, callback=DynamicSparsityCallback(rigl()))
    model.policy.save(tmp_path / "policy.pt")
    policy = model.policy_class.load(tmp_path / "policy.pt", device="cpu")
    assert torch.equal(
        policy.mlp_extractor.policy_net[0].weight_mask, model.policy.mlp_extractor.policy_net[0].weight_mask
    )


class Interrupt(Exception):
    """Stands in for a crash."""


class SaveAndCrash(BaseCallback):
    """A checkpoint then a crash: at the first rollout start at or after ``at`` env steps (where ``train_run``
    checkpoints), saves what an exact resume needs, then interrupts training."""

    def __init__(self, sparsity: DynamicSparsityCallback, at: int, directory: Path) -> None:
        super().__init__()
        self.sparsity, self.at, self.directory = sparsity, at, directory

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.num_timesteps < self.at:
            return
        self.model.save(self.directory / "model.zip")
        self.model.save_replay_buffer(self.directory / "replay_buffer.pkl")
        save_torch(self.directory / "sparsity.pt", self.sparsity.state_dict())
        save_torch(self.directory / "random_state.pt", random_state(self.model))
        environments = pickle_environments(self.model, {"train": self.model.get_env()})
        (self.directory / "environments.pkl").write_bytes(environments)
        raise Interrupt


class RestoreRandomState(BaseCallback):
    """Restores the generators where they were saved: the first rollout start after resuming."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__()
        self.state: dict[str, Any] | None = state

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.state is not None:
            set_random_state(self.model, self.state)
            self.state = None


def sac_state(model: SAC) -> dict[str, Any]:
    """Every tensor of a SAC run: networks with masks, the three optimizers, the entropy coefficient, the replay
    buffer, and the global torch generator."""
    buffer = model.replay_buffer
    return {
        "policy": model.policy.state_dict(),
        "actor.optimizer": model.actor.optimizer.state_dict(),
        "critic.optimizer": model.critic.optimizer.state_dict(),
        "ent_coef_optimizer": model.ent_coef_optimizer.state_dict(),
        "log_ent_coef": model.log_ent_coef.detach(),
        "replay_buffer": {
            k: torch.from_numpy(v) for k, v in vars(buffer).items() if isinstance(v, np.ndarray)
        },
        "counters": (model.num_timesteps, model._n_updates, buffer.pos, buffer.full),
        "torch_generator": torch.get_rng_state(),
    }


@pytest.mark.parametrize("storage", ["masked", "compact"])
def test_callback_state_resumes_training_bit_for_bit(storage: str, tmp_path: Path) -> None:
    """SAC interrupted mid-run and resumed from the callback's state (with SB3's save and the random and
    environment states of sparseapps.rl.resume) trains on to exactly the tensors of an uninterrupted run, on masked
    or compact layers (which SAC.load rebuilds inside the optimizers before their states load)."""
    config = rigl(storage=storage)
    reference, steps = make_model("sac")
    reference_callback = DynamicSparsityCallback(config)
    reference.learn(steps, callback=reference_callback)
    expected = sac_state(reference)

    interrupted, _ = make_model("sac")
    callback = DynamicSparsityCallback(config)
    with pytest.raises(Interrupt):
        interrupted.learn(steps, callback=[callback, SaveAndCrash(callback, steps // 2, tmp_path)])
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    resumed = SAC.load(tmp_path / "model.zip", env=env, device="cpu", force_reset=False)
    resumed.load_replay_buffer(tmp_path / "replay_buffer.pkl")
    restore_environments(resumed, (tmp_path / "environments.pkl").read_bytes(), {"train": env})
    again = DynamicSparsityCallback(config)
    again.load_state_dict(load_torch(tmp_path / "sparsity.pt"))
    done = resumed.num_timesteps
    assert 0 < done < steps
    restore = RestoreRandomState(load_torch(tmp_path / "random_state.pt"))
    resumed.learn(steps - done, reset_num_timesteps=False, callback=[again, restore])

    assert differences(expected, sac_state(resumed)) == []
    for name, engine in again.engines.items():
        original = reference_callback.engines[name]
        assert engine.step == original.step and engine.total_steps == original.total_steps
        assert len(engine.history) > len(load_torch(tmp_path / "sparsity.pt")["engines"][name]["history"])
        assert differences(original.state_dict(), engine.state_dict()) == []
    if storage == "compact":
        assert any(key.endswith(".values") for key in expected["policy"])
        assert_compact_invariants(again)
    else:
        assert_sparse_invariants(again)


# ---------------------------------------------------------------------------------------------- bad input


def test_rejects_unsupported_algorithms_and_methods() -> None:
    callback = DynamicSparsityCallback(rigl())
    with pytest.raises(TypeError, match="supports PPO, A2C, SAC, TD3, DDPG, DQN"):
        callback.init_callback(SimpleNamespace())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SparsityConfig"):
        DynamicSparsityCallback({"sparsity": 0.9})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'snip'"):
        DynamicSparsityCallback(SparsityConfig.preset("snip"))
    with pytest.raises(ValueError, match="critic_density_ratio"):
        DynamicSparsityCallback(rigl(), critic_density_ratio=0.0)


def test_rejects_networks_it_cannot_sparsify() -> None:
    model, _ = make_model("dqn", policy_kwargs={"net_arch": []})
    callback = DynamicSparsityCallback(rigl())
    callback.init_callback(model)
    with pytest.raises(ValueError, match="no weight to sparsify"):
        callback.attach(model, 1_000)


def test_rejects_a_sparsity_that_empties_a_layer() -> None:
    model, _ = make_model("dqn", policy_kwargs={"net_arch": [4, 4]})
    callback = DynamicSparsityCallback(SparsityConfig.preset("rigl", sparsity=0.97, distribution="uniform"))
    callback.init_callback(model)
    with pytest.raises(ValueError, match=r"DQN\.q_net: .*leaves no weight"):
        callback.attach(model, 1_000)
    sac, _ = make_model("sac")
    with pytest.raises(ValueError, match=r"density .* > 1"):
        DynamicSparsityCallback(rigl(sparsity=0.3), critic_density_ratio=50.0).attach(sac, 1_000)


def test_rejects_masks_and_checkpoints_of_another_configuration(tmp_path: Path) -> None:
    model, steps = make_model("dqn")
    callback = DynamicSparsityCallback(rigl())
    model.learn(steps, callback=callback)
    with pytest.raises(ValueError, match="another configuration"):
        DynamicSparsityCallback(rigl(sparsity=0.5)).attach(model, 1_000)
    # the engines compare the checkpoint's configuration when they load it
    other_config = DynamicSparsityCallback(rigl(drop_fraction=0.1))
    other_config.load_state_dict(callback.state_dict())
    with pytest.raises(
        ConfigMismatchError, match=r"DQN\.q_net: .*another SparsityConfig.*'drop_fraction': \(0\.3, 0\.1\)"
    ):
        other_config.attach(model, model.num_timesteps)
    with pytest.raises(ConfigMismatchError, match=r"another configuration.*dense_output_layers"):
        DynamicSparsityCallback(rigl(), dense_output_layers=False).load_state_dict(callback.state_dict())
    # the same configuration but a longer run: the engines' total steps differ
    other = DynamicSparsityCallback(rigl())
    other.load_state_dict(callback.state_dict())
    with pytest.raises(ValueError, match="total_steps"):
        other.attach(model, model.num_timesteps + 400)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"version": 99})


@pytest.mark.parametrize(
    "module",
    [
        "sparseapps.rl",
        "sparseapps.rl.budgets",
        "sparseapps.rl.callback",
        "sparseapps.rl.cells",
        "sparseapps.rl.checkpoints",
        "sparseapps.rl.compact",
        "sparseapps.rl.minatar",
        "sparseapps.rl.networks",
        "sparseapps.rl.plasticity",
        "sparseapps.rl.plasticity_suite",
        "sparseapps.rl.policies",
        "sparseapps.rl.resume",
        "sparseapps.rl.run_config",
        "sparseapps.rl.summary",
        "sparseapps.rl.train",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
