"""RL presets: published values, callbacks and algorithm kwargs that SB3 accepts; policies that accept masks."""

from __future__ import annotations

import dataclasses
import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO, SAC, TD3
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.sac.policies import SACPolicy

import sparseapps.rl.presets
from sparseapps.core.kernels import CondenseConfig
from sparseapps.core.masks import attach_mask
from sparseapps.rl import policies
from sparseapps.rl.policies import (
    SparseActorCriticPolicy,
    SparsePolicyClass,
    SparseSACPolicy,
    accept_masks,
    adopt_masks,
    condense_policy,
    sparse_policy_class,
)
from sparseapps.rl.presets import RL_PRESETS, rl_preset
from sparseapps.rl.train import ALGORITHM_CLASSES

ENVS = {"ppo": "CartPole-v1", "dqn": "CartPole-v1", "sac": "Pendulum-v1", "td3": "Pendulum-v1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


def test_published_values() -> None:
    ds = rl_preset("ds-td3").sparsity
    assert (ds.sparsity, ds.distribution, ds.drop, ds.grow) == (0.5, "er", "signed_magnitude", "random")
    assert (ds.drop_fraction, ds.drop_schedule, ds.update_interval, ds.end_fraction) == (
        0.05,
        "constant",
        1000,
        0.95,
    )
    rlx2 = rl_preset("rlx2")
    assert (rlx2.sparsity.grow, rlx2.sparsity.update_interval, rlx2.sparsity.drop_fraction) == (
        "gradient",
        10_000,
        0.5,
    )
    assert rlx2.kwargs_for("sac")["n_steps"] == 3
    sac = rl_preset("graesser-sac")
    assert (sac.sparsity.update_interval, sac.sparsity.drop_fraction, sac.sparsity.end_fraction) == (
        1000,
        0.5,
        0.8,
    )
    assert not sac.dense_output_layers
    assert rl_preset("graesser-ppo").sparsity.update_interval == 250
    assert rl_preset("graesser-dqn").kwargs_for("dqn")["policy_kwargs"]["net_arch"] == [512, 512]


@pytest.mark.parametrize(("name", "algo"), [(n, a) for n, p in RL_PRESETS.items() for a in p.algorithms])
def test_every_preset_builds_a_model_and_attaches(name: str, algo: str) -> None:
    preset = rl_preset(name)
    model = ALGORITHM_CLASSES[algo]("MlpPolicy", ENVS[algo], device="cpu", **preset.kwargs_for(algo))
    callback = preset.callback()
    callback.init_callback(model)
    engines = callback.attach(model, 20_000)
    for engine in engines.values():
        assert engine.density == pytest.approx(1 - preset.sparsity.sparsity, abs=0.01)
    callback.detach()


def test_bad_presets_and_overrides() -> None:
    with pytest.raises(ValueError, match="unknown RL preset"):
        rl_preset("rigl-td3")
    with pytest.raises(ValueError, match="unknown SparsityConfig fields"):
        rl_preset("rlx2", sparsty=0.8)
    with pytest.raises(ValueError, match="is for ppo"):
        rl_preset("graesser-ppo").kwargs_for("sac")
    assert rl_preset("rlx2", sparsity=0.95).sparsity.sparsity == 0.95
    with pytest.raises(ValueError, match=r"algorithms entry must be one of 'ppo'.*got 'trpo'"):
        dataclasses.replace(rl_preset("rlx2"), algorithms=("trpo",))
    with pytest.raises(ValueError, match="critic_density_ratio must be a finite number > 0, got 0"):
        dataclasses.replace(rl_preset("rlx2"), critic_density_ratio=0)
    with pytest.raises(TypeError, match="dense_output_layers must be True or False, got 1"):
        dataclasses.replace(rl_preset("rlx2"), dense_output_layers=1)
    assert rl_preset("rlx2").kwargs_for("td3") is not rl_preset("rlx2").kwargs_for("td3")


def test_presets_docstring_examples() -> None:
    assert doctest.testmod(sparseapps.rl.presets, optionflags=doctest.ELLIPSIS).failed == 0


# ------------------------------------------------------------------------------------------------ policies


def test_sparse_policy_class_wraps_sb3_policy_classes_without_subclassing() -> None:
    assert sparse_policy_class(ActorCriticPolicy) == SparseActorCriticPolicy  # the former names are aliases
    assert sparse_policy_class(SACPolicy) == SparseSACPolicy
    assert sparse_policy_class(SparseSACPolicy) is SparseSACPolicy
    assert SparseSACPolicy.__name__ == "SACPolicy"  # SB3 reads it
    policy = SAC(SparseSACPolicy, "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]}).policy
    assert type(policy) is SACPolicy  # the policies it builds are SB3's own class
    with pytest.raises(TypeError, match="BasePolicy subclass"):
        sparse_policy_class(torch.nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        accept_masks("policy")  # type: ignore[arg-type]


class CustomSACPolicy(SACPolicy):
    """A user's subclass (importable by reference from this test module)."""


def test_user_policy_classes_accept_masks_through_save_and_load(tmp_path: Path) -> None:
    twin = sparse_policy_class(CustomSACPolicy)
    assert isinstance(twin, SparsePolicyClass) and twin.policy_class is CustomSACPolicy
    model = SAC(twin, "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]})
    assert type(model.policy) is CustomSACPolicy
    layer = model.policy.actor.latent_pi[0]
    attach_mask(layer, "weight", torch.rand(layer.weight.shape) < 0.5)
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", device="cpu")
    assert torch.equal(loaded.policy.actor.latent_pi[0].weight_mask, layer.weight_mask)
    # BasePolicy.save / load of the policy alone
    model.policy.save(tmp_path / "policy.pt")
    policy = loaded.policy_class.load(tmp_path / "policy.pt", device="cpu")
    assert type(policy) is CustomSACPolicy
    assert torch.equal(policy.actor.latent_pi[0].weight_mask, layer.weight_mask)


def test_the_deprecated_mask_aware_mixin_warns_and_still_builds_policies_that_accept_masks() -> None:
    with pytest.warns(DeprecationWarning, match="MaskAwarePolicy is deprecated"):
        from sparseapps.rl import MaskAwarePolicy
    # what a model saved by an earlier sparseapps with a Sparse<YourPolicy> class rebuilds on load
    older = type("SparseCustomSACPolicy", (MaskAwarePolicy, CustomSACPolicy), {})
    model = SAC(older, "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]})
    layer = model.policy.actor.latent_pi[0]
    attach_mask(layer, "weight", torch.rand(layer.weight.shape) < 0.5)
    fresh = SAC(older, "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]})
    fresh.policy.load_state_dict(model.policy.state_dict())
    assert torch.equal(fresh.policy.actor.latent_pi[0].weight_mask, layer.weight_mask)


def test_plain_sb3_policies_reject_masks_that_mask_aware_ones_adopt() -> None:
    model = TD3("MlpPolicy", "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]})
    layer = model.policy.actor.mu[0]
    attach_mask(layer, "weight", torch.rand(layer.weight.shape) < 0.5)
    state = model.policy.state_dict()
    plain = TD3("MlpPolicy", "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]})
    with pytest.raises(RuntimeError, match="weight_mask"):
        plain.policy.load_state_dict(state)
    assert adopt_masks(plain.policy, state) == ["actor.mu.0.weight_mask"]
    plain.policy.load_state_dict(state)
    assert bool((plain.policy.actor.mu[0].weight[~layer.weight_mask] == 0).all())
    # keys that name nothing are left to the strict load to report
    assert adopt_masks(plain.policy, {"nowhere.weight_mask": torch.ones(2, dtype=torch.bool)}) == []
    # a pre-hook on the policy module: nested prefixes too, and registered once however often asked
    accept_masks(plain.policy)
    accept_masks(plain.policy)
    assert len(plain.policy._load_state_dict_pre_hooks) == 1
    holder = torch.nn.ModuleDict(
        {"inner": TD3("MlpPolicy", "Pendulum-v1", device="cpu", policy_kwargs={"net_arch": [8]}).policy}
    )
    accept_masks(holder["inner"])
    holder.load_state_dict({f"inner.{k}": v for k, v in state.items()})
    assert torch.equal(holder["inner"].actor.mu[0].weight_mask, layer.weight_mask)
    ppo = PPO(sparse_policy_class(ActorCriticPolicy), "CartPole-v1", device="cpu")
    assert isinstance(ppo.policy, BasePolicy) and ppo.policy in policies._ACCEPTING


@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_condensed_policy_acts_like_the_masked_policy(algo: str) -> None:
    kwargs = {"n_steps": 64, "batch_size": 32, "n_epochs": 1} if algo == "ppo" else {"learning_starts": 30}
    model = ALGORITHM_CLASSES[algo]("MlpPolicy", ENVS[algo], seed=0, device="cpu", **kwargs)
    model.learn(96, callback=rl_preset("graesser-sac" if algo == "sac" else "graesser-ppo").callback())
    fast = condense_policy(model.policy, CondenseConfig(planner="cost_model"))
    kinds = {type(module).__name__ for module in fast.modules()}
    assert kinds & {"CSRLinear", "CondensedLinear", "DenseActiveLinear"}
    observations = np.stack([model.observation_space.sample() for _ in range(8)])
    expected, _ = model.predict(observations, deterministic=True)
    actual, _ = fast.predict(observations, deterministic=True)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="BasePolicy"):
        condense_policy(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
