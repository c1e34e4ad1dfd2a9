"""`DynamicSparsityCallback`: sparse training from scratch for any SB3 algorithm in one line.

When training starts, the callback attaches one :class:`~sparseapps.core.DynamicSparsity` engine per (network,
optimizer) pair and keeps books; every drop and grow, the masking of gradients before each optimizer step, the
capture of dense gradients and the check of a checkpoint's configuration are the engine's.

* **Gradient steps, not env steps**: each engine's ``total_steps`` is what its optimizer takes during ``learn``
  (:mod:`sparseapps.rl.networks`); budgets, seeds and TD3's intervals per network: :mod:`sparseapps.rl.budgets`.
* **Each engine re-masks only its own parameters, right after its own optimizer's step**: SAC builds the actor's
  graph before the critic's step, so re-masking every network after any step would modify tensors autograd saved.
* **Gradients are also masked during backward**, so SB3's ``clip_grad_norm_`` (PPO, A2C, DQN) measures the sparse
  gradient, except where the engine reads them dense: the update steps of criteria that declare ``"grad"`` in the
  score registry, and every step when it tracks a dense-gradient momentum.
* **Targets carry the online masks**: a commit hook of the engine copies each new topology into the target's mask
  buffers and zeroes its masked weights; a Polyak update keeps exact zeros where both are zero.
* **Compact storage** (``SparsityConfig(storage="compact")``): when it attaches, the callback turns each network's
  sparse Linear layers (and its target's) into :class:`~sparseapps.core.compact.CompactLinear` layers inside the
  optimizers SB3 built (:mod:`sparseapps.rl.compact`); the same engines then drive them, from the same masks for
  the same seed, re-packing values and optimizer states at each update, and the targets are re-packed with them.
* **Save / load**: masks are buffers in ``policy.state_dict()`` (compact layers hold their topology as index
  buffers); the policy and ``model.policy_class`` accept both on load (:mod:`sparseapps.rl.policies`), so
  ``Algorithm.load(path)`` restores them and a later ``learn`` with a callback continues from them.

Example:
    >>> from stable_baselines3 import PPO
    >>> from sparseapps.core import SparsityConfig
    >>> model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0)
    >>> callback = DynamicSparsityCallback(SparsityConfig.preset("rigl", sparsity=0.9, update_interval=2))
    >>> _ = model.learn(128, callback=callback)
    >>> engine = callback.engines["policy"]
    >>> engine.total_steps, round(engine.density, 3), len(engine.history) > 0
    (8, 0.1, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from torch.utils.hooks import RemovableHandle

from sparseapps.core import ConfigMismatchError, DynamicSparsity, SparsityConfig, SparsityReport, schedules
from sparseapps.core.config import FORESIGHT_METHODS
from sparseapps.core.validation import check_bool, check_number
from sparseapps.rl.budgets import plan_networks
from sparseapps.rl.compact import clear_captured_gradients, compact_layers, make_compact
from sparseapps.rl.networks import (
    SUPPORTED_ALGORITHMS,
    SparseNetwork,
    check_algorithm,
    copy_masks_to_target,
    count_optimizer_steps,
    find_networks,
    training_flops,
)
from sparseapps.rl.policies import accept_masks, sparse_policy_class

__all__ = [
    "CALLBACK_METHODS",
    "SUPPORTED_ALGORITHMS",
    "DynamicSparsityCallback",
    "SparseNetwork",
    "count_optimizer_steps",
    "find_networks",
]

CALLBACK_METHODS = ("dst", "static", "gmp", "one_shot")
STATE_VERSION = 1


def _sparse_gradient(engine: DynamicSparsity, mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A gradient tensor hook: ``grad`` masked, unless the engine reads it dense at its next step."""
    if grad.is_sparse or (
        engine.needs_dense_gradient()
        and schedules.is_update_step(engine.step + 1, engine.config, engine.total_steps)
    ):
        return grad
    return grad * mask


class DynamicSparsityCallback(BaseCallback):
    """Trains an SB3 agent's networks sparse, with topology updates counted in gradient steps.

    Args:
        config: the sparse-training configuration, e.g. ``SparsityConfig.preset("rigl", sparsity=0.9)``; any
            criterion of the score registry works. Methods ``dst`` and ``static`` train sparse from scratch;
            ``gmp`` and ``one_shot`` prune a dense start. Pruning at initialization (``snip``, ``grasp``,
            ``synflow``) and ``lottery`` need data or retraining rounds the callback cannot provide.
        critic_density_ratio: density of critic (value) weights relative to actor weights, at the same total
            number of nonzeros; 1 gives every network the config's sparsity.
        dense_output_layers: keep the output layers (see :mod:`sparseapps.rl.networks`) dense.
        verbose: SB3 verbosity; 1 prints a sparsity table when training starts.

    Attributes:
        engines: ``{network name: DynamicSparsity}`` of the last ``learn`` call.
        networks: ``{network name: SparseNetwork}``.
    """

    def __init__(
        self,
        config: SparsityConfig,
        *,
        critic_density_ratio: float = 1.0,
        dense_output_layers: bool = True,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
        if config.method not in CALLBACK_METHODS:
            reason = (
                "prunes at initialization from a batch of data"
                if config.method in FORESIGHT_METHODS
                else "needs retraining rounds"
            )
            raise ValueError(
                f"method {config.method!r} {reason}, which the callback cannot provide; expected one of "
                f"{', '.join(map(repr, CALLBACK_METHODS))}"
            )
        self.config = config
        self.critic_density_ratio = check_number(
            "critic_density_ratio", critic_density_ratio, low=0.0, low_open=True
        )
        self.dense_output_layers = check_bool("dense_output_layers", dense_output_layers)
        self.engines: dict[str, DynamicSparsity] = {}
        self.networks: dict[str, SparseNetwork] = {}
        self._pending: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []
        self._logged_updates: dict[str, int] = {}

    # ------------------------------------------------------------------ SB3 events
    def _init_callback(self) -> None:
        check_algorithm(self.model)

    def _on_training_start(self) -> None:
        self.attach(self.model, self.model._total_timesteps)
        if self.verbose:
            for name, engine in self.engines.items():
                print(f"{name}: {engine.total_steps} optimizer steps\n{engine.report()}")

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        for name, engine in self.engines.items():
            if len(engine.history) == self._logged_updates.get(name, 0):
                continue
            self._logged_updates[name] = len(engine.history)
            last = engine.history[-1]["tensors"].values()
            changed = sum(t["dropped"] + t["grown"] for t in last)
            active = sum(t["nnz"] for t in last)
            self.logger.record(f"sparsity/{name}_density", engine.density)
            self.logger.record(f"sparsity/{name}_turnover", changed / (2 * active) if active else 0.0)
            self.logger.record(f"sparsity/{name}_updates", len(engine.history))

    def _on_training_end(self) -> None:
        self.detach()

    # ------------------------------------------------------------------ attaching
    def attach(self, model: BaseAlgorithm, total_timesteps: int) -> dict[str, DynamicSparsity]:
        """Builds the engines for training ``model`` up to ``total_timesteps`` (called when training starts).

        Starts from the masks the policy already carries (a loaded sparse model), from a state given to
        :meth:`load_state_dict` (a checkpoint, whose configuration each engine checks), or from fresh random masks.
        """
        self.detach()
        networks = find_networks(model)
        totals = count_optimizer_steps(model, total_timesteps)
        pending, self._pending = self._pending, None
        if pending is not None and set(pending) != {n.name for n in networks}:
            raise ValueError(
                f"checkpoint has engines {sorted(pending)}, but {type(model).__name__} has "
                f"{sorted(n.name for n in networks)}: it comes from another algorithm"
            )
        plan = plan_networks(
            networks,
            self.config,
            critic_density_ratio=self.critic_density_ratio,
            dense_output_layers=self.dense_output_layers,
            resuming=pending is not None,
        )
        self.networks, self.engines = {}, {}
        for network in networks:
            config, initial_masks = plan[network.name]
            done = int(pending[network.name]["step"]) if pending is not None else 0
            total = max(done + totals[network.name], 1)
            if config.storage == "compact":
                make_compact(network.network, network.optimizer, config, initial_masks)
            try:
                engine = DynamicSparsity(
                    network.network, network.optimizer, config, total, initial_masks=initial_masks
                )
                if pending is not None:
                    engine.load_state_dict(pending[network.name])
            except ValueError as error:
                for built in self.engines.values():
                    built.remove()
                kind = ConfigMismatchError if isinstance(error, ConfigMismatchError) else ValueError
                raise kind(f"{type(model).__name__}.{network.name}: {error}") from error
            self.networks[network.name], self.engines[network.name] = network, engine
            self._logged_updates[network.name] = len(engine.history)
            if network.target is not None:
                sync = partial(copy_masks_to_target, network)
                sync(engine.masks)
                engine.commit_hooks.append(sync)
            if not engine.momentum:  # a dense-gradient momentum reads every gradient whole
                for param, mask in engine.masked_parameters():  # compact layers' gradients are sparse already
                    hook = partial(_sparse_gradient, engine, mask)
                    self._handles.append(param.register_hook(hook))
        for name, engine in self.engines.items():
            layers = list(compact_layers(self.networks[name].network).values())
            if layers and engine.needs_dense_gradient():
                clear = partial(clear_captured_gradients, layers)
                for other in self.networks.values():
                    if other.name != name:
                        self._handles.append(other.optimizer.register_step_post_hook(clear))
        accept_masks(model.policy)
        model.policy_class = sparse_policy_class(model.policy_class)
        return self.engines

    def detach(self) -> None:
        """Removes every hook; masks stay in the networks as buffers and weights keep their zeros."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for engine in self.engines.values():
            engine.remove()

    # ------------------------------------------------------------------ reports and checkpoints
    def report(self) -> dict[str, SparsityReport]:
        """Per network: shape, nnz, density, forward FLOPs and (dynamic runs) ITOP rate of each sparse tensor."""
        return {name: engine.report() for name, engine in self.engines.items()}

    def training_flops(self) -> dict[str, float]:
        """Training FLOPs per sample per gradient step, dense vs sparse, over every network
        (:func:`~sparseapps.rl.networks.training_flops`)."""
        if not self.engines:
            raise RuntimeError("no engines yet: training_flops() is available once training has started")
        return training_flops(self.engines, self.networks)

    def state_dict(self) -> dict[str, Any]:
        """The engines' states (masks, schedule position, RNG) plus this callback's settings."""
        if not self.engines:
            raise RuntimeError("no engines yet: state_dict() is available once training has started")
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "critic_density_ratio": self.critic_density_ratio,
            "dense_output_layers": self.dense_output_layers,
            "engines": {name: engine.state_dict() for name, engine in self.engines.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from :meth:`state_dict` at the next training start.

        The engines then continue bit for bit (same schedule position and RNG). Each engine refuses a state of
        another configuration when it loads it (``ConfigMismatchError``, a ``ValueError``), and another run
        length: ``learn`` must cover the rest of the original run (``reset_num_timesteps=False`` and the same
        total). The callback's own settings are checked here.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"expected a DynamicSparsityCallback state of version {STATE_VERSION}, got "
                f"{type(state).__name__} with version {getattr(state, 'get', lambda _: None)('version')!r}"
            )
        settings = ("critic_density_ratio", "dense_output_layers")
        differ = {k: (state[k], getattr(self, k)) for k in settings if state[k] != getattr(self, k)}
        if differ:
            raise ConfigMismatchError(
                f"checkpoint was made with another configuration; (saved, current) differ in {differ}"
            )
        self._pending = {name: dict(engine_state) for name, engine_state in state["engines"].items()}
