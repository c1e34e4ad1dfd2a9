"""What an exact resume needs beyond Stable-Baselines3's ``save``: random states and the environments' state.

SB3's ``model.zip`` holds the networks, the optimizers, the counters (``num_timesteps``, ``_n_updates``,
``_current_progress_remaining``...), ``_last_obs`` and ``ep_info_buffer``; its replay buffer file holds the
transitions. Training also draws from

* the global random generators: torch's (CPU and CUDA: action sampling, SAC's reparameterization), numpy's
  (minibatch permutations, replay sampling, exploration noise) and Python's ``random``;
* gSDE's exploration matrices, sampled at the start of every rollout;
* the environments: each copy's physical state mid-episode, its ``np_random``, the wrappers' counters
  (``TimeLimit``'s elapsed steps, ``Monitor``'s running return, a drift schedule's position), and the action
  space's generator (SAC's and DQN's random actions); the evaluation environment continues from one evaluation to
  the next in the same way.

:func:`random_state` captures the first two as tensors and numbers (a ``.pt`` file read with
``weights_only=True``); :func:`pickle_environments` the third as a pickle, which can run code when read, so it is
written only inside a checkpoint directory whose ``MANIFEST.json`` is verified before it is unpickled.

Example:
    >>> import random
    >>> import torch
    >>> from stable_baselines3 import PPO
    >>> model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, seed=0)
    >>> state = random_state(model)
    >>> first = (random.random(), torch.rand(1))
    >>> set_random_state(model, state)
    >>> (random.random(), torch.rand(1)) == first
    True
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sparseapps.core.random_state import random_state as core_random_state
from sparseapps.core.random_state import set_random_state as core_set_random_state

__all__ = ["pickle_environments", "random_state", "restore_environments", "set_random_state"]

RANDOM_STATE_VERSION = 2  # 2: the generators in core.random_state's form
ENVIRONMENTS_VERSION = 1


def _sde_distributions(model: BaseAlgorithm) -> dict[str, Any]:
    """The gSDE noise distributions of ``model``'s policy (PPO / A2C: the policy's; SAC: the actor's)."""
    found = {}
    for name in ("policy", "actor"):
        owner = model.policy if name == "policy" else getattr(model.policy, "actor", None)
        distribution = getattr(owner, "action_dist", None)
        if distribution is not None and hasattr(distribution, "exploration_mat"):
            found[name] = distribution
    return found


def random_state(model: BaseAlgorithm) -> dict[str, Any]:
    """The global random generators and ``model``'s gSDE exploration matrices, as tensors and numbers.

    The result can be written with :func:`sparseapps.core.io.save_torch` and read back with ``weights_only``.
    """
    state: dict[str, Any] = {
        "version": RANDOM_STATE_VERSION,
        "generators": core_random_state(),
        "sde": {
            owner: {
                "exploration_mat": distribution.exploration_mat.detach().clone(),
                "exploration_matrices": distribution.exploration_matrices.detach().clone(),
            }
            for owner, distribution in _sde_distributions(model).items()
        },
    }
    return state


def set_random_state(model: BaseAlgorithm, state: Mapping[str, Any]) -> None:
    """Restores what :func:`random_state` captured.

    Raises:
        ValueError: ``state`` is not of this version, or holds CUDA or gSDE states that do not fit this machine
            or model.
    """
    if not isinstance(state, Mapping) or state.get("version") != RANDOM_STATE_VERSION:
        raise ValueError(
            f"expected random states of version {RANDOM_STATE_VERSION}, got {type(state).__name__} with version "
            f"{getattr(state, 'get', lambda _: None)('version')!r}"
        )
    core_set_random_state(state["generators"])
    distributions = _sde_distributions(model)
    if set(state["sde"]) != set(distributions):
        raise ValueError(
            f"the checkpoint holds gSDE exploration matrices of {sorted(state['sde'])}, the model has "
            f"{sorted(distributions)}: it was written with another use_sde setting"
        )
    for owner, matrices in state["sde"].items():
        distribution = distributions[owner]
        distribution.exploration_mat = matrices["exploration_mat"].to(distribution.exploration_mat.device)
        distribution.exploration_matrices = matrices["exploration_matrices"].to(
            distribution.exploration_matrices.device
        )


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _set_attributes(instance: Any, attributes: dict[str, Any]) -> None:
    instance.__dict__.update(attributes)


class _StatePickler(pickle.Pickler):
    """Pickles environments and wrappers by their attributes.

    Some environments (every MuJoCo one) pickle as their constructor's arguments (``EzPickle``), which would
    rebuild them at their initial state; pickling their attributes keeps the simulation where it is.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, gym.Env):
            return _new_instance, (type(obj),), obj.__dict__, None, None, _set_attributes
        return NotImplemented


def _check_vec_env(name: str, env: VecEnv) -> None:
    if not isinstance(env, DummyVecEnv):
        raise TypeError(
            f"the {name} environment must be a DummyVecEnv to be checkpointed, got {type(env).__name__}"
        )


def pickle_environments(model: BaseAlgorithm, envs: Mapping[str, VecEnv | None]) -> bytes:
    """The state of each vectorized environment in ``envs`` and of ``model``'s action space, as one pickle.

    Raises:
        TypeError: an environment is not a ``DummyVecEnv``, or its state cannot be pickled (Box2D's worlds).
    """
    for name, env in envs.items():
        if env is not None:
            _check_vec_env(name, env)
    state = {
        "version": ENVIRONMENTS_VERSION,
        "envs": {name: None if env is None else env.__dict__ for name, env in envs.items()},
        "action_space": model.action_space,
    }
    buffer = io.BytesIO()
    try:
        _StatePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise TypeError(
            f"the environments' state cannot be pickled: {type(error).__name__}: {error}"
        ) from error
    return buffer.getvalue()


def restore_environments(model: BaseAlgorithm, data: bytes, envs: Mapping[str, VecEnv | None]) -> None:
    """Puts each environment of ``envs`` (and ``model``'s action space) back in the state :func:`pickle_environments`
    saved. ``data`` is unpickled: call it only on bytes whose hash a manifest of your own run has verified.

    Raises:
        ValueError: ``data`` holds other environments than ``envs`` or is of another version.
    """
    state = pickle.loads(data)
    if not isinstance(state, dict) or state.get("version") != ENVIRONMENTS_VERSION:
        raise ValueError(f"expected environment states of version {ENVIRONMENTS_VERSION}")
    saved = state["envs"]
    present = {name for name, env in envs.items() if env is not None}
    if {name for name, attributes in saved.items() if attributes is not None} != present:
        raise ValueError(
            f"the checkpoint holds the environments {sorted(saved)}, the run has {sorted(present)}"
        )
    for name, env in envs.items():
        if env is None:
            continue
        _check_vec_env(name, env)
        if len(saved[name]["envs"]) != env.num_envs:
            raise ValueError(
                f"the checkpoint's {name} environment has {len(saved[name]['envs'])} copies, the run has "
                f"{env.num_envs}"
            )
        env.close()
        env.__dict__.update(saved[name])
    model.action_space = state["action_space"]
