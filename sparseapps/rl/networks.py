"""The networks of an SB3 agent that sparse training attaches to, the optimizer steps each takes, and their FLOPs.

=========  ==========================================  ==========================  =====================
algorithm  network (optimizer)                         target kept in sync         output layers
=========  ==========================================  ==========================  =====================
PPO, A2C   ``policy`` (``policy.optimizer``)           none                        ``action_net``, ``value_net``
SAC        ``actor`` (``actor.optimizer``)             none                        ``mu``, ``log_std``
           ``critic`` (``critic.optimizer``)           ``critic_target``           last layer of each Q head
TD3, DDPG  ``actor`` (``actor.optimizer``)             ``actor_target``            last layer of ``mu``
           ``critic`` (``critic.optimizer``)           ``critic_target``           last layer of each Q head
DQN        ``q_net`` (``policy.optimizer``)            ``q_net_target``            last layer of ``q_net``
=========  ==========================================  ==========================  =====================

Example:
    >>> from stable_baselines3 import SAC
    >>> [(n.name, n.target is not None) for n in find_networks(SAC("MlpPolicy", "Pendulum-v1"))]
    [('actor', False), ('critic', True)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import TrainFrequencyUnit
from torch import nn

from sparseapps.core import DynamicSparsity
from sparseapps.core.accounting import forward_flops, training_flops_per_step
from sparseapps.core.compact import CompactLinear
from sparseapps.core.masks import attach_mask

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "SparseNetwork",
    "copy_masks_to_target",
    "count_optimizer_steps",
    "find_networks",
    "training_flops",
]

SUPPORTED_ALGORITHMS = ("PPO", "A2C", "SAC", "TD3", "DDPG", "DQN")

Role = Literal["actor", "critic", "mixed"]

# PPO / A2C: weights of the value branch (with share_features_extractor=False the value net's own extractor).
_VALUE_PREFIXES = ("mlp_extractor.value_net.", "value_net.", "vf_features_extractor.")


@dataclass(frozen=True)
class SparseNetwork:
    """One network the callback sparsifies.

    Attributes:
        name: ``"policy"``, ``"actor"``, ``"critic"`` or ``"q_net"``.
        network: the online module.
        optimizer: the optimizer that steps it (and only it).
        target: its Polyak-averaged copy, or None.
        output_layers: fqns (relative to ``network``) of the output layers' weights.
        role: ``"actor"`` or ``"critic"`` for every weight, or ``"mixed"`` (PPO / A2C: see :meth:`role_of`).
        interval_divisor: optimizer steps per ``update_interval`` gradient steps are divided by this (TD3's
            ``policy_delay`` for its actor, 1 otherwise).
    """

    name: str
    network: nn.Module
    optimizer: torch.optim.Optimizer
    target: nn.Module | None
    output_layers: tuple[str, ...]
    role: Role
    interval_divisor: int = 1

    def role_of(self, fqn: str) -> Literal["actor", "critic"]:
        """Whether weight ``fqn`` belongs to the actor or the critic (value function)."""
        if self.role != "mixed":
            return self.role
        return "critic" if fqn.startswith(_VALUE_PREFIXES) else "actor"


def _linear_weights(module: nn.Module, prefix: str) -> tuple[str, ...]:
    return tuple(
        f"{prefix}.{name}.weight" if name else f"{prefix}.weight"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear | CompactLinear)
    )


def check_algorithm(model: object) -> None:
    """Raises ``TypeError`` unless ``model`` is one of :data:`SUPPORTED_ALGORITHMS`."""
    if not isinstance(model, PPO | A2C | SAC | TD3 | DQN):
        raise TypeError(
            f"DynamicSparsityCallback supports {', '.join(SUPPORTED_ALGORITHMS)}, got {type(model).__name__}"
        )


def find_networks(model: BaseAlgorithm) -> list[SparseNetwork]:
    """The (network, optimizer, target) triples of an SB3 model, as the module docstring's table lists them.

    Raises:
        TypeError: an algorithm other than PPO, A2C, SAC, TD3, DDPG or DQN, or a policy of another shape.
    """
    check_algorithm(model)
    policy = model.policy
    if isinstance(model, PPO | A2C):
        if not isinstance(policy, ActorCriticPolicy):
            raise TypeError(
                f"{type(model).__name__} with a {type(policy).__name__} is not supported: expected an "
                "ActorCriticPolicy (MlpPolicy, CnnPolicy, MultiInputPolicy or a subclass)"
            )
        outputs = _linear_weights(policy.action_net, "action_net") + _linear_weights(
            policy.value_net, "value_net"
        )
        return [SparseNetwork("policy", policy, policy.optimizer, None, outputs, "mixed")]
    if isinstance(model, DQN):
        q_net = policy.q_net
        outputs = _linear_weights(q_net.q_net, "q_net")[-1:]
        return [SparseNetwork("q_net", q_net, policy.optimizer, policy.q_net_target, outputs, "critic")]
    actor, critic = policy.actor, policy.critic
    critic_outputs = tuple(
        weight
        for index, q in enumerate(critic.q_networks)
        for weight in _linear_weights(q, f"qf{index}")[-1:]
    )
    critic_network = SparseNetwork(
        "critic", critic, critic.optimizer, policy.critic_target, critic_outputs, "critic"
    )
    if isinstance(model, SAC):
        outputs = _linear_weights(actor.mu, "mu")
        if isinstance(actor.log_std, nn.Module):
            outputs += _linear_weights(actor.log_std, "log_std")
        return [SparseNetwork("actor", actor, actor.optimizer, None, outputs, "actor"), critic_network]
    actor_outputs = _linear_weights(actor.mu, "mu")[-1:]
    actor_network = SparseNetwork(
        "actor",
        actor,
        actor.optimizer,
        policy.actor_target,
        actor_outputs,
        "actor",
        interval_divisor=model.policy_delay,
    )
    return [actor_network, critic_network]


def copy_masks_to_target(network: SparseNetwork, masks: Mapping[str, torch.Tensor]) -> None:
    """Gives the target network the online network's topology ``masks`` (``{fqn: bool mask}``).

    A masked layer's mask goes into the target's mask buffer and its masked weights are zeroed. Where the online
    layer is compact, the target's layer becomes (or is re-packed as) a compact layer of the same mask: kept entries
    keep their values, new ones start at zero (:mod:`sparseapps.rl.compact`).

    Raises:
        ValueError: the target has no parameter of that name and shape.
    """
    if network.target is None:
        raise ValueError(f"{network.name} has no target network")
    for fqn, mask in masks.items():
        path, _, param_name = fqn.rpartition(".")
        try:
            module = network.target.get_submodule(path) if path else network.target
        except AttributeError as error:
            raise ValueError(
                f"{network.name}: the target network has no module {path!r} to carry {fqn!r}"
            ) from error
        online = network.network.get_submodule(path) if path else network.network
        if isinstance(online, CompactLinear):
            if isinstance(module, nn.Linear) and module.weight.shape == mask.shape:
                module = CompactLinear.from_linear(module, mask)
                network.target.set_submodule(path, module)
            elif isinstance(module, CompactLinear) and module.weight_shape == mask.shape:
                module.set_mask(mask)
            else:
                raise ValueError(
                    f"{network.name}: the target's {path!r} must be a Linear layer of weight shape "
                    f"{tuple(mask.shape)} to follow the online compact layer, got {type(module).__name__}"
                )
            continue
        weight = getattr(module, param_name, None)
        if not isinstance(weight, nn.Parameter) or weight.shape != mask.shape:
            raise ValueError(
                f"{network.name}: the target's {fqn!r} must be a parameter of shape {tuple(mask.shape)}, got "
                f"{None if weight is None else tuple(weight.shape)}"
            )
        attach_mask(module, param_name, mask)


def count_optimizer_steps(model: BaseAlgorithm, total_timesteps: int) -> dict[str, int]:
    """Steps each network's optimizer takes while ``model`` trains from ``model.num_timesteps`` to
    ``total_timesteps`` (the absolute count, as ``learn`` computes it), following SB3 2.9's training loops.

    * PPO: ``n_epochs * ceil(n_steps * n_envs / batch_size)`` per rollout (an upper bound with ``target_kl``);
      A2C: one per rollout; rollouts: ``ceil(remaining / (n_steps * n_envs))``.
    * Off-policy: a rollout collects ``train_freq * n_envs`` steps; ``train`` runs after each rollout that ends
      past ``learning_starts``, with ``gradient_steps`` steps (``-1``: as many as collected). TD3's actor steps
      on the gradient steps whose global count is a multiple of ``policy_delay``.

    Example:
        >>> from stable_baselines3 import TD3
        >>> model = TD3("MlpPolicy", "Pendulum-v1", learning_starts=100, train_freq=4, gradient_steps=2)
        >>> count_optimizer_steps(model, 1000)  # rollouts end at 4, 8, ..., 1000; 225 of them after 100
        {'actor': 225, 'critic': 450}

    Raises:
        ValueError: ``train_freq`` counted in episodes (the number of gradient steps is not known in advance).
    """
    check_algorithm(model)
    start = model.num_timesteps
    remaining = max(int(total_timesteps) - start, 0)
    if isinstance(model, OnPolicyAlgorithm):
        rollout = model.n_steps * model.n_envs
        rollouts = math.ceil(remaining / rollout)
        per_rollout = model.n_epochs * math.ceil(rollout / model.batch_size) if isinstance(model, PPO) else 1
        return {"policy": rollouts * per_rollout}
    train_freq = model.train_freq
    if train_freq.unit != TrainFrequencyUnit.STEP:  # type: ignore[union-attr]
        raise ValueError(
            f"train_freq counted in episodes ({train_freq!r}) gives a number of gradient steps that is not "
            "known before training; expected train_freq in steps, e.g. train_freq=1"
        )
    rollout = train_freq.frequency * model.n_envs  # type: ignore[union-attr]
    rollouts = math.ceil(remaining / rollout)
    # Rollout k (1-based) ends at start + k * rollout; SB3 trains after it when that exceeds learning_starts.
    first_trained = max(1, (model.learning_starts - start) // rollout + 1)
    trained_rollouts = max(0, rollouts - first_trained + 1)
    per_rollout = model.gradient_steps if model.gradient_steps >= 0 else rollout
    gradient_steps = trained_rollouts * per_rollout
    if isinstance(model, DQN):
        return {"q_net": gradient_steps}
    if isinstance(model, SAC):
        return {"actor": gradient_steps, "critic": gradient_steps}
    done, delay = model._n_updates, model.policy_delay
    return {"actor": (done + gradient_steps) // delay - done // delay, "critic": gradient_steps}


def training_flops(
    engines: Mapping[str, DynamicSparsity], networks: Mapping[str, SparseNetwork]
) -> dict[str, float]:
    """Training FLOPs per sample per gradient step, dense vs sparse, over every network.

    Each online network costs a forward and a backward of twice its cost (three forwards, RigL's count, plus a
    dense weight gradient every ``update_interval`` steps when the engine's criteria read the dense gradient);
    each target network a forward. Dense (output) layers count in full in both. This is the per-network cost,
    not SAC's exact schedule of forwards (which runs the actor twice per step).

    Returns:
        ``{"dense": FLOPs, "sparse": FLOPs, "ratio": sparse / dense}``.
    """
    dense = sparse = 0.0
    for name, engine in engines.items():
        network = networks[name]
        forward_dense = forward_sparse = 0
        sparse_ids = {id(t.param): t for t in engine.tensors.values()}
        for module in network.network.modules():
            if isinstance(module, CompactLinear):
                kind, shape, weight = "linear", tuple(module.weight_shape), module.values
            elif isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and isinstance(
                module.weight, nn.Parameter
            ):
                kind = "linear" if isinstance(module, nn.Linear) else "conv"
                shape, weight = tuple(module.weight.shape), module.weight
            else:
                continue
            record = sparse_ids.get(id(weight))
            positions = record.positions if record is not None else 1
            numel = math.prod(shape)
            nnz = int(record.mask.sum()) if record is not None else numel
            forward_dense += forward_flops(kind, shape, numel, positions)
            forward_sparse += forward_flops(kind, shape, nnz, positions)
        config = engine.config
        step_dense, step_sparse = training_flops_per_step(
            forward_dense,
            forward_sparse,
            config.update_interval if config.dynamic else None,
            engine.needs_dense_gradient(),
        )
        target = 1 if network.target is not None else 0
        dense += step_dense + target * forward_dense
        sparse += step_sparse + target * forward_sparse
    return {"dense": dense, "sparse": sparse, "ratio": sparse / dense}
