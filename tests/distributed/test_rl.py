"""Sparse SB3 agents with environments in worker processes (``SubprocVecEnv``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sparseapps.core import SparsityConfig
from sparseapps.rl import DriftSchedule, DynamicSparsityCallback, make_drifting_env

PPO_KWARGS: dict[str, Any] = {
    "n_steps": 32,
    "batch_size": 32,
    "n_epochs": 2,
    "policy_kwargs": {"net_arch": [16, 16]},
}


def train(
    vec_env_class: type, env: Any = "CartPole-v1", env_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    venv = make_vec_env(env, n_envs=2, seed=0, vec_env_cls=vec_env_class, env_kwargs=env_kwargs)
    try:
        model = PPO("MlpPolicy", venv, seed=0, device="cpu", **PPO_KWARGS)
        config = SparsityConfig.preset("rigl", sparsity=0.8, update_interval=2, seed=0)
        callback = DynamicSparsityCallback(config)
        model.learn(256, callback=callback)
    finally:
        venv.close()
    engines = callback.engines
    return {
        "state": {k: v.clone() for k, v in model.policy.state_dict().items()},
        "updates": {name: len(engine.history) for name, engine in engines.items()},
        "masked_zero": all(
            bool((p == 0)[~m].all()) for engine in engines.values() for p, m in engine.masked_parameters()
        ),
    }


@pytest.mark.parametrize("drift", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sparse_ppo_with_subproc_envs_matches_in_process_envs(drift: bool) -> None:
    env: Any = "CartPole-v1"
    env_kwargs = None
    if drift:
        env = make_drifting_env
        env_kwargs = dict(
            env_id="CartPole-v1", parameter="length", schedule=DriftSchedule(shifts=[(100, 2.0)])
        )
    subproc = train(SubprocVecEnv, env, env_kwargs)
    local = train(DummyVecEnv, env, env_kwargs)
    assert subproc["masked_zero"]
    assert subproc["updates"] == local["updates"] and all(n >= 3 for n in subproc["updates"].values())
    # same seeds, same transitions: the environments' process does not change the sparse agent
    for name, value in local["state"].items():
        assert torch.equal(subproc["state"][name], value), name
