"""``to_compact(model, config)``: the selected ``nn.Linear`` layers of a model become `CompactLinear` layers."""

from __future__ import annotations

import torch
from torch import nn

# Modules, not names: selection imports this package's layer, so either may be imported first.
from sparseapps.core import distributions, masks, selection
from sparseapps.core.allocator import release_free_memory
from sparseapps.core.compact.layer import CompactLinear
from sparseapps.core.config import SparsityConfig

__all__ = ["to_compact"]


def to_compact(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Replaces every ``nn.Linear`` that ``config`` sparsifies by a :class:`CompactLinear` of its initial mask.

    The selection, the budgets and the masks are the engine's: ``select_tensors(model, config)``, ``target_nnz``
    over every selected tensor, and one draw per selected tensor in order from a generator seeded with
    ``config.seed`` (Conv and Embedding weights are drawn too, and stay for the engine to mask). So
    ``DynamicSparsity`` over the converted model starts from the masks it would draw over the original one. Build
    the optimizer after converting: the layers' parameters are new.

    Args:
        model: any module; converted in place.
        config: a configuration with ``storage="compact"`` (the engine reads it too).

    Returns:
        ``model`` (a ``CompactLinear`` when ``model`` itself is a selected ``nn.Linear``).

    Raises:
        ValueError: ``config.storage`` is not ``"compact"``, or a selected Linear shares its weight with another
            module (tied weights cannot be compact).

    Example:
        >>> from sparseapps.core import SparsityConfig
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> config = SparsityConfig.preset("rigl", sparsity=0.9, storage="compact", seed=0)
        >>> model = to_compact(model, config)
        >>> type(model[0]).__name__, model[0].nnz + model[2].nnz == round(0.1 * (64 * 128 + 128 * 10))
        ('CompactLinear', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if config.storage != "compact":
        raise ValueError(
            f"to_compact expects a config with storage='compact' (the engine reads it too), got {config.storage!r}"
        )
    selected = selection.select_tensors(model, config)
    shapes = {fqn: selection.tensor_shape(module, name) for fqn, module, name, _ in selected}
    budgets = distributions.target_nnz(shapes, config.density, config.distribution)
    seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator().manual_seed(seed)
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for fqn, module, _, _ in selected:
        mask = masks.draw_mask(shapes[fqn], budgets[fqn], config, generator)
        if not isinstance(module, nn.Linear):
            continue
        if counts[id(module.weight)] > 1:
            raise ValueError(
                f"{fqn!r} is shared with another module (tied weights), which a compact layer cannot be; keep it "
                "dense with SparsityConfig(exclude=...)"
            )
        compact = CompactLinear.from_linear(module, mask)
        name = fqn.removesuffix("weight").removesuffix(".")
        if not name:
            release_free_memory()
            return compact
        model.set_submodule(name, compact)
    release_free_memory()  # the dense weights and the masks (sparseapps.core.allocator)
    return model
