"""SRigL (Lasby et al. 2024): constant fan-in per active output neuron, and neuron ablation.

A weight ``[out, in, *kernel]`` is viewed as rows ``[out, fan_in]``. Every active row holds exactly ``k`` nonzeros;
an ablated row holds none, and its share of the budget goes back to the others (``k = budget // active rows``).
"""

from __future__ import annotations

import torch

from sparseapps.core import rules
from sparseapps.core.scoring import uniform_like


def fan_in_for(budget: int, active_rows: int, row_width: int) -> int:
    """Nonzeros per active row: ``min(row_width, budget // active_rows)``."""
    if active_rows <= 0:
        raise ValueError(f"expected at least one active row, got {active_rows}")
    return min(row_width, budget // active_rows)


def constant_fan_in_mask(shape: torch.Size, budget: int, generator: torch.Generator) -> torch.Tensor:
    """A random mask whose every row has ``budget // rows`` nonzeros.

    Example:
        >>> m = constant_fan_in_mask(torch.Size([3, 5]), 7, torch.Generator().manual_seed(0))
        >>> m.sum(1).tolist()
        [2, 2, 2]
    """
    rows, width = shape[0], int(torch.Size(shape[1:]).numel())
    k = fan_in_for(budget, rows, width)
    if k == 0:
        raise ValueError(f"a budget of {budget} nonzeros gives no weight to each of {rows} rows")
    scores = torch.rand((rows, width), generator=generator)
    mask = rules.select_top_per_row(scores, torch.ones(rows, width, dtype=torch.bool), torch.full((rows,), k))
    return mask.reshape(shape)


def constant_fan_in_update(
    mask: torch.Tensor,
    drop_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    n_drop: int,
    budget: int,
    active_rows: torch.Tensor,
    ablation_threshold: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SRigL topology update.

    1. Salient weights: the layer-wide top ``nnz - n_drop`` active entries by ``drop_scores`` (kept) and the top
       ``n_drop`` inactive entries by ``grow_scores`` (grown), as unconstrained RigL would choose.
    2. Ablation: an active row with fewer than ``ablation_threshold * k`` salient weights is switched off
       (at least one row stays active).
    3. ``k = budget // active rows``; each active row keeps its best ``min(kept_in_row, k)`` kept weights and
       grows the rest up to ``k`` by ``grow_scores``.

    Args:
        mask: ``[out, *]`` bool, constant fan-in over ``active_rows``.
        drop_scores, grow_scores: ``[out, *]`` float scores.
        n_drop: entries to drop layer-wide.
        budget: the tensor's nonzero budget.
        active_rows: ``[out]`` bool.
        ablation_threshold: SRigL's gamma_sal; 0 disables ablation.
        generator: breaks ties among rows when one must stay active.

    Returns:
        The new mask and the new ``active_rows``.
    """
    shape = mask.shape
    rows = shape[0]
    mask2d, drop2d, grow2d = (
        mask.reshape(rows, -1),
        drop_scores.reshape(rows, -1),
        grow_scores.reshape(rows, -1),
    )
    width = mask2d.shape[1]
    nnz = int(torch.count_nonzero(mask2d))
    n_drop = min(n_drop, nnz)
    kept = rules.select_top(drop2d, mask2d, nnz - n_drop)
    grown = rules.select_top(grow2d, ~mask2d, min(n_drop, int(torch.count_nonzero(~mask2d))))
    salient = (kept | grown).sum(1)

    active_rows = active_rows.clone()
    if ablation_threshold > 0:
        k_old = fan_in_for(budget, int(torch.count_nonzero(active_rows)), width)
        ablate = active_rows & (salient < ablation_threshold * k_old)
        if bool(ablate.all()) or int(torch.count_nonzero(active_rows & ~ablate)) == 0:
            # keep the most salient row alive (random among equals)
            best = int(torch.argmax(salient.float() + uniform_like(salient, generator) * 0.5))
            ablate[best] = False
        active_rows &= ~ablate

    k = fan_in_for(budget, int(torch.count_nonzero(active_rows)), width)
    row_candidates = active_rows.unsqueeze(1)
    keep_counts = torch.minimum((kept & row_candidates).sum(1), torch.full_like(salient, k)) * active_rows
    retained = rules.select_top_per_row(drop2d, kept & row_candidates, keep_counts)
    grow_counts = (k - retained.sum(1)) * active_rows
    regrown = rules.select_top_per_row(grow2d, ~retained & row_candidates, grow_counts)
    return (retained | regrown).reshape(shape), active_rows
