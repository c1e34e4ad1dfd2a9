"""Topology updates of compact layers on their active entries: no ``[out, in]`` mask, score or gradient is held.

The engine's update (``rules.update_masks`` over dense masks and scores) is the definition; this is the same
update for models whose sparse tensors are all :class:`CompactLinear` layers and whose criteria have entry forms
(``scores.Criterion.on_entries`` / ``fused``: the built-in magnitude, random and signed-magnitude drops, gradient
and random growth). Per tensor, in the engine's order of random draws (every drop score, then every grow score):

1. drop: the criterion's scores of the ``nnz`` active entries with the dense path's tie noise at their positions;
   the ``n_drop`` lowest go (``select_top`` over ``nnz`` entries);
2. grow: the compiled ``grow_select`` scans the inactive positions (the kept ones skipped by their sorted list),
   scoring ``|g| + noise`` with ``g = dy^T x`` formed a block of rows at a time from the captured factors (or a
   uniform draw), and returns the ``n_grow`` best positions;
3. write: ``set_positions`` merges kept and grown positions and re-packs values and optimizer state (an entry
   dropped and grown again in the same update is kept, with its value and state, as in the dense path).

Same seed, same masks as the dense path (selection ties go to the lower position on both); the scores differ only
where the blocked product rounds differently from one ``[out, in]`` product. A RigL update of the 784-4096-4096-10
MLP at 98% reads ~40 MB instead of writing and re-reading ~20 dense tensors of 67 MB.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sparseapps.core import rules, scores, scoring
from sparseapps.core.compact import storage
from sparseapps.core.compact.embedding import CompactEmbedding
from sparseapps.core.compact.layer import CompactLinear
from sparseapps.core.kernels import library, reference, tuning

if TYPE_CHECKING:
    from sparseapps.core.engine import DynamicSparsity

__all__ = ["applies", "update"]


def applies(engine: DynamicSparsity) -> bool:
    """Whether ``engine``'s updates can run on active entries (else they take the dense views)."""
    return dense_view_reason(engine) is None


def dense_view_reason(engine: DynamicSparsity) -> str | None:
    """Why ``engine``'s topology updates build dense views instead of running on active entries; None when they
    run on active entries.

    Example:
        >>> from torch import nn
        >>> from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
        >>> config = SparsityConfig.preset("rigl", sparsity=0.9, storage="compact")
        >>> model = to_compact(nn.Sequential(nn.Linear(64, 64)), config)
        >>> engine = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config, 100)
        >>> dense_view_reason(engine) is None
        True
        >>> srigl = SparsityConfig.preset("srigl", sparsity=0.9, storage="compact")
        >>> model = to_compact(nn.Sequential(nn.Linear(64, 64)), srigl)
        >>> dense_view_reason(DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), srigl, 100))
        'constant fan-in (SRigL) keeps per-neuron budgets'
    """
    config = engine.config
    checks = (
        (not engine.tensors, "no sparse tensors"),
        (set(engine._compact) != set(engine.tensors), "not every sparse tensor is compact (masked storage)"),
        (
            not all(
                isinstance(t.module, (CompactLinear, CompactEmbedding)) for t in engine._compact.values()
            ),
            "a compact module other than CompactLinear / CompactEmbedding",
        ),
        (config.constant_fan_in, "constant fan-in (SRigL) keeps per-neuron budgets"),
        (config.n_m is not None, f"n_m={config.n_m} keeps per-group budgets (N:M)"),
        (
            config.redistribution != "none",
            f"redistribution={config.redistribution!r} moves budget across tensors",
        ),
        (bool(engine.growth_regions), "growth is restricted to regions (continual isolation)"),
        (bool(engine.ever_active), "a criterion reads the entries ever active"),
        (
            config.random_grow_fraction > 0 and config.grow != "random",
            "CTRE's random exploration (random_grow_fraction)",
        ),
        (
            scores.get("drop", config.drop).on_entries is None,
            f"drop={config.drop!r} has no form on active entries",
        ),
        (scores.get("grow", config.grow).fused is None, f"grow={config.grow!r} has no compiled growth scan"),
    )
    return next((reason for failed, reason in checks if failed), None)


def update(engine: DynamicSparsity, fraction: float) -> rules.UpdateRecord:
    """One drop/grow update of every tensor of ``engine`` (see the module docstring), written to the layers and
    the optimizer state; returns its record (the caller appends it to the history)."""
    config = engine.config
    drop_criterion = scores.get("drop", config.drop)
    grow_criterion = scores.get("grow", config.grow)
    kept: dict[str, torch.Tensor] = {}
    n_drop: dict[str, int] = {}
    old_nnz = {fqn: t.module.nnz for fqn, t in engine.tensors.items()}
    for fqn, t in engine.tensors.items():
        module = t.module
        positions = module.positions()
        nnz = positions.numel()
        n_drop[fqn] = max(min(math.ceil(fraction * nnz), nnz - 1), 0)
        context = scores.EntryContext(
            values=module.values.detach(), positions=positions, numel=t.numel, generator=engine.generator
        )
        entry_scores = scores.compute_on_entries(drop_criterion, context, config.tie_noise)
        dropped = rules.select_top(
            entry_scores, torch.ones(nnz, dtype=torch.bool), n_drop[fqn], largest=False, available=nnz
        )
        kept[fqn] = rules.flat_nonzero(~dropped)
    grown: dict[str, torch.Tensor] = {}
    for fqn, t in engine.tensors.items():
        module = t.module
        available = t.numel - kept[fqn].numel()
        count = min(n_drop[fqn], available)
        random = grow_criterion.fused == "random"
        noise = 0.0 if random or not grow_criterion.tie_noise else config.tie_noise
        seed = scoring.draw_seed(engine.generator) if random or noise > 0 else 0
        dense = dy = x = None
        if not random:
            factors = module.gradient_factors()
            if factors is not None and factors[0].dtype == factors[1].dtype == torch.float32:
                dy, x = (f.float().contiguous() for f in factors)
            else:
                dense = module.dense_grad
                if dense is None:  # the layer did not run in the update step: every gradient is zero
                    dense = torch.zeros(module.weight_shape)
                dense = dense.float()
        excluded = module.positions().index_select(0, kept[fqn])
        rows, cols = module.weight_shape
        args = (dense, dy, x, rows, cols, excluded, count, seed, noise, random)
        if excluded.device.type == "cpu" and library.ensure_loaded().compiled:
            grown[fqn] = torch.ops.sparseapps.grow_select(*args, tuning.grow_block_entries())
        else:
            grown[fqn] = reference.grow_select_reference(*args)
    # An entry dropped and grown again in the same update stays, with its value and state (as in the dense path).
    for fqn, t in engine.tensors.items():
        positions = t.module.positions()
        if positions.device.type == "cpu" and library.ensure_loaded().compiled:
            slot = torch.ops.sparseapps.sorted_index(positions, grown[fqn])
        else:
            slot = reference.sorted_index_reference(positions, grown[fqn])
        again = slot >= 0
        if bool(again.any()):
            back = slot[again]
            kept[fqn] = _merge(kept[fqn], back)
            grown[fqn] = grown[fqn][~again]
    if engine.commit_hooks:  # the hooks read masks (continual ownership, RL targets, distributed checks)
        masks = {fqn: _mask(t.module, kept[fqn], grown[fqn]) for fqn, t in engine.tensors.items()}
        for hook in engine.commit_hooks:
            hook(masks)
    with torch.no_grad():
        for fqn, t in engine.tensors.items():
            t.write_positions(kept[fqn], grown[fqn], engine.optimizer)
            if config.grow_init_range > 0 and grown[fqn].numel():
                noise_values = (
                    scoring.uniform_at(grown[fqn], engine.generator) * 2 - 1
                ) * config.grow_init_range
                new_positions = t.module.positions()
                slots = torch.searchsorted(new_positions, grown[fqn])
                t.param.index_add_(0, slots, noise_values.to(t.param.dtype))
    tensors = {
        fqn: rules.TensorUpdate(
            dropped=old_nnz[fqn] - kept[fqn].numel(), grown=grown[fqn].numel(), nnz=t.module.nnz
        )
        for fqn, t in engine.tensors.items()
    }
    return rules.UpdateRecord(engine.step, fraction, tensors)


def check_captured(engine: DynamicSparsity, step: int) -> None:
    """Raises ``ValueError`` naming the layer if a captured gradient (or its factors) holds NaN or Inf."""
    for fqn, t in engine.tensors.items():
        factors = t.module.gradient_factors()
        for part in factors if factors is not None else (t.module.dense_grad,):
            if part is not None:
                storage.check_captured_finite(fqn, part, step)


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ascending union of two disjoint ascending index lists."""
    if a.device.type == "cpu" and library.ensure_loaded().compiled:
        return torch.ops.sparseapps.merge_positions(a, b)[0]
    return reference.merge_positions_reference(a, b)[0]


def _mask(module: CompactLinear, kept: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(module.weight_shape, dtype=torch.bool).view(-1)
    mask[module.positions().index_select(0, kept)] = True
    mask[grown] = True
    return mask.view(module.weight_shape)
