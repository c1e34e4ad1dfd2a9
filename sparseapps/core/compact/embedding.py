"""`CompactEmbedding`: a trainable embedding table that stores only each row's active entries.

For ``R`` rows of width ``D`` and ``nnz`` active entries the table holds:

- ``values [nnz]``, the Parameter: its gradient and optimizer state (Adam's two moments, Adagrad's sum, ...) have
  its size, not ``R * D``;
- ``row_ptr [R + 1]`` int64 and ``col_indices [nnz]`` (uint8 when ``D <= 256``, int16 up to 32768, else int32):
  CSR rows, columns ascending, so entry ``e`` is the ``e``-th active entry in row-major order. Row ``r``'s size
  ``row_ptr[r + 1] - row_ptr[r]`` is that user's or item's embedding size.

Why CSR offsets and not rows bucketed by size: a lookup gathers ``k_r`` entries of each looked-up row, which CSR
does with one offset read per row whatever the sizes, and a topology update, where row sizes change, rebuilds the
offsets with one ``cumsum``; buckets would move rows between tensors at every update and need one gather per
bucket per lookup. CSR costs 8 bytes per row (``row_ptr``) and 1 per entry (``col_indices``) beside the values.

A lookup ``ids [N] -> [N, D]`` returns exactly the rows of the masked dense table (zeros at inactive entries); its
backward writes the looked-up rows' active entries only (a ``[nnz]`` gradient, zero elsewhere). ``dense()`` is a
differentiable ``[R, D]`` view for computations that read the table whole (graph propagation). Nothing of size
``R * D`` is kept between steps; with ``capture_dense_grad`` set (the engine sets it for the step before a
growth-by-gradient update) the backward also adds up the looked-up rows' full output gradients, the gradient the
growth criterion reads, freed at the update. They are held as those rows only (:meth:`gradient_rows`: the rows
one step looks up, ``[U, D]``, e.g. 23 MB instead of 227 MB for a 221,588 x 256 table and a batch of 8,192 users
and 16,384 items); every other row of a table's gradient is 0, and the compact growth scan reads them as such. A
``dense()`` view's backward captures the whole ``[R, D]``.

The table follows the compact-storage interface of :class:`~sparseapps.core.compact.CompactLinear` (``values``,
``nnz``, ``weight_shape``, ``row_ptr``, ``positions()``, ``mask()``, ``to_dense_weight()``, ``set_mask()``,
``capture_dense_grad`` / ``dense_grad``), so :class:`~sparseapps.core.DynamicSparsity` drives both through
``sparseapps.core.compact.storage``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparseapps.core.accounting import index_bytes
from sparseapps.core.compact.layer import (
    CompactLinear,
    Repack,
    check_csr_structure,
    merged_positions,
    move_entries,
    resize_to_checkpoint,
)
from sparseapps.core.kernels import formats

__all__ = ["CompactEmbedding", "column_dtype", "compact_lookup"]


def column_dtype(dim: int) -> torch.dtype:
    """The narrowest column-index dtype for rows of width ``dim``: uint8, int16 or int32."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}[index_bytes(dim)]


class CompactEmbedding(nn.Module):
    """An embedding table ``[R, D]`` holding only its active entries: ``ids [N] -> rows [N, D]``, trainable.

    Called like ``nn.Embedding`` (``input``), or like a sum-pooled ``nn.EmbeddingBag`` when ``offsets`` are given
    (torchrec's ``EmbeddingBagCollection`` calls it so).

    Args:
        weight: ``[R, D]`` dense weight; only the entries of ``mask`` are kept.
        mask: ``[R, D]`` bool, the active entries (rows of any size, empty rows allowed).

    Example:
        >>> table = nn.Embedding(6, 4)
        >>> mask = torch.arange(4) < torch.tensor([1, 2, 4, 0, 3, 2]).unsqueeze(1)
        >>> compact = CompactEmbedding.from_embedding(table, mask)
        >>> ids = torch.tensor([2, 0, 2, 5])
        >>> bool(torch.equal(compact(ids), (table.weight * mask)[ids]))
        True
        >>> compact(ids).sum().backward(); compact.values.grad.shape == (compact.nnz,) == (12,)
        True
    """

    row_ptr: torch.Tensor
    col_indices: torch.Tensor

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D floating-point weight [R, D], got {_describe(weight)}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"expected a bool mask of shape {tuple(weight.shape)}, got {_describe(mask)}")
        self.num_embeddings, self.embedding_dim = (int(n) for n in weight.shape)
        mask = mask.to(weight.device)
        positions = mask.reshape(-1).nonzero().squeeze(1)  # one int64 index (a 2-D mask index would make two)
        self.values = nn.Parameter(weight.detach().reshape(-1).index_select(0, positions))
        self.register_buffer(
            "row_ptr", formats.row_pointers(positions, self.num_embeddings, self.embedding_dim)
        )
        columns = positions.remainder_(self.embedding_dim).to(column_dtype(self.embedding_dim))
        self.register_buffer("col_indices", columns)
        self.capture_dense_grad = False
        self._captured: torch.Tensor | None = None  # the captured gradient's rows: [U, D], or [R, D] whole
        self._captured_rows: torch.Tensor | None = None  # [U] ascending, which rows; None: the whole table
        self._views: dict[str, Any] | None = None

    @classmethod
    def from_embedding(cls, module: nn.Module, mask: torch.Tensor) -> CompactEmbedding:
        """The active entries ``mask`` of an ``nn.Embedding`` (or sum-pooled ``nn.EmbeddingBag``) as a table."""
        if isinstance(module, nn.EmbeddingBag):
            if module.mode != "sum" or not module.include_last_offset:
                raise ValueError(
                    "expected an EmbeddingBag with mode 'sum' and include_last_offset=True (torchrec's), got mode "
                    f"{module.mode!r}, include_last_offset={module.include_last_offset}"
                )
        elif not isinstance(module, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding or nn.EmbeddingBag, got {type(module).__name__}")
        if module.max_norm is not None or (
            isinstance(module, nn.Embedding) and module.padding_idx is not None
        ):
            raise ValueError("expected a table without max_norm or padding_idx (a compact table has neither)")
        return cls(module.weight, mask)

    @property
    def nnz(self) -> int:
        """Active entries."""
        return self.values.numel()

    @property
    def weight_shape(self) -> torch.Size:
        """``[R, D]``, the shape of the dense table this one stands for."""
        return torch.Size([self.num_embeddings, self.embedding_dim])

    def forward(
        self,
        input: torch.Tensor,  # nn.Embedding's keyword, which torchrec passes
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input [N]`` int ids -> ``[N, D]`` rows; with ``offsets [bags + 1]`` (last offset included, torchrec's
        convention) the sums of each bag's rows ``[bags, D]``."""
        if per_sample_weights is not None:
            raise ValueError(
                "expected no per_sample_weights (a compact table pools by plain sums), got a tensor"
            )
        ids = input.reshape(-1)
        rows = compact_lookup(ids, self.values, self)
        if offsets is None:
            return rows.reshape(*input.shape, self.embedding_dim)
        lengths = offsets.diff().long()
        bags = torch.repeat_interleave(
            torch.arange(len(lengths), device=ids.device), lengths, output_size=len(ids)
        )
        return rows.new_zeros(len(lengths), self.embedding_dim).index_add(0, bags, rows)

    # ------------------------------------------------------------------ dense views (inspection, scores, export)
    def row_sizes(self) -> torch.Tensor:
        """``[R]`` int64 active entries per row: each row's embedding size."""
        return self.row_ptr.diff()

    # The dense views are cached within ``caching_views()`` exactly as CompactLinear's (the same two methods).
    caching_views = CompactLinear.caching_views
    _cached = CompactLinear._cached
    _forget_views = CompactLinear._forget_views

    def positions(self) -> torch.Tensor:
        """``[nnz]`` int64 row-major positions ``row * D + column`` of the entries, ascending (shared within
        :meth:`caching_views`: do not modify)."""

        def build() -> torch.Tensor:
            return formats.entry_positions(self.row_ptr, self.col_indices, self.embedding_dim)

        return self._cached("positions", (self.row_ptr, self.col_indices), build)

    def shared_mask(self) -> torch.Tensor:
        """``[R, D]`` bool, True at the active entries; within :meth:`caching_views` one tensor per topology,
        shared (do not modify)."""

        def build() -> torch.Tensor:
            numel = self.num_embeddings * self.embedding_dim
            mask = torch.zeros(numel, dtype=torch.bool, device=self.row_ptr.device)
            mask[self.positions()] = True
            return mask.view(self.weight_shape)

        return self._cached("mask", (self.row_ptr, self.col_indices), build)

    def mask(self) -> torch.Tensor:
        """``[R, D]`` bool, True at the active entries (a new tensor)."""
        return self.shared_mask().clone()

    def shared_dense_weight(self) -> torch.Tensor:
        """``[R, D]`` the table with zeros at the inactive entries; within :meth:`caching_views` shared until the
        values or the topology change (do not modify)."""
        values = self.values.detach()
        return self._cached(
            "weight", (self.row_ptr, self.col_indices, values), lambda: _scatter(values, self)
        )

    def to_dense_weight(self) -> torch.Tensor:
        """``[R, D]`` the table with zeros at the inactive entries (a new tensor, detached)."""
        return _scatter(self.values.detach(), self)

    def dense(self) -> torch.Tensor:
        """``[R, D]`` the table with zeros at the inactive entries, differentiable in ``values`` (for computations
        that read the table whole, e.g. LightGCN's propagation; a new tensor each call)."""
        return _DenseView.apply(self.values, self)

    # ------------------------------------------------------------------ topology
    def set_mask(self, mask: torch.Tensor) -> Repack:
        """Moves the table to the active entries ``mask [R, D]``: kept entries keep their values (and gradient), new
        ones start at zero, the others are removed.

        The ``values`` Parameter stays the same object (its data is replaced), so an optimizer keeps holding it;
        its per-entry state must be moved with the returned :class:`~sparseapps.core.compact.Repack` (the engine's
        ``CompactTensor.write_mask`` does this).
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != self.weight_shape:
            raise ValueError(
                f"expected a bool mask of shape {tuple(self.weight_shape)}, got {_describe(mask)}"
            )
        new_flat = mask.to(self.row_ptr.device).reshape(-1)
        old_flat = self.shared_mask().reshape(-1)  # built once per topology within caching_views()
        new = new_flat.nonzero().squeeze(1)
        # Both lists ascend by position, so the kept entries come in the same order on either side. Two gathers
        # find them (measured on a 221,588 x 64 table at density 0.2: 70 ms, against 170 ms for a binary search
        # of the kept positions in the new ones).
        return move_entries(
            self,
            new,
            new_flat[self.positions()].nonzero().squeeze(1),
            old_flat[new].nonzero().squeeze(1),
            self.num_embeddings,
            self.embedding_dim,
        )

    def set_positions(self, kept: torch.Tensor, grown: torch.Tensor) -> Repack:
        """:meth:`set_mask` given as what changes: ``kept [K]`` (ascending indices of the entries that stay, into
        ``values``) and ``grown [G]`` (ascending row-major positions of new entries, none active now); no ``[R, D]``
        tensor is built."""
        numel = self.num_embeddings * self.embedding_dim
        new, slots = merged_positions(self.positions(), kept, grown, numel)
        self._forget_views()
        return move_entries(self, new, kept, slots, self.num_embeddings, self.embedding_dim)

    def gradient_factors(self) -> None:
        """A table's captured gradient is held as rows (:meth:`gradient_rows`), never as factors."""
        return None

    def gradient_rows(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(rows [U] ascending int64, gradient [U, D])``: the captured gradient's rows that may be nonzero (every
        other row is 0), or ``(None, [R, D])`` once a :meth:`dense` view captured the whole table; nothing
        captured (the table was not looked up): no rows."""
        if self._captured is None:
            return torch.zeros(0, dtype=torch.int64), self.values.new_zeros(0, self.embedding_dim)
        return self._captured_rows, self._captured

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """The captured gradient as one ``[R, D]`` tensor (built from :meth:`gradient_rows` on each read), or None."""
        if self._captured is None or self._captured_rows is None:
            return self._captured
        dense = self._captured.new_zeros(self.weight_shape)
        return dense.index_copy_(0, self._captured_rows, self._captured)

    @dense_grad.setter
    def dense_grad(self, value: torch.Tensor | None) -> None:
        self._captured, self._captured_rows = value, None

    def accumulate_dense_grad(self, ids: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Adds one backward pass's output gradients ``grad_rows [N, D]`` of rows ``ids [N]`` to the capture (called
        by the backward while ``capture_dense_grad`` is set): the held rows grow by the new ids; each entry sums
        its contributions in the order a dense ``[R, D]`` ``index_add_`` would, so the scores are the same bits."""
        if self._captured is not None and self._captured_rows is None:  # the whole table is held
            self._captured.index_add_(0, ids, grad_rows)
            return
        rows = torch.unique(ids if self._captured_rows is None else torch.cat([self._captured_rows, ids]))
        held = grad_rows.new_zeros(len(rows), self.embedding_dim)
        if self._captured is not None:
            held.index_copy_(0, torch.searchsorted(rows, self._captured_rows), self._captured)
        held.index_add_(0, torch.searchsorted(rows, ids), grad_rows)
        self._captured, self._captured_rows = held, rows

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Loads a checkpoint of any topology of this shape (its nnz may differ)."""
        resize_to_checkpoint(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_csr_structure(
            self.row_ptr, self.col_indices, self.values.numel(), self.num_embeddings, self.embedding_dim
        )

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.num_embeddings * self.embedding_dim)
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, nnz={self.nnz}, density={density:.4g}, "
            f"index={self.col_indices.dtype}"
        )


def compact_lookup(ids: torch.Tensor, values: torch.Tensor, table: CompactEmbedding) -> torch.Tensor:
    """The dense rows ``ids [N] -> [N, D]`` of ``table``'s structure with entries ``values [nnz]``, differentiable
    in ``values`` (the gradient is nonzero at the looked-up rows' entries only).

    Example:
        >>> table = CompactEmbedding(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[True, False], [True, True]]))
        >>> compact_lookup(torch.tensor([1, 0]), table.values, table).tolist()
        [[3.0, 4.0], [1.0, 0.0]]
    """
    return _LookupFunction.apply(ids, values, table)


def _gather_plan(ids: torch.Tensor, table: CompactEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, flat)``: for every active entry of every looked-up row, its position in ``values`` and in the
    flattened ``[N, D]`` output."""
    ids = ids.to(device=table.row_ptr.device, dtype=torch.int64)
    if len(ids):
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= table.num_embeddings:
            raise IndexError(f"expected ids in [0, {table.num_embeddings}), got values from {low} to {high}")
    starts = table.row_ptr.index_select(0, ids)
    lengths = table.row_ptr.index_select(0, ids + 1) - starts
    total = int(lengths.sum())
    first = (
        torch.cumsum(lengths, 0) - lengths
    )  # where each looked-up row's entries start in the gathered list
    source = torch.arange(total, device=ids.device) + torch.repeat_interleave(
        starts - first, lengths, output_size=total
    )
    row_base = torch.arange(len(ids), device=ids.device) * table.embedding_dim
    columns = table.col_indices.index_select(0, source).long()
    flat = torch.repeat_interleave(row_base, lengths, output_size=total) + columns
    return source, flat


class _LookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, ids: torch.Tensor, values: torch.Tensor, table: CompactEmbedding
    ) -> torch.Tensor:
        source, flat = _gather_plan(ids, table)
        out = values.new_zeros(len(ids) * table.embedding_dim)
        out.index_copy_(0, flat, values.index_select(0, source))
        ctx.save_for_backward(source, flat, ids)
        ctx.nnz = values.numel()
        ctx.capture = table if table.capture_dense_grad else None
        return out.view(len(ids), table.embedding_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        source, flat, ids = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[1]:
            grad_values = grad.new_zeros(ctx.nnz).index_add_(
                0, source, grad.reshape(-1).index_select(0, flat)
            )
        if ctx.capture is not None:
            ctx.capture.accumulate_dense_grad(ids.long(), grad)
        return None, grad_values, None


class _DenseView(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, table: CompactEmbedding) -> torch.Tensor:  # type: ignore[override]
        positions = table.positions()
        ctx.save_for_backward(positions)
        ctx.capture = table if table.capture_dense_grad else None
        return _scatter(values, table)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (positions,) = ctx.saved_tensors
        if ctx.capture is not None:
            table = ctx.capture
            table.dense_grad = grad.clone() if table.dense_grad is None else table.dense_grad + grad
        return grad.reshape(-1).index_select(0, positions), None


def _scatter(values: torch.Tensor, table: CompactEmbedding) -> torch.Tensor:
    """``[R, D]`` zeros with ``values [nnz]`` at the table's active entries."""
    dense = values.new_zeros(table.num_embeddings * table.embedding_dim)
    dense.index_copy_(0, table.positions(), values)
    return dense.view(table.weight_shape)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__
