"""Which weights an engine sparsifies (by module kind and fqn patterns), and its record of each one."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from sparseapps.core.config import SparsityConfig

__all__ = ["SparseTensor", "module_kind", "select_tensors"]


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"embedding"`` or ``None`` for modules whose weight is never sparsified."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
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


def select_tensors(model: nn.Module, config: SparsityConfig) -> list[tuple[str, nn.Module, str, str]]:
    """The ``(fqn, module, param_name, kind)`` of every weight ``config`` sparsifies, in registration order."""
    chosen: list[tuple[str, nn.Module, str, str]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        kind = module_kind(module)
        weight = getattr(module, "weight", None)
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
        chosen.append((fqn, module, "weight", kind))
    if config.dense_first_layer and chosen:
        chosen = chosen[1:]
    if config.dense_last_layer and chosen:
        chosen = chosen[:-1]
    return chosen
