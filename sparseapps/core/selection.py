"""Which weights an engine sparsifies (by module kind and fqn patterns), and its record of each one.

A :class:`~sparseapps.core.compact.CompactLinear` counts as a Linear layer and a
:class:`~sparseapps.core.compact.CompactEmbedding` as an embedding: their active ``values`` stand for the weight,
under the same fqn (``"<module>.weight"``) that the ``nn.Linear`` / ``nn.Embedding`` they replaced had.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from sparseapps.core.compact.embedding import CompactEmbedding
from sparseapps.core.compact.layer import CompactLinear
from sparseapps.core.config import SparsityConfig

__all__ = ["SparseTensor", "module_kind", "select_tensors", "tensor_shape"]


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"embedding"`` or ``None`` for modules whose weight is never sparsified."""
    if isinstance(module, nn.Linear | CompactLinear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag | CompactEmbedding):
        return "embedding"
    return None


@dataclass
class SparseTensor:
    """One sparsified parameter and its bookkeeping (internal to the engine)."""

    fqn: str
    module: nn.Module
    param_name: str
    kind: str
    budget: int
    mask: torch.Tensor
    allow_ablation: bool = True
    active_rows: torch.Tensor | None = None
    positions: int = 1

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    def dense_weight(self) -> torch.Tensor:
        """The weight as scores read it (the parameter itself, detached)."""
        return self.param.detach()

    def write_mask(self, new_mask: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Installs ``new_mask`` in the mask buffer, zeroes the dropped weights and their optimizer state; returns
        the grown entries."""
        grown = new_mask & ~self.mask
        self.mask.copy_(new_mask)
        self.param.mul_(self.mask)
        self.clear_optimizer_state(optimizer)
        return grown

    def clear_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zeroes every per-entry optimizer state of the parameter outside the mask."""
        for value in optimizer.state.get(self.param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == self.mask.shape:
                value.mul_(self.mask)

    def seed_first_moment(
        self, optimizer: torch.optim.Optimizer, momentum: torch.Tensor, grown: torch.Tensor
    ) -> None:
        """SNFS: the first moment (SGD's ``momentum_buffer``, Adam's ``exp_avg``) of ``grown`` entries starts from
        the tracked gradient ``momentum``; Adam's second moment (``exp_avg_sq``) from its square, so that a grown
        weight's first Adam step is about ``lr`` (a seeded first moment over a zero second moment divided by
        ``eps`` and sent the weights to NaN within steps, digits at 90%)."""
        state = optimizer.state.get(self.param, {})
        for key in ("momentum_buffer", "exp_avg"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == grown.shape:
                value.add_(momentum.to(value.dtype) * grown)
        second = state.get("exp_avg_sq")
        if isinstance(second, torch.Tensor) and second.shape == grown.shape and "exp_avg" in state:
            second.add_(momentum.to(second.dtype).square() * grown)

    def add_dense_(self, delta: torch.Tensor) -> None:
        """Adds ``delta`` (the weight's shape and dtype) to the weight."""
        self.param.add_(delta)

    def scale_rows_(self, scale: torch.Tensor) -> None:
        """Multiplies row ``r`` of the weight (output ``r``) by ``scale[r]``."""
        self.param.mul_(scale.reshape(-1, *([1] * (self.param.dim() - 1))).to(self.param.dtype))

    def load_mask(self, mask: torch.Tensor) -> None:
        """Sets the mask from a checkpoint (the weights are the model's to load)."""
        self.mask.copy_(mask.to(self.mask.device))


def select_tensors(model: nn.Module, config: SparsityConfig) -> list[tuple[str, nn.Module, str, str]]:
    """The ``(fqn, module, param_name, kind)`` of every weight ``config`` sparsifies, in registration order."""
    chosen: list[tuple[str, nn.Module, str, str]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        kind = module_kind(module)
        param_name = "values" if isinstance(module, CompactLinear | CompactEmbedding) else "weight"
        weight = getattr(module, param_name, None)
        if kind is None or kind not in config.module_types or not isinstance(weight, nn.Parameter):
            continue
        fqn = f"{name}.weight" if name else "weight"
        if config.include and not any(fnmatch.fnmatchcase(fqn, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(fqn, p) for p in config.exclude):
            continue
        if id(weight) in seen:  # tied weights are sparsified once, under their first name
            continue
        seen.add(id(weight))
        chosen.append((fqn, module, param_name, kind))
    if config.dense_first_layer and chosen:
        chosen = chosen[1:]
    if config.dense_last_layer and chosen:
        chosen = chosen[:-1]
    return chosen


def tensor_shape(module: nn.Module, param_name: str) -> torch.Size:
    """The dense shape of a selected weight: the parameter's, or the dense shape a compact module's values stand for."""
    if isinstance(module, CompactLinear | CompactEmbedding):
        return module.weight_shape
    return getattr(module, param_name).shape
