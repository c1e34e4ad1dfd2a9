"""Sparse SB3 policies through save and load: one ``load_state_dict`` pre-hook that accepts mask buffers.

Masks are boolean buffers beside each sparse weight (``<module>.weight_mask``, see :mod:`sparseapps.core.masks`), so
they are part of ``policy.state_dict()`` and SB3 saves them with the parameters. A freshly built SB3 policy has no
such buffers, and SB3 loads with ``strict=True``, which would reject them. :func:`accept_masks` registers a
pre-hook on a policy (``torch.nn.Module.register_load_state_dict_pre_hook``) that creates a mask buffer for every
``*_mask`` key of the incoming state dict before the load; weights arrive with their zeros, so evaluation runs with
the masks applied. Layers trained with compact storage (``SparsityConfig(storage="compact")``) arrive as
``values``, ``row_ptr`` and ``col_indices``: the same pre-hook turns those ``nn.Linear`` layers into compact layers
and swaps them into the policy's optimizers before SB3 loads their states
(:func:`~sparseapps.rl.compact.adopt_compact_layers`). Any policy class of any algorithm takes it, and its class
does not change.

``Algorithm.load(path)`` builds a fresh policy from ``model.policy_class``; :func:`sparse_policy_class` wraps that
class so that the policies it builds carry the hook, and the callback stores the wrapper in ``model.policy_class``
when it attaches, so ``SAC.load(path)`` restores the masks. The wrapper is what SB3 needs of a policy class (it is
called with the constructor's arguments, it has a ``__name__`` and a ``load``); it is not a subclass.

``SparseActorCriticPolicy``, ``SparseSACPolicy``, ``SparseTD3Policy``, ``SparseDQNPolicy`` and their Cnn /
MultiInput variants are kept as aliases of ``sparse_policy_class(<SB3 class>)``: ``PPO(SparseActorCriticPolicy,
env)`` works as before and models saved with them load. ``MaskAwarePolicy`` (the former mixin) is deprecated.

Example:
    >>> import torch
    >>> from stable_baselines3 import PPO
    >>> from sparseapps.core.masks import attach_mask
    >>> model = PPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[8]))
    >>> layer = model.policy.mlp_extractor.policy_net[0]
    >>> _ = attach_mask(layer, "weight", torch.rand(layer.weight.shape) < 0.5)
    >>> fresh = PPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[8]))
    >>> accept_masks(fresh.policy)
    >>> fresh.policy.load_state_dict(model.policy.state_dict())
    <All keys matched successfully>
    >>> bool((fresh.policy.mlp_extractor.policy_net[0].weight_mask == layer.weight_mask).all())
    True
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.dqn import policies as dqn_policies
from stable_baselines3.sac import policies as sac_policies
from stable_baselines3.td3 import policies as td3_policies
from torch import nn

from sparseapps.core.kernels import CondenseConfig, condense
from sparseapps.core.masks import MASK_SUFFIX, attach_mask, get_mask
from sparseapps.rl.compact import adopt_compact_layers

__all__ = ["SparsePolicyClass", "accept_masks", "adopt_masks", "condense_policy", "sparse_policy_class"]


def adopt_masks(module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Registers a mask buffer on ``module`` for every ``<prefix><path>.<param>_mask`` key of ``state_dict`` it
    lacks.

    Keys whose module or parameter does not exist are left alone (a strict ``load_state_dict`` reports them).

    Returns:
        the keys for which a buffer was created.
    """
    created = []
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not key.endswith(MASK_SUFFIX) or not isinstance(value, torch.Tensor):
            continue
        path, _, buffer_name = key[len(prefix) :].rpartition(".")
        param_name = buffer_name[: -len(MASK_SUFFIX)]
        try:
            owner = module.get_submodule(path) if path else module
        except AttributeError:
            continue
        param = owner._parameters.get(param_name)
        if param is None or get_mask(owner, param_name) is not None or value.shape != param.shape:
            continue
        attach_mask(owner, param_name, value)
        created.append(key)
    return created


def _adopt_before_load(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
    adopt_compact_layers(module, state_dict, prefix)
    adopt_masks(module, state_dict, prefix)


_ACCEPTING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def accept_masks(policy: nn.Module) -> None:
    """Makes ``policy.load_state_dict`` accept the mask buffers and compact layers a state dict carries (once per
    module)."""
    if not isinstance(policy, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (e.g. model.policy), got {type(policy).__name__}")
    if policy not in _ACCEPTING:
        policy.register_load_state_dict_pre_hook(_adopt_before_load)
        _ACCEPTING.add(policy)


@dataclass(frozen=True)
class SparsePolicyClass:
    """An SB3 policy class whose policies accept mask buffers: SB3 calls it as it calls a policy class.

    Attributes:
        policy_class: the SB3 policy class it builds.
    """

    policy_class: type[BasePolicy]

    def __call__(self, *args: Any, **kwargs: Any) -> BasePolicy:
        policy = self.policy_class(*args, **kwargs)
        accept_masks(policy)
        return policy

    @property
    def __name__(self) -> str:  # SB3 reads policy_class.__name__ (its MlpPolicy-on-GPU warning)
        return self.policy_class.__name__

    def load(self, path: str | Path, device: torch.device | str = "auto") -> BasePolicy:
        """``BasePolicy.load``: a policy saved with ``policy.save(path)``, masks included."""
        from stable_baselines3.common.utils import get_device

        device = get_device(device)
        # SB3's own format: its constructor arguments are pickled (weights_only=False), as BasePolicy.load reads it.
        saved = torch.load(path, map_location=device, weights_only=False)
        policy = self(**saved["data"])
        policy.load_state_dict(saved["state_dict"])
        return policy.to(device)


def sparse_policy_class(policy_class: type[BasePolicy] | SparsePolicyClass) -> SparsePolicyClass:
    """``policy_class`` wrapped so that the policies it builds accept mask buffers (itself if already wrapped).

    Raises:
        TypeError: ``policy_class`` is not an SB3 ``BasePolicy`` subclass.
    """
    if isinstance(policy_class, SparsePolicyClass):
        return policy_class
    if not isinstance(policy_class, type) or not issubclass(policy_class, BasePolicy):
        raise TypeError(f"expected a stable_baselines3 BasePolicy subclass, got {policy_class!r}")
    return SparsePolicyClass(policy_class)


# Aliases of the former subclasses: still accepted as policy classes, and what models saved with them reference.
SparseActorCriticPolicy = sparse_policy_class(ActorCriticPolicy)
SparseActorCriticCnnPolicy = sparse_policy_class(ActorCriticCnnPolicy)
SparseMultiInputActorCriticPolicy = sparse_policy_class(MultiInputActorCriticPolicy)
SparseSACPolicy = sparse_policy_class(sac_policies.SACPolicy)
SparseSACCnnPolicy = sparse_policy_class(sac_policies.CnnPolicy)
SparseSACMultiInputPolicy = sparse_policy_class(sac_policies.MultiInputPolicy)
SparseTD3Policy = sparse_policy_class(td3_policies.TD3Policy)
SparseTD3CnnPolicy = sparse_policy_class(td3_policies.CnnPolicy)
SparseTD3MultiInputPolicy = sparse_policy_class(td3_policies.MultiInputPolicy)
SparseDQNPolicy = sparse_policy_class(dqn_policies.DQNPolicy)
SparseDQNCnnPolicy = sparse_policy_class(dqn_policies.CnnPolicy)
SparseDQNMultiInputPolicy = sparse_policy_class(dqn_policies.MultiInputPolicy)


class _MaskAwarePolicy(nn.Module):
    """Deprecated mixin: a policy class built on it accepts masks through :func:`accept_masks`. Models saved with a
    ``Sparse<YourPolicy>`` class of an earlier sparseapps reference it, so they still load."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        accept_masks(self)


def __getattr__(name: str) -> Any:
    if name == "MaskAwarePolicy":
        warnings.warn(
            "sparseapps.rl.policies.MaskAwarePolicy is deprecated: policies accept masks through "
            "accept_masks(policy) or sparse_policy_class(PolicyClass), without a subclass",
            DeprecationWarning,
            stacklevel=2,
        )
        return _MaskAwarePolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def condense_policy(
    policy: BasePolicy, config: CondenseConfig | None = None, *, example_input: object = None
) -> BasePolicy:
    """An inference copy of a trained sparse policy whose masked layers run as condensed sparse kernels.

    The copy is rebuilt from the policy's constructor parameters and state dict (SB3 policies cache their last
    action distribution, which cannot be deep-copied), then passed to :func:`sparseapps.core.kernels.condense`.
    ``predict`` works as on the original and gives the same actions; the original is not modified.

    Args:
        policy: a trained policy, e.g. ``model.policy``.
        config: how layers are condensed (default: planned by measurement for batch sizes 1, 16 and 256).
        example_input: observations ``[B, obs_dim]`` to plan each layer for the batch it sees.

    Example:
        >>> from stable_baselines3 import PPO
        >>> model = PPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[16]))
        >>> layer = model.policy.mlp_extractor.policy_net[0]
        >>> _ = attach_mask(layer, "weight", torch.rand(layer.weight.shape) < 0.2)
        >>> fast = condense_policy(model.policy, CondenseConfig(planner="cost_model"))
        >>> observations = torch.rand(5, 4).numpy()
        >>> bool((fast.predict(observations, deterministic=True)[0]
        ...       == model.predict(observations, deterministic=True)[0]).all())
        True
    """
    if not isinstance(policy, BasePolicy):
        raise TypeError(
            f"policy must be a stable_baselines3 BasePolicy (model.policy), got {type(policy).__name__}"
        )
    copy = sparse_policy_class(type(policy))(**policy._get_constructor_parameters()).to(policy.device)
    copy.load_state_dict(policy.state_dict())
    copy.set_training_mode(False)
    return condense(copy, config, example_input=example_input)
