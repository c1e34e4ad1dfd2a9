"""Where masks live, and how the first one of a tensor is drawn.

A sparse parameter ``module.<name>`` keeps ordinary dense storage with exact zeros outside its mask, and the
mask is a ``torch.bool`` buffer ``module.<name>_mask`` of the same shape. Buffers travel with
``model.state_dict()``, so a checkpoint of the model alone already carries its topology, and the forward pass
pays nothing for sparsity. (Compact layers hold their topology as index structures instead; see
``sparseapps.core.compact``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparseapps.core import nm, rules, structured
from sparseapps.core.config import SparsityConfig

MASK_SUFFIX = "_mask"


def mask_name(param_name: str) -> str:
    """The buffer name that holds the mask of ``param_name`` (``"weight"`` -> ``"weight_mask"``)."""
    return f"{param_name}{MASK_SUFFIX}"


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    """The boolean mask of ``module.<param_name>``, or ``None`` when that parameter is dense."""
    mask = module._buffers.get(mask_name(param_name))
    return mask if isinstance(mask, torch.Tensor) else None


def attach_mask(module: nn.Module, param_name: str, mask: torch.Tensor) -> torch.Tensor:
    """Registers (or overwrites in place) the mask buffer of ``module.<param_name>`` and zeroes the masked weights.

    Returns the buffer, which is the tensor callers should keep: later updates write into it in place.
    """
    param = getattr(module, param_name)
    if mask.shape != param.shape:
        raise ValueError(
            f"mask for {param_name!r} must have shape {tuple(param.shape)}, got {tuple(mask.shape)}"
        )
    if hasattr(module, f"{param_name}_orig"):
        raise ValueError(
            f"{type(module).__name__}.{param_name} is already pruned by torch.nn.utils.prune "
            f"(found '{param_name}_orig'); call prune.remove() first"
        )
    existing = get_mask(module, param_name)
    mask = mask.to(device=param.device, dtype=torch.bool)
    if existing is None:
        existing = mask.clone()
        module.register_buffer(mask_name(param_name), existing, persistent=True)
    else:
        existing.copy_(mask)
    with torch.no_grad():
        param.mul_(existing)
    return existing


def detach_mask(module: nn.Module, param_name: str = "weight") -> None:
    """Removes the mask buffer; the parameter keeps its zeros and becomes an ordinary dense tensor."""
    module._buffers.pop(mask_name(param_name), None)


def draw_mask(
    shape: Sequence[int], budget: int, config: SparsityConfig, generator: torch.Generator
) -> torch.Tensor:
    """The initial mask of one tensor: ``budget`` entries uniformly at random, or (SRigL's ``constant_fan_in``)
    ``budget // rows`` per row, or (``n_m``) ``n`` of every group of ``m`` consecutive inputs, which ``budget`` must
    equal (``numel * n / m``); one ``torch.rand`` of the tensor's shape from ``generator``.

    The engine and :func:`~sparseapps.core.to_compact` draw every selected tensor in selection order from a
    generator seeded with ``config.seed``, so both storages start from the same masks.

    Example:
        >>> mask = draw_mask((4, 5), 6, SparsityConfig(), torch.Generator().manual_seed(0))
        >>> int(mask.sum()), mask.dtype
        (6, torch.bool)
    """
    shape = torch.Size(shape)
    if config.n_m is not None:
        n, m = config.n_m
        nm.check_n_m(config.n_m, shape)
        if budget * m != shape.numel() * n:
            raise ValueError(
                f"n_m={config.n_m} gives a tensor of shape {tuple(shape)} {shape.numel() * n // m} nonzeros, got a "
                f"budget of {budget}"
            )
        return nm.random_mask(shape, n, m, generator)
    if config.constant_fan_in:
        return structured.constant_fan_in_mask(shape, budget, generator)
    initial = torch.rand(shape, generator=generator)
    return rules.select_top(initial, torch.ones(shape, dtype=torch.bool), budget)
