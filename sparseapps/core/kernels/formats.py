"""Sparse storage formats built from a dense weight and its boolean mask.

Every format keeps only the *active* output rows (rows with at least one True in the mask); ``rows`` maps
each kept row back to its output position, and the layers restore the others (ablated neurons) as bias only.

- condensed: ``values [R, k]`` + ``indices [R, k]``, one row per kept neuron, constant fan-in ``k`` (or rows
  padded with zero weights to the largest fan-in).
- CSR: ``row_ptr [R + 1]`` + ``values [nnz]`` + ``indices [nnz]``, any fan-in per row.
- lane-blocked: for small batches (see ``csrc/kernels.h``): rows 16 at a time, one per SIMD lane; each step
  names two chunks of 16 inputs, so one register permute looks up 16 activations at once instead of 16
  scattered loads.

Indices are int16 when the input width allows (``in <= 32768``), int32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseapps.core.kernels.reference import row_of_entries

INT16_LIMIT = 32768
LANES = 16
# Chunk numbers are int16: the lane-blocked form covers inputs up to 32767 chunks of 16.
BLOCKED_MAX_WIDTH = 32767 * 16


def index_dtype_for(in_features: int, requested: str = "auto") -> torch.dtype:
    """int16 when every index fits (``in_features <= 32768``), else int32; ``requested`` may force one.

    Raises:
        ValueError: ``requested`` is not ``"auto"``, ``"int16"`` or ``"int32"``, or int16 is forced for a width
            above 32768.
    """
    if requested not in ("auto", "int16", "int32"):
        raise ValueError(f"expected index_dtype in ('auto', 'int16', 'int32'), got {requested!r}")
    if requested == "int16" and in_features > INT16_LIMIT:
        raise ValueError(f"expected in_features <= {INT16_LIMIT} for int16 indices, got {in_features}")
    if requested == "int32" or (requested == "auto" and in_features > INT16_LIMIT):
        return torch.int32
    return torch.int16


@dataclass(frozen=True, kw_only=True)
class MaskStats:
    """Shape facts of one mask ``[out, in]`` that the planner and the format choice need."""

    in_features: int
    out_features: int
    active_rows: int
    active_columns: int
    nnz: int
    min_fan_in: int
    max_fan_in: int

    @property
    def constant_fan_in(self) -> bool:
        """Every active row has the same number of nonzeros."""
        return self.min_fan_in == self.max_fan_in

    @property
    def density(self) -> float:
        """nnz / (out * in)."""
        return self.nnz / max(1, self.out_features * self.in_features)

    @property
    def padding_ratio(self) -> float:
        """Stored entries of the padded condensed form per real nonzero (1.0 for constant fan-in)."""
        return self.active_rows * self.max_fan_in / max(1, self.nnz)


def mask_stats(mask: torch.Tensor) -> MaskStats:
    """Counts rows, columns and fan-ins of a 2-D boolean mask.

    Example:
        >>> mask_stats(torch.tensor([[True, False], [False, False]])).active_rows
        1
    """
    counts = mask.sum(1)
    active = counts[counts > 0]
    return MaskStats(
        in_features=mask.shape[1],
        out_features=mask.shape[0],
        active_rows=int(active.numel()),
        active_columns=int(mask.any(0).sum()),
        nnz=int(counts.sum()),
        min_fan_in=int(active.min()) if active.numel() else 0,
        max_fan_in=int(active.max()) if active.numel() else 0,
    )


def active_rows(mask: torch.Tensor) -> torch.Tensor:
    """``[R]`` int64 positions of the rows of ``mask [out, in]`` that hold at least one nonzero, ascending."""
    return mask.any(1).nonzero().flatten()


def condensed_arrays(
    weight: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, index_dtype: torch.dtype, *, pad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices ``[R, k]`` of the kept ``rows``, indices ascending within a row.

    Args:
        weight: ``[out, in]`` dense weight.
        mask: ``[out, in]`` bool.
        rows: ``[R]`` kept rows (each with at least one nonzero).
        index_dtype: torch.int16 or torch.int32.
        pad: allow rows with fewer nonzeros than the largest; they are padded with zero weights at index 0.

    Raises:
        ValueError: the fan-in varies across ``rows`` and ``pad`` is False.
    """
    sub_mask = mask[rows]
    counts = sub_mask.sum(1)
    k = int(counts.max()) if counts.numel() else 0
    if not pad and counts.numel() and int(counts.min()) != k:
        raise ValueError(
            f"expected a constant fan-in for the condensed form, got fan-ins from {int(counts.min())} to {k}; "
            "use form='csr' (or 'padded') for masks without constant fan-in"
        )
    # Stable sort puts each row's kept columns first, in ascending column order.
    order = torch.sort(sub_mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    values = torch.gather(weight[rows], 1, order)
    valid = torch.arange(k).expand(len(rows), k) < counts[:, None]
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype))
    indices = torch.where(valid, order, torch.zeros((), dtype=order.dtype))
    return values.contiguous(), indices.to(index_dtype).contiguous()


def csr_structure(mask: torch.Tensor, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_ptr [R + 1]`` int64 and ``indices [nnz]`` of a bool mask ``[R, C]``, columns ascending in each row.

    Entry ``e`` of the structure is the ``e``-th True of ``mask`` in row-major order, so ``weight[mask]`` lists
    its values.

    Example:
        >>> csr_structure(torch.tensor([[False, True], [False, False], [True, True]]), torch.int16)
        (tensor([0, 1, 1, 3]), tensor([1, 0, 1], dtype=torch.int16))
    """
    positions = mask.reshape(-1).nonzero().squeeze(1)  # one int64 index (a 2-D index would make two)
    row_ptr = row_pointers(positions, mask.shape[0], mask.shape[1])
    return row_ptr, positions.remainder_(max(1, mask.shape[1])).to(index_dtype)


def row_pointers(positions: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """``row_ptr [rows + 1]`` int64 of ascending row-major ``positions`` in a ``[rows, columns]`` shape.

    A binary search of each row's start: no temporary of the mask's size (``mask.sum(1)`` widens a bool mask to
    int64 whole, 8 bytes per entry: 450 MB for a 221,588 x 256 table).

    Example:
        >>> row_pointers(torch.tensor([1, 4, 5]), 3, 2).tolist()
        [0, 1, 1, 3]
    """
    starts = torch.arange(rows + 1, dtype=torch.int64, device=positions.device) * columns
    return torch.searchsorted(positions, starts)


def entry_positions(row_ptr: torch.Tensor, col_indices: torch.Tensor, columns: int) -> torch.Tensor:
    """``[nnz]`` int64 row-major positions ``row * columns + column`` of a CSR structure's entries (the inverse of
    :func:`row_pointers`), built in one int64 tensor: ``row * columns`` and ``col_indices.long()`` as separate
    tensors would hold three ``nnz``-sized int64 arrays at once (270 MB for a DSL table's 11.3M entries).

    Example:
        >>> entry_positions(torch.tensor([0, 1, 1, 3]), torch.tensor([1, 0, 1], dtype=torch.uint8), 2).tolist()
        [1, 4, 5]
    """
    return row_of_entries(row_ptr).mul_(columns).add_(col_indices)


def csr_arrays(
    weight: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, index_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``row_ptr [R + 1]``, ``values [nnz]``, ``indices [nnz]`` of the kept ``rows`` (columns ascending)."""
    sub_mask = mask[rows]
    row_ptr, indices = csr_structure(sub_mask, index_dtype)
    return row_ptr, weight[rows][sub_mask].contiguous(), indices


@dataclass(frozen=True, kw_only=True)
class BlockedArrays:
    """The lane-blocked form (see ``csrc/kernels.h``): ``S`` steps over groups of 16 rows.

    Attributes:
        values: ``[S, 16]`` weights (zero in empty lanes).
        lanes: ``[S, 16]`` uint8 input position among the step's two chunks (bit 4 selects the second).
        chunks: ``[S, 2]`` int16 chunk numbers; input ``= 16 * chunk + (lane & 15)``.
        group_ptr: ``[G + 1]`` int64 first step of each group.
        lane_rows: ``[G * 16]`` int64 output row of each lane, -1 for none; None when lane ``j`` is output ``j``
            (every row kept, in order).
    """

    values: torch.Tensor
    lanes: torch.Tensor
    chunks: torch.Tensor
    group_ptr: torch.Tensor
    lane_rows: torch.Tensor | None

    @property
    def lane_efficiency(self) -> float:
        """Fraction of stored lanes that hold a real nonzero."""
        used = int((self.values != 0).sum()) if self.values.numel() else 0
        return used / max(1, self.values.numel())


# Greedy scheduling costs about (groups * 16 * chunks) per step; above this total the aligned schedule is used.
GREEDY_WORK_LIMIT = 3e9


def blocked_arrays(
    weight: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, *, schedule: str = "auto"
) -> BlockedArrays:
    """The lane-blocked form of the kept ``rows`` of ``weight * mask``.

    Each step gives every lane (row) at most one nonzero from the step's two chunks of 16 inputs. The
    ``"greedy"`` schedule picks, step by step and for all groups at once, the chunk that serves the most
    remaining nonzeros (lanes weighted by what they have left) and then its best complement: about 72% of
    lanes are used at 90% sparsity. ``"aligned"`` uses fixed pairs (2c, 2c + 1), about 50%, and is cheap to
    build; ``"auto"`` picks greedy unless it would take long.

    Args:
        weight: ``[out, in]`` dense weight.
        mask: ``[out, in]`` bool.
        rows: ``[R]`` kept rows, in lane order.
        schedule: ``"auto"``, ``"greedy"`` or ``"aligned"``.

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in ("auto", "greedy", "aligned"):
        raise ValueError(f"expected schedule in ('auto', 'greedy', 'aligned'), got {schedule!r}")
    n_rows, in_features = len(rows), mask.shape[1]
    if in_features > BLOCKED_MAX_WIDTH:
        raise ValueError(
            f"expected in_features <= {BLOCKED_MAX_WIDTH} for the lane-blocked form, got {in_features}"
        )
    n_groups = (n_rows + LANES - 1) // LANES
    n_chunks = 2 * ((in_features + 2 * LANES - 1) // (2 * LANES))
    sub_mask = torch.zeros(n_groups * LANES, n_chunks * LANES, dtype=torch.bool)
    sub_mask[:n_rows, :in_features] = mask[rows]
    sub_weight = torch.zeros(n_groups * LANES, n_chunks * LANES, dtype=weight.dtype)
    sub_weight[:n_rows, :in_features] = weight[rows]
    counts = sub_mask.view(n_groups, LANES, n_chunks, LANES).sum(-1)  # [G, 16, C]
    if schedule == "auto":
        max_fan_in = int(counts.sum(-1).max()) if counts.numel() else 0
        work = n_groups * LANES * n_chunks * max_fan_in * 1.4
        schedule = "greedy" if work <= GREEDY_WORK_LIMIT else "aligned"
    # The nonzeros of each (row, chunk), in column order, start at chunk_start[row, chunk].
    position = sub_mask.nonzero()
    chunk_start = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    if schedule == "greedy":
        first, second, take_first, take_second, ordinal_first, ordinal_second, n_steps = _greedy_schedule(
            counts
        )
    else:
        first, second, take_first, take_second, ordinal_first, ordinal_second, n_steps = _aligned_schedule(
            counts
        )
    group_ptr = torch.zeros(n_groups + 1, dtype=torch.int64)
    group_ptr[1:] = torch.cumsum(n_steps, 0)
    total = int(group_ptr[-1])
    values = torch.zeros(total, LANES, dtype=weight.dtype)
    lanes = torch.zeros(total, LANES, dtype=torch.uint8)
    chunks = torch.zeros(total, 2, dtype=torch.int16)
    iteration = torch.arange(first.shape[0])[:, None].expand_as(first)  # [T, G]
    valid = iteration < n_steps[None, :]
    step_id = (group_ptr[:-1][None, :] + iteration)[valid]
    chunks[step_id, 0] = first[valid].to(torch.int16)
    chunks[step_id, 1] = second[valid].to(torch.int16)
    for taken, chunk, ordinal, bit in (
        (take_first, first, ordinal_first, 0),
        (take_second, second, ordinal_second, LANES),
    ):
        t, g, lane = taken.nonzero(as_tuple=True)
        row = g * LANES + lane
        c = chunk[t, g]
        entry = chunk_start[row * n_chunks + c] + ordinal[t, g, lane]
        column = position[entry, 1]
        step = group_ptr[g] + t
        values[step, lane] = sub_weight[row, column]
        lanes[step, lane] = (column - c * LANES + bit).to(torch.uint8)
    lane_rows: torch.Tensor | None = None
    if n_rows != mask.shape[0] or not torch.equal(rows, torch.arange(n_rows)):
        lane_rows = torch.full((n_groups * LANES,), -1, dtype=torch.int64)
        lane_rows[:n_rows] = rows
    return BlockedArrays(values=values, lanes=lanes, chunks=chunks, group_ptr=group_ptr, lane_rows=lane_rows)


_Schedule = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def _greedy_schedule(counts: torch.Tensor) -> _Schedule:
    """Steps for all groups at once. Returns per iteration ``t`` and group ``g``: the two chunks ``[T, G]``,
    which lanes take from each ``[T, G, 16]``, the ordinal of the taken nonzero inside its (row, chunk)
    ``[T, G, 16]``, and the number of steps of each group ``[G]``."""
    remaining = counts.to(torch.int32).clone()
    taken = torch.zeros_like(remaining)
    n_groups = counts.shape[0]
    group = torch.arange(n_groups)
    records: list[tuple[torch.Tensor, ...]] = []
    n_steps = torch.zeros(n_groups, dtype=torch.int64)
    while True:
        has = remaining > 0  # [G, 16, C]
        left = remaining.sum(-1)  # [G, 16]
        busy = left.sum(-1) > 0
        if not bool(busy.any()):
            break
        n_steps += busy
        priority = left.to(torch.float32)[:, :, None]
        served = (has * priority).sum(1)  # [G, C]
        first = served.argmax(1)
        first_has = has[group, :, first]  # [G, 16]
        complement = (has & ~first_has[:, :, None]) * priority
        score = complement.sum(1)
        score[group, first] = -1.0
        second = score.argmax(1)
        r_first = remaining[group, :, first]
        r_second = remaining[group, :, second]
        take_first = (r_first > 0) & ((r_first >= r_second) | (r_second == 0))
        take_second = ~take_first & (r_second > 0) & (second != first)[:, None]
        ordinal_first = taken[group, :, first].clone()
        ordinal_second = taken[group, :, second].clone()
        remaining[group, :, first] -= take_first.to(torch.int32)
        taken[group, :, first] += take_first.to(torch.int32)
        remaining[group, :, second] -= take_second.to(torch.int32)
        taken[group, :, second] += take_second.to(torch.int32)
        records.append((first, second, take_first, take_second, ordinal_first, ordinal_second))
    return _stack(records, n_groups, n_steps)


def _aligned_schedule(counts: torch.Tensor) -> _Schedule:
    """Fixed chunk pairs (2c, 2c + 1): for each pair, as many steps as its busiest lane needs."""
    n_groups, _, n_chunks = counts.shape
    pair_counts = counts.view(n_groups, LANES, n_chunks // 2, 2)
    per_pair = pair_counts.sum(-1)  # [G, 16, P]
    steps_per_pair = per_pair.amax(1)  # [G, P]
    n_steps = steps_per_pair.sum(1)
    n_iterations = int(n_steps.max()) if n_steps.numel() else 0
    # Iteration t of group g works on pair p(t, g) and is its s-th step there.
    pair_of = torch.zeros(n_iterations, n_groups, dtype=torch.int64)
    rank = torch.zeros(n_iterations, n_groups, dtype=torch.int64)
    for g in range(n_groups):
        pairs = torch.repeat_interleave(torch.arange(steps_per_pair.shape[1]), steps_per_pair[g])
        pair_of[: len(pairs), g] = pairs
        starts = torch.cumsum(steps_per_pair[g], 0) - steps_per_pair[g]
        rank[: len(pairs), g] = torch.arange(len(pairs)) - starts[pairs]
    group = torch.arange(n_groups)[None, :, None]
    lane = torch.arange(LANES)[None, None, :]
    first_count = pair_counts[group, lane, pair_of[:, :, None], 0]  # [T, G, 16]
    pair_total = per_pair[group, lane, pair_of[:, :, None]]
    s = rank[:, :, None]
    active = (torch.arange(n_iterations)[:, None] < n_steps[None, :])[:, :, None]
    take_first = active & (s < first_count)
    take_second = active & ~take_first & (s < pair_total)
    ordinal_first = s.expand_as(take_first).clone()
    ordinal_second = (s - first_count).clamp(min=0)
    first = 2 * pair_of
    second = 2 * pair_of + 1
    return first, second, take_first, take_second, ordinal_first, ordinal_second, n_steps


def _stack(records: list[tuple[torch.Tensor, ...]], n_groups: int, n_steps: torch.Tensor) -> _Schedule:
    if not records:
        empty = torch.zeros(0, n_groups, dtype=torch.int64)
        flags = torch.zeros(0, n_groups, LANES, dtype=torch.bool)
        ordinals = torch.zeros(0, n_groups, LANES, dtype=torch.int64)
        return empty, empty, flags, flags, ordinals, ordinals, n_steps
    columns = list(zip(*records, strict=True))
    first, second = torch.stack(columns[0]), torch.stack(columns[1])
    take_first, take_second = torch.stack(columns[2]), torch.stack(columns[3])
    ordinal_first, ordinal_second = torch.stack(columns[4]).long(), torch.stack(columns[5]).long()
    return first, second, take_first, take_second, ordinal_first, ordinal_second, n_steps
