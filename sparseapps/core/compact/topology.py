"""Topology updates of compact layers on their active entries: no ``[out, in]`` mask, score or gradient is held.

The engine's update (``rules.update_masks`` over dense masks and scores) is the definition; this is the same
update for models whose sparse tensors are all :class:`CompactLinear` layers and whose criteria have entry forms
(``scores.Criterion.on_entries`` / ``fused``: the built-in magnitude, random and signed-magnitude drops, gradient
and random growth). Per tensor, in the engine's order of random draws (every drop score, then every grow score):

1. drop: the criterion's scores of the ``nnz`` active entries with the dense path's tie noise at their positions;
   the ``n_drop`` lowest go (``select_top`` over ``nnz`` entries);
2. grow: the compiled ``grow_select`` scans the inactive positions (the kept ones skipped by their sorted list),
   scoring ``|g| + noise`` with ``g = dy^T x`` formed a block of rows at a time from the captured factors (an
   embedding table's ``g``: the rows its capture step looked up, zeros elsewhere; or a uniform draw), and returns
   the ``n_grow`` best positions;
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

from sparseapps.core import rules, scores, scoring, structured
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
        "SRigL's neuron ablation (ablation_threshold > 0) reads every row's salient weights"
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
        (
            config.constant_fan_in and config.ablation_threshold > 0,
            "SRigL's neuron ablation (ablation_threshold > 0) reads every row's salient weights",
        ),
        (
            config.constant_fan_in and scores.get("grow", config.grow).fused != "gradient",
            f"constant fan-in (SRigL) refills rows on active entries by gradient growth only, got "
            f"grow={config.grow!r}",
        ),
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
    old_nnz = {fqn: t.module.nnz for fqn, t in engine.tensors.items()}
    if config.constant_fan_in:
        kept, grown = _constant_fan_in(engine, fraction, drop_criterion, grow_criterion)
    else:
        kept, grown = _unstructured(engine, fraction, drop_criterion, grow_criterion)
    for t in engine.tensors.values():  # the captured gradients are spent: freed before the re-pack allocates
        t.module.dense_grad = None
    return _write(engine, fraction, kept, grown, old_nnz)


def _constant_fan_in(
    engine: DynamicSparsity,
    fraction: float,
    drop_criterion: scores.Criterion,
    grow_criterion: scores.Criterion,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SRigL without ablation (``structured.constant_fan_in_update`` with every row active), tensor by tensor in
    the dense path's order of draws: the top ``nnz - n_drop`` entries by drop score stay; each row regrows to its
    fan-in ``k`` by the best ``|g| + noise`` among its other inputs (the dropped ones included), ``g`` formed a
    block of rows at a time from the captured factors."""
    config = engine.config
    kept: dict[str, torch.Tensor] = {}
    grown: dict[str, torch.Tensor] = {}
    for fqn, t in engine.tensors.items():
        module = t.module
        positions = module.positions()
        nnz = positions.numel()
        rows, cols = module.weight_shape
        n_drop = min(math.ceil(fraction * nnz), nnz)
        context = scores.EntryContext(
            values=module.values.detach(), positions=positions, numel=t.numel, generator=engine.generator
        )
        entry_scores = scores.compute_on_entries(drop_criterion, context, config.tie_noise)
        stay = rules.select_top(entry_scores, torch.ones(nnz, dtype=torch.bool), nnz - n_drop, available=nnz)
        kept[fqn] = rules.flat_nonzero(stay)
        retained = positions[kept[fqn]]
        k = structured.fan_in_for(t.budget, rows, cols)
        counts = k - torch.bincount(retained // cols, minlength=rows)
        grown[fqn] = _refill_rows(engine, module, retained, counts, grow_criterion)
    return kept, grown


def _captured_gradient(
    module: CompactLinear,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The captured step's gradient: dense ``[out, in]`` float32 or its float32 factors ``(dy [B, out], x [B, in])``
    (zeros when the layer did not run in the update step: every gradient is zero)."""
    factors = module.gradient_factors()
    if factors is not None and factors[0].dtype == factors[1].dtype == torch.float32:
        return None, (factors[0].float().contiguous(), factors[1].float().contiguous())
    dense = module.dense_grad
    return (torch.zeros(module.weight_shape) if dense is None else dense.float()), None


def _refill_rows(
    engine: DynamicSparsity,
    module: CompactLinear,
    retained: torch.Tensor,
    counts: torch.Tensor,
    grow_criterion: scores.Criterion,
    block_rows: int = 1024,
) -> torch.Tensor:
    """Ascending flat positions: per row ``r``, the ``counts[r]`` best ``|g| + noise`` outside ``retained``
    (ties to the lower position), with the dense path's noise (one seed drawn, ``max|g| * tie_noise`` wide)."""
    rows, cols = module.weight_shape
    dense, factors = _captured_gradient(module)

    def block(start: int, end: int) -> torch.Tensor:
        if dense is not None:
            return dense[start:end].abs()
        dy, x = factors  # type: ignore[misc]
        return (dy[:, start:end].T @ x).abs()

    noise = engine.config.tie_noise if grow_criterion.tie_noise else 0.0
    factor, seed = 0.0, 0
    if noise > 0:
        high = max(
            (float(block(s, min(s + block_rows, rows)).max()) for s in range(0, rows, block_rows)),
            default=0.0,
        )
        factor = scoring.noise_factor(torch.zeros(()), torch.tensor(high, dtype=torch.float32), noise)
        seed = scoring.draw_seed(engine.generator)
    taken = torch.zeros(rows * cols, dtype=torch.bool)
    taken[retained] = True
    chosen = []
    for start in range(0, rows, block_rows):
        end = min(start + block_rows, rows)
        need = counts[start:end]
        if int(need.max()) <= 0:
            continue
        score = block(start, end).float().contiguous()
        if factor > 0:
            flat = torch.arange(start * cols, end * cols)
            if library.ensure_loaded().compiled:
                u = torch.ops.sparseapps.hashed_uniform_at(seed, flat)
            else:
                u = reference.hashed_uniform_at_reference(seed, flat)
            score += (u * torch.tensor(factor, dtype=torch.float32)).view(end - start, cols)
        score.masked_fill_(taken[start * cols : end * cols].view(end - start, cols), -math.inf)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, : int(need.max())]
        pick = torch.arange(order.shape[1]) < need.unsqueeze(1)
        chosen.append((torch.arange(start, end).unsqueeze(1) * cols + order)[pick])
    if not chosen:
        return torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat(chosen)).values


def _unstructured(
    engine: DynamicSparsity,
    fraction: float,
    drop_criterion: scores.Criterion,
    grow_criterion: scores.Criterion,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The unstructured update's kept entries and grown positions (the module docstring's steps 1 and 2)."""
    config = engine.config
    kept: dict[str, torch.Tensor] = {}
    n_drop: dict[str, int] = {}
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
        dense = dy = x = dense_rows = None
        # a table's capture holds the rows it looked up (every other row's gradient is 0)
        if not random and isinstance(module, CompactEmbedding):
            dense_rows, dense = module.gradient_rows()
            dense = dense.float()
        elif not random:
            dense, factors = _captured_gradient(module)
            dy, x = factors if factors is not None else (None, None)
        excluded = module.positions().index_select(0, kept[fqn])
        rows, cols = module.weight_shape
        args = (dense, dy, x, rows, cols, excluded, count, seed, noise, random)
        if excluded.device.type == "cpu" and library.ensure_loaded().compiled:
            grown[fqn] = torch.ops.sparseapps.grow_select(*args, tuning.grow_block_entries(), dense_rows)
        else:
            grown[fqn] = reference.grow_select_reference(*args, dense_rows)
        del dense, excluded
    return kept, grown


def _write(
    engine: DynamicSparsity,
    fraction: float,
    kept: dict[str, torch.Tensor],
    grown: dict[str, torch.Tensor],
    old_nnz: dict[str, int],
) -> rules.UpdateRecord:
    """Writes kept and grown entries to the layers and the optimizer state (step 3); returns the record."""
    config = engine.config
    for fqn, t in engine.tensors.items():
        kept[fqn], grown[fqn] = _keep_regrown(t.module, kept[fqn], grown[fqn])
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


def _keep_regrown(
    module: CompactLinear | CompactEmbedding, kept: torch.Tensor, grown: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, grown)`` with the grown positions that are active now moved to the kept entries: an entry dropped
    and grown again in the same update stays, with its value and state (as in the dense path)."""
    positions = module.positions()
    if positions.device.type == "cpu" and library.ensure_loaded().compiled:
        slot = torch.ops.sparseapps.sorted_index(positions, grown)
    else:
        slot = reference.sorted_index_reference(positions, grown)
    again = slot >= 0
    if not bool(again.any()):
        return kept, grown
    return _merge(kept, slot[again]), grown[~again]


def check_captured(engine: DynamicSparsity, step: int) -> None:
    """Raises ``ValueError`` naming the layer if a captured gradient (or its factors) holds NaN or Inf."""
    for fqn, t in engine.tensors.items():
        module = t.module
        if isinstance(module, CompactEmbedding):  # the looked-up rows only
            parts: tuple[torch.Tensor | None, ...] = (module.gradient_rows()[1],)
        else:
            factors = module.gradient_factors()
            parts = factors if factors is not None else (module.dense_grad,)
        for part in parts:
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
