"""Worker functions of the continual distributed tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.distributed import DistributedHelper
from avalanche.training import Naive

from sparseapps.continual.benchmarks import make_benchmark
from sparseapps.continual.distributed import DistributedIsolationPlugin
from sparseapps.continual.isolation import IsolationConfig
from sparseapps.continual.models import IsolatedMLP
from sparseapps.continual.plugin import continual_evaluator
from sparseapps.continual.train import train_and_evaluate
from sparseapps.core import SparsityConfig


def make_config(sparsity: float = 0.8) -> IsolationConfig:
    return IsolationConfig(
        sparsity=SparsityConfig(
            sparsity=sparsity, distribution="uniform", grow="gradient", update_interval=2, seed=0
        )
    )


def make_strategy(plugin: DistributedIsolationPlugin) -> Naive:
    DistributedHelper.set_random_seeds(0)
    model = DistributedHelper.wrap_model(
        IsolatedMLP(input_shape=(1, 8, 8), n_outputs=2, n_tasks=5, hidden=(32, 32))
    )
    return Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=32,
        train_epochs=2,
        eval_mb_size=256,
        plugins=[plugin],
        evaluator=continual_evaluator(),
        device="cpu",
    )


def train(rank: int, world: int) -> dict[str, Any]:
    plugin = DistributedIsolationPlugin(make_config())
    strategy = make_strategy(plugin)
    result = train_and_evaluate(strategy, make_benchmark("split-digits", n_tasks=5, seed=0), progress=False)
    isolation = plugin.isolation
    assert isolation is not None
    return {
        "supports_distributed": strategy.plugins[0].supports_distributed,
        "result": result,
        "checks": plugin.checks,
        "updates": len(isolation.history),
        "owners": {fqn: layer.owner.clone() for fqn, layer in isolation.layers.items()},
        "weights": {fqn: layer.weight.detach().clone() for fqn, layer in isolation.layers.items()},
        "distributed": DistributedHelper.is_distributed,
    }


def mismatched(rank: int, world: int) -> dict[str, Any]:
    plugin = DistributedIsolationPlugin(make_config(sparsity=0.8 if rank == 0 else 0.85))
    strategy = make_strategy(plugin)
    strategy.train(make_benchmark("split-digits", n_tasks=5, seed=0).train_stream[0])
    return {}


class _CorruptRank1(DistributedIsolationPlugin, supports_distributed=True):
    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, *args, **kwargs)
        assert self.isolation is not None
        if torch.distributed.get_rank() == 1:
            layer = next(iter(self.isolation.layers.values()))
            layer.weight_mask.view(-1)[0] = ~layer.weight_mask.view(-1)[0]
        self.verify()


def corrupted(rank: int, world: int) -> dict[str, Any]:
    strategy = make_strategy(_CorruptRank1(make_config()))
    strategy.train(make_benchmark("split-digits", n_tasks=5, seed=0).train_stream[0])
    return {}
