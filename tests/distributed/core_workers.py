"""Worker functions of the core distributed tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.distributed import DistributedSparsity

STEPS = 40
GLOBAL_BATCH = 32
FEATURES, HIDDEN, CLASSES = 16, 32, 4


def make_config(preset: str, **overrides: Any) -> SparsityConfig:
    """The test's config: updates every 5 steps so 40 steps hold several topology updates."""
    values: dict[str, Any] = dict(sparsity=0.8, update_interval=5, seed=3)
    values.update(overrides)
    return SparsityConfig.preset(preset, **values)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS * GLOBAL_BATCH, FEATURES, generator=generator)
    targets = (inputs[:, :CLASSES] + 0.1 * torch.randn(len(inputs), CLASSES, generator=generator)).argmax(1)
    return inputs, targets


def train(model: nn.Module, engine: DynamicSparsity, rank: int, world_size: int) -> dict[str, Any]:
    """SGD on this rank's share of each global batch; records the masks after every topology update."""
    optimizer = engine.optimizer
    inputs, targets = make_data()
    local = GLOBAL_BATCH // world_size
    snapshots: list[dict[str, torch.Tensor]] = []
    losses = []
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * local
        x, y = inputs[start : start + local], targets[start : start + local]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if engine.history and engine.history[-1]["step"] == engine.step:
            snapshots.append({fqn: m.clone() for fqn, m in engine.masks.items()})
    module = model.module if isinstance(model, DistributedDataParallel) else model
    with torch.no_grad():
        x, y = inputs[-GLOBAL_BATCH:], targets[-GLOBAL_BATCH:]
        final_loss = float(F.cross_entropy(module(x), y))
    return {
        "snapshots": snapshots,
        "losses": losses,
        "final_loss": final_loss,
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "updates": len(engine.history),
    }


def train_single(preset: str) -> dict[str, Any]:
    """The reference: one process, the whole global batch, mean loss."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = DynamicSparsity(model, optimizer, make_config(preset), total_steps=STEPS)
    return train(model, engine, 0, 1)


def train_ddp(rank: int, world_size: int, preset: str, sync: str) -> dict[str, Any]:
    """Two-process DDP training with cross-rank mask checks at every update."""
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsity = DistributedSparsity.attach(model, optimizer, make_config(preset), STEPS, sync=sync)  # type: ignore[arg-type]
    result = train(model, sparsity.engine, rank, world_size)
    result["checks"] = sparsity.checks
    return result


def corrupt_rank1(rank: int, world_size: int, sync: str) -> dict[str, Any]:
    """Rank 1 flips one entry of its new masks at each update, before the cross-rank check."""
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = DistributedSparsity.attach(model, optimizer, make_config("set"), STEPS, sync=sync)  # type: ignore[arg-type]

    def flip(masks: Any) -> None:
        first = next(iter(masks.values()))
        first.view(-1)[0] = ~first.view(-1)[0]

    if rank == 1:
        sparsity.engine.commit_hooks.insert(0, flip)
    result = train(model, sparsity.engine, rank, world_size)
    return {"snapshots": result["snapshots"], "checks": sparsity.checks}


def mismatched_config(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1 asks for another sparsity."""
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = make_config("rigl", sparsity=0.8 if rank == 0 else 0.7)
    DistributedSparsity.attach(model, optimizer, config, STEPS)
    return {}


def unseeded(rank: int, world_size: int) -> dict[str, Any]:
    """``seed=None`` and a different torch seed per rank: attach copies rank 0's masks and RNG state."""
    model = DistributedDataParallel(make_model())
    torch.manual_seed(100 + rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = DistributedSparsity.attach(model, optimizer, make_config("set", seed=None), STEPS)
    result = train(model, sparsity.engine, rank, world_size)
    return {"snapshots": result["snapshots"], "checks": sparsity.checks, "state": result["state"]}
