"""Compact storage for SB3 agents: the sparse Linear layers of a network become
:class:`~sparseapps.core.compact.CompactLinear` layers, inside the optimizer SB3 already built for them.

SB3 builds each optimizer in the policy's constructor (``_build``, ``make_actor`` / ``make_critic``), before the
algorithm, its networks' sparsity budgets or the callback exist. So the layers are converted when the callback
attaches (with the masks the engine would draw: :func:`~sparseapps.core.to_compact` over the network's own
configuration, or the callback's planned masks), and each optimizer is then **edited in place**: the Linear's
``weight`` and ``bias`` are replaced by the compact layer's ``values`` and ``bias`` at the same positions of the
same parameter groups. The optimizer object, its class, hyperparameters, learning-rate schedule (SB3 rewrites
``param_groups[i]["lr"]``) and the order SB3's saved optimizer states are matched by stay what SB3 made; an
optimizer state already held for a replaced weight (a masked model switched to compact) moves to its active
entries. Rebuilding the optimizer instead would need its class and arguments back from the policy, and every
alias SB3 keeps of it (``model.actor.optimizer`` ...) re-pointed.

Targets (SAC / TD3 / DQN) get compact layers of the online network's topology
(:func:`~sparseapps.rl.networks.copy_masks_to_target`), and every topology update re-packs them with the same
mask: kept entries keep their (Polyak-averaged) values, grown ones start at zero, so SB3's ``polyak_update`` over
``parameters()`` pairs ``values`` tensors of equal topology, as it pairs masked dense weights.

Loading (``Algorithm.load``, ``policy.load_state_dict``): :func:`adopt_compact_layers`, called by the policies'
load pre-hook (:mod:`sparseapps.rl.policies`), turns each ``nn.Linear`` whose incoming state holds compact keys
(``values``, ``row_ptr``, ``col_indices``) into a compact layer and swaps it into the policy's optimizers before
SB3 loads their states.

Example:
    >>> from stable_baselines3 import SAC
    >>> from sparseapps.core import SparsityConfig
    >>> from sparseapps.rl import DynamicSparsityCallback
    >>> model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=32, batch_size=32, seed=0,
    ...             policy_kwargs=dict(net_arch=[64, 64]))
    >>> config = SparsityConfig.preset("rigl", sparsity=0.9, update_interval=10, storage="compact")
    >>> _ = model.learn(64, callback=DynamicSparsityCallback(config))
    >>> layer, target = model.critic.qf0[2], model.critic_target.qf0[2]
    >>> type(layer).__name__, layer.nnz, torch.equal(layer.mask(), target.mask())
    ('CompactLinear', 284, True)
    >>> any(p is layer.values for p in model.critic.optimizer.param_groups[0]["params"])
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sparseapps.core import SparsityConfig, to_compact
from sparseapps.core.compact import CompactLinear

__all__ = [
    "adopt_compact_layers",
    "clear_captured_gradients",
    "compact_layers",
    "make_compact",
    "swap_parameter",
]

# The keys a CompactLinear's state dict holds besides its bias.
COMPACT_KEYS = ("values", "row_ptr", "col_indices")


def compact_layers(module: nn.Module) -> dict[str, CompactLinear]:
    """``{weight fqn: layer}`` of the compact layers of ``module`` (``"<path>.weight"``, as the engine names them)."""
    return {
        f"{name}.weight" if name else "weight": sub
        for name, sub in module.named_modules()
        if isinstance(sub, CompactLinear)
    }


def swap_parameter(
    optimizers: Iterable[torch.optim.Optimizer],
    old: nn.Parameter,
    new: nn.Parameter,
    mask: torch.Tensor | None = None,
) -> None:
    """Puts ``new`` where ``old`` stands in each optimizer's parameter groups, with ``old``'s state.

    Args:
        optimizers: the optimizers to edit (those that do not hold ``old`` are left alone).
        old: the parameter replaced, e.g. a Linear's ``weight [out, in]``.
        new: its replacement, e.g. the compact layer's ``values [nnz]``.
        mask: ``[out, in]`` bool, the entries of ``old`` that ``new`` holds in row-major order; per-entry state
            (Adam's moments, SGD's momentum) is gathered at it. None: ``new`` has ``old``'s shape.
    """
    for optimizer in optimizers:
        held = False
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index] = new
                    held = True
        state = optimizer.state.pop(old, None) if held else None
        if state:
            optimizer.state[new] = {
                key: value[mask] if mask is not None and _entrywise(value, old) else value
                for key, value in state.items()
            }


def _entrywise(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _replace_linear(
    root: nn.Module, path: str, mask: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer]
) -> CompactLinear:
    """``root.<path>`` (an ``nn.Linear``) as a compact layer of ``mask``, swapped into ``optimizers``."""
    linear = root.get_submodule(path)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear at {path!r}, got {type(linear).__name__}")
    layer = CompactLinear.from_linear(linear, mask)
    root.set_submodule(path, layer)
    optimizers = list(optimizers)
    swap_parameter(optimizers, linear.weight, layer.values, mask.to(linear.weight.device))
    if linear.bias is not None and layer.bias is not None:
        swap_parameter(optimizers, linear.bias, layer.bias)
    return layer


def make_compact(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: SparsityConfig,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, CompactLinear]:
    """Turns the Linear layers ``config`` sparsifies in ``network`` into compact layers, inside ``optimizer``.

    Args:
        network: the online network (converted in place).
        optimizer: the optimizer SB3 built for it; its parameters are swapped (:func:`swap_parameter`).
        config: the network's engine configuration, ``storage="compact"``.
        masks: ``{fqn: [out, in] bool}`` to start from (the callback's planned or carried masks). None: the
            masks ``DynamicSparsity(network, optimizer, config, ...)`` draws, via ``to_compact(network, config)``.
            Layers already compact are kept as they are.

    Returns:
        ``{fqn: layer}`` of every compact layer of ``network``.

    Raises:
        ValueError: ``config.storage`` is not ``"compact"``.
    """
    if config.storage != "compact":
        raise ValueError(f"make_compact expects a config with storage='compact', got {config.storage!r}")
    if masks is not None:
        for fqn, mask in masks.items():
            path = fqn.removesuffix("weight").removesuffix(".")
            if isinstance(network.get_submodule(path), nn.Linear):
                _replace_linear(network, path, mask, [optimizer])
        return compact_layers(network)
    linears = {name: sub for name, sub in network.named_modules() if isinstance(sub, nn.Linear)}
    to_compact(network, config)
    for name, linear in linears.items():
        layer = network.get_submodule(name)
        if isinstance(layer, CompactLinear):
            swap_parameter([optimizer], linear.weight, layer.values, layer.mask())
            if linear.bias is not None and layer.bias is not None:
                swap_parameter([optimizer], linear.bias, layer.bias)
    return compact_layers(network)


def clear_captured_gradients(layers: Iterable[CompactLinear], *_: Any) -> None:
    """Drops the dense gradients ``layers`` captured so far: an optimizer step post-hook of *another* network.

    Before a growth-by-gradient update a compact layer adds up ``dy^T x`` over every backward pass it takes part
    in, from the engine's step before until its own optimizer's next step. A masked weight's ``.grad`` counts
    only the backward passes since its optimizer's ``zero_grad``. In SAC and TD3 the actor's loss also
    backpropagates through the critic, after the critic's step; so after each step of another network's
    optimizer the callback clears what this network's layers captured, and a capture holds, as ``.grad`` does,
    only this network's own loss.
    """
    for layer in layers:
        layer.dense_grad = None


def adopt_compact_layers(module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Turns each ``nn.Linear`` of ``module`` whose entry in ``state_dict`` is a compact layer's into a compact
    layer, swapped into the optimizers ``module`` holds (SB3's ``policy.optimizer``, ``actor.optimizer``, ...).

    The layer is created empty: the load that follows gives it the saved topology and values (and checks its
    structure), and SB3 then loads the optimizers' states, which now match the ``values`` sizes.

    Returns:
        the paths (relative to ``module``) of the layers converted.
    """
    paths = {
        key[len(prefix) :].rpartition(".")[0]
        for key in state_dict
        if key.startswith(prefix) and key.endswith(".values")
    }
    optimizers = [
        sub.optimizer
        for sub in module.modules()
        if isinstance(getattr(sub, "optimizer", None), torch.optim.Optimizer)
    ]
    converted = []
    for path in sorted(paths):
        if not all(f"{prefix}{path}.{key}" in state_dict for key in COMPACT_KEYS):
            continue
        try:
            linear = module.get_submodule(path)
        except AttributeError:
            continue  # a strict load reports the unexpected keys
        if not isinstance(linear, nn.Linear):
            continue
        empty = torch.zeros(linear.weight.shape, dtype=torch.bool, device=linear.weight.device)
        _replace_linear(module, path, empty, optimizers)
        converted.append(path)
    return converted
