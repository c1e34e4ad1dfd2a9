"""The isolation plugin under Avalanche's distributed training (DDP over ``torch.distributed``).

Avalanche 0.6.0's distributed support is three pieces: ``DistributedHelper.init_distributed`` (the process group,
launched by ``torchrun``, with the same random seeds on every rank), a model wrapped by
``DistributedHelper.wrap_model`` (``DistributedDataParallel``; Avalanche's forward unwraps it for
multi-task models), and data loaders that shard each experience with a ``DistributedSampler``. Plugins declare
``supports_distributed`` (a class keyword). :class:`DistributedIsolationPlugin` is :class:`SparseIsolationPlugin`
with that flag
and with cross-rank checks: DDP averages the gradients, so every rank computes the same subnetworks; the plugin
checks at the start of training that all ranks share the configuration and layer shapes (and copies rank 0's
generator state, so ``seed=None`` is safe), and after every topology update and every task that the masks and
the ownership maps are identical on all ranks (a fingerprint all-gather; the error names the ranks).

Example (every rank, under ``torchrun --nproc_per_node=2``)::

    DistributedHelper.init_distributed(random_seed=0, backend="gloo", use_cuda=False)
    model = DistributedHelper.wrap_model(IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5))
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters()), train_mb_size=32,
                     plugins=[DistributedIsolationPlugin(IsolationConfig(sparsity=0.8))])
    for experience in benchmark.train_stream:
        strategy.train(experience)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sparseapps.continual.checkpoint import flatten_settings
from sparseapps.continual.isolation import IsolationConfig
from sparseapps.continual.plugin import SparseIsolationPlugin
from sparseapps.core.distributed import check_same_description, require_process_group, verify_same_tensors


class DistributedIsolationPlugin(SparseIsolationPlugin, supports_distributed=True):
    """:class:`SparseIsolationPlugin` for Avalanche's distributed strategies, with cross-rank checks.

    Args:
        config: the :class:`IsolationConfig`.
        n_tasks: tasks the capacity is planned for (default: the model's task slots).
        group: the process group (default: the world).

    Avalanche resets ``supports_distributed`` in every subclass: a subclass of this plugin declares it again,
    ``class MyPlugin(DistributedIsolationPlugin, supports_distributed=True)``. Layer names carry DDP's
    ``module.`` prefix.

    Attributes:
        checks: cross-rank verifications done (at start, after each topology update and each task).

    Raises:
        RuntimeError: training starts without a process group.
        RankMismatchError: ranks have other configs, task counts or layer shapes (names the ranks).
        MaskDivergenceError: masks or ownership differ across ranks (names the ranks and layers).
    """

    def __init__(
        self,
        config: IsolationConfig | None = None,
        *,
        n_tasks: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, n_tasks=n_tasks)
        self.group = group
        self.checks = 0
        self._verified_updates = 0
        self._synchronized = False

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        require_process_group(self.group)
        super().before_training(strategy, *args, **kwargs)
        isolation = self.isolation
        assert isolation is not None
        if self._synchronized:
            return
        check_same_description(
            {
                "config": flatten_settings(isolation.config.to_dict()),  # differences named by dotted field
                "n_tasks": isolation.n_tasks,
                "shapes": {fqn: list(layer.weight.shape) for fqn, layer in isolation.layers.items()},
            },
            self.group,
        )
        state: list[Any] = [isolation.generator.get_state()]
        source = dist.get_global_rank(self.group, 0) if self.group else 0
        dist.broadcast_object_list(state, src=source, group=self.group)
        isolation.generator.set_state(state[0])
        self._synchronized = True
        self.verify()

    def after_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        super().after_update(strategy, *args, **kwargs)
        isolation = self.isolation
        if isolation is not None and len(isolation.history) > self._verified_updates:
            self._verified_updates = len(isolation.history)
            self.verify()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, *args, **kwargs)
        self.verify()

    def verify(self) -> None:
        """Checks that every rank holds the same masks and ownership maps (a collective: call it on all ranks)."""
        isolation = self.isolation
        if isolation is None:
            raise RuntimeError("verify needs the isolation state: call it after training has started")
        tensors: dict[str, torch.Tensor] = {}
        for fqn, layer in isolation.layers.items():
            tensors[f"{fqn} mask"] = layer.weight_mask
            tensors[f"{fqn} owner"] = layer.owner
        verify_same_tensors(tensors, step=isolation.step, what="masks or ownership", group=self.group)
        self.checks += 1


__all__ = ["DistributedIsolationPlugin"]
