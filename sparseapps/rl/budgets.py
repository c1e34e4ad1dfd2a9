"""How the callback shares one sparsity budget among an agent's networks: each network's engine configuration and,
where the engine cannot draw them itself, its initial masks.

* Output layers are excluded (``dense_output_layers``), and so are weights another optimizer trains (SAC/TD3
  critics sharing the actor's features extractor).
* Each network gets the config's seed plus its index, so networks draw different masks.
* TD3's actor steps once every ``policy_delay`` gradient steps: its intervals are divided by that.
* ``critic_density_ratio = r`` gives critic weights ``r`` times the actor's density at the same total number of
  nonzeros. A network of one role gets its role's sparsity in its config; a network holding both (PPO / A2C) gets
  per-tensor budgets, drawn here as the engine draws them (uniform scores, top-k) since the engine takes one
  density per network.
* Masks a network already carries (a loaded sparse model: mask buffers, or compact layers' topologies) are kept; a configuration that would give another
  number of nonzeros is refused.

Example:
    >>> from stable_baselines3 import PPO
    >>> from sparseapps.core import SparsityConfig
    >>> from sparseapps.rl.networks import find_networks
    >>> (policy,) = find_networks(PPO("MlpPolicy", "CartPole-v1"))
    >>> config = network_config(SparsityConfig.preset("rigl", seed=3), policy, 0, dense_output_layers=True)
    >>> config.exclude, config.seed
    (('action_net.weight', 'value_net.weight'), 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparseapps.core import SparsityConfig, rules, select_tensors, target_nnz
from sparseapps.core.compact import CompactLinear
from sparseapps.core.masks import get_mask
from sparseapps.core.selection import tensor_shape
from sparseapps.rl.networks import SparseNetwork

__all__ = ["Plan", "network_config", "plan_networks", "role_densities"]

# network name -> (its engine's configuration, initial masks or None for the engine's own draw)
Plan = dict[str, tuple[SparsityConfig, dict[str, torch.Tensor] | None]]
Selected = list[tuple[str, nn.Module, str, str]]


def network_config(
    config: SparsityConfig, network: SparseNetwork, index: int, *, dense_output_layers: bool
) -> SparsityConfig:
    """The engine configuration of the ``index``-th network: outputs and foreign weights excluded, seed and
    intervals adapted (see the module docstring)."""
    excluded = list(config.exclude)
    if dense_output_layers:
        excluded += network.output_layers
    narrowed = config.replace(exclude=tuple(excluded))
    owned = {id(p) for group in network.optimizer.param_groups for p in group["params"]}
    foreign = [
        fqn
        for fqn, module, name, _ in select_tensors(network.network, narrowed)
        if id(getattr(module, name)) not in owned
    ]
    changes: dict[str, Any] = {"exclude": tuple(excluded + foreign)}
    if network.interval_divisor > 1:
        changes["update_interval"] = max(1, config.update_interval // network.interval_divisor)
        changes["pruning_interval"] = max(1, config.pruning_interval // network.interval_divisor)
    if config.seed is not None:
        changes["seed"] = config.seed + index
    return narrowed.replace(**changes)


def role_densities(config: SparsityConfig, ratio: float, sizes: Mapping[str, int]) -> dict[str, float]:
    """Actor and critic densities with ``critic = ratio * actor`` and the config's density over both.

    Raises:
        ValueError: the ratio asks for a density above 1.
    """
    density = config.density
    actor = density * (sizes["actor"] + sizes["critic"]) / (sizes["actor"] + ratio * sizes["critic"])
    critic = ratio * actor
    if critic > 1.0 + 1e-12 or actor > 1.0 + 1e-12:
        raise ValueError(
            f"critic_density_ratio={ratio} at sparsity {config.sparsity} asks for density "
            f"{max(actor, critic):.3f} > 1 (actor {actor:.3f}, critic {critic:.3f}); lower the ratio"
        )
    return {"actor": min(actor, 1.0), "critic": min(critic, 1.0)}


def plan_networks(
    networks: Sequence[SparseNetwork],
    config: SparsityConfig,
    *,
    critic_density_ratio: float,
    dense_output_layers: bool,
    resuming: bool,
) -> Plan:
    """Per network: its engine's configuration and initial masks (see the module docstring).

    Raises:
        ValueError: a network with nothing to sparsify, a ratio that needs density above 1, masks the networks
            already carry that another configuration made.
    """
    selected: dict[str, Selected] = {}
    base: dict[str, SparsityConfig] = {}
    for index, network in enumerate(networks):
        own = network_config(config, network, index, dense_output_layers=dense_output_layers)
        chosen = select_tensors(network.network, own)
        if not chosen:
            raise ValueError(
                f"{network.name} has no weight to sparsify besides its output layers "
                f"{list(network.output_layers)}; give it hidden layers (net_arch) or pass "
                "dense_output_layers=False"
            )
        base[network.name], selected[network.name] = own, chosen
    sizes = {"actor": 0, "critic": 0}
    for network in networks:
        for fqn, module, name, _ in selected[network.name]:
            sizes[network.role_of(fqn)] += math.prod(tensor_shape(module, name))
    densities = role_densities(config, critic_density_ratio, sizes)

    plan: Plan = {}
    for network in networks:
        own, chosen = base[network.name], selected[network.name]
        roles = {network.role_of(fqn) for fqn, *_ in chosen}
        budgets: dict[str, int] | None = None
        if critic_density_ratio != 1.0 and len(roles) == 1:
            own = own.replace(sparsity=round(1.0 - densities[roles.pop()], 12))
        elif critic_density_ratio != 1.0:
            if own.method not in ("dst", "static"):
                raise ValueError(
                    f"critic_density_ratio={critic_density_ratio} with {network.name} holding actor and critic "
                    f"weights needs a method that starts sparse ('dst' or 'static'), got {own.method!r}"
                )
            budgets = {}
            for role in ("actor", "critic"):
                shapes = {fqn: tensor_shape(m, n) for fqn, m, n, _ in chosen if network.role_of(fqn) == role}
                if shapes:
                    budgets |= target_nnz(shapes, densities[role], own.distribution)
        plan[network.name] = (own, _initial_masks(network.name, own, chosen, budgets, resuming))
    return plan


def _initial_masks(
    name: str,
    config: SparsityConfig,
    chosen: Selected,
    budgets: dict[str, int] | None,
    resuming: bool,
) -> dict[str, torch.Tensor] | None:
    existing = {
        fqn: module.mask() if isinstance(module, CompactLinear) else get_mask(module, param)
        for fqn, module, param, _ in chosen
    }
    carried = {fqn: mask.detach().clone() for fqn, mask in existing.items() if mask is not None}
    if carried and len(carried) < len(existing):
        missing = sorted(set(existing) - set(carried))
        raise ValueError(
            f"{name} already carries masks on {sorted(carried)} but not on {missing}: it was made sparse with "
            "another configuration (another exclude, output-layer or distribution setting)"
        )
    if carried:
        if config.method in ("dst", "static") and not resuming:
            shapes = {fqn: tensor_shape(m, n) for fqn, m, n, _ in chosen}
            expected = sum((budgets or target_nnz(shapes, config.density, config.distribution)).values())
            found = sum(int(mask.sum()) for mask in carried.values())
            if found != expected:
                raise ValueError(
                    f"{name} already carries masks with {found} nonzeros, but this configuration (sparsity "
                    f"{config.sparsity}, {config.distribution}) gives {expected}: the model was made sparse with "
                    "another configuration"
                )
        return carried
    if budgets is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,))))
    masks = {}
    for fqn, module, param, _ in chosen:
        shape = tensor_shape(module, param)
        scores = torch.rand(shape, generator=generator)
        masks[fqn] = rules.select_top(scores, torch.ones(shape, dtype=torch.bool), budgets[fqn])
    return masks
