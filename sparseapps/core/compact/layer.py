"""`CompactLinear`: a trainable Linear layer that stores only its active weights, forward and backward sparse.

For ``out`` outputs, ``in`` inputs and ``nnz`` active weights the layer holds:

- ``values [nnz]``, the Parameter: its gradient and optimizer state have its size, not ``out * in``;
- ``row_ptr [out + 1]`` int64 and ``col_indices [nnz]`` int16 (int32 when ``in > 32768``): CSR rows, columns
  ascending, so entry ``e`` is the ``e``-th active weight in row-major order;
- the transposed structure for the input gradient, rebuilt only when the topology changes: ``t_row_ptr [in + 1]``,
  ``t_indices [nnz]`` (output rows, int16 when ``out <= 32768``) and ``t_order [nnz]`` (int32: where each
  transposed entry's value sits in ``values``);
- ``bias [out]`` (or none).

Forward ``y = x W^T + b`` is the compiled ``csr_linear`` over the rows; the input gradient ``dx = dy W`` is the
same kernel over the transposed structure; the weight gradient ``csr_sddmm`` is computed on the active entries
only. Nothing of size ``out * in`` is allocated. With ``capture_dense_grad`` set (the engine sets it for the step
before a growth-by-gradient update) the layer keeps that step's dense gradient ``dy^T x`` as its factors ``dy [B,
out]`` and ``x [B, in]`` when they are smaller than ``out * in`` entries (the growth scan forms the product a block
of rows at a time), else as the product. float32 runs
on the compiled kernels (or their reference twins under ``SPARSEAPPS_KERNELS=reference``); other dtypes
(float64 for gradient checks) on the reference twins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseapps.core.kernels import formats, library, reference
from sparseapps.core.rules import flat_nonzero

__all__ = [
    "CompactLinear",
    "Repack",
    "check_csr_structure",
    "compact_linear",
    "merged_positions",
    "move_entries",
    "resize_to_checkpoint",
]


@dataclass(frozen=True)
class Repack:
    """How the entries of one topology map onto the next: kept entries move, new ones start at zero.

    Attributes:
        old_positions: ``[K]`` int64 positions in the old ``values`` of the entries kept.
        new_positions: ``[K]`` int64 positions of the same entries in the new ``values``.
        nnz: the new number of entries.

    Example:
        >>> repack = Repack(torch.tensor([0, 2]), torch.tensor([1, 2]), nnz=3)
        >>> repack.apply(torch.tensor([5.0, 6.0, 7.0]))
        tensor([0., 5., 7.])
    """

    old_positions: torch.Tensor
    new_positions: torch.Tensor
    nnz: int

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[old nnz, *]`` (values, a gradient, an optimizer state) -> ``[nnz, *]``, zeros where entries are new."""
        moved = tensor.new_zeros((self.nnz, *tensor.shape[1:]))
        # index_select + index_copy_: ~5x faster than indexed assignment for millions of entries
        return moved.index_copy_(0, self.new_positions, tensor.index_select(0, self.old_positions))


class CompactLinear(nn.Module):
    """A Linear layer with only its active weights: ``[*, in] -> [*, out]``, trainable, sparse both ways.

    Args:
        weight: ``[out, in]`` dense weight; only the entries of ``mask`` are kept.
        mask: ``[out, in]`` bool, the active entries (any fan-in; empty rows allowed).
        bias: ``[out]`` or None.

    Example:
        >>> linear = nn.Linear(64, 32)
        >>> layer = CompactLinear.from_linear(linear, torch.rand(32, 64) < 0.1)
        >>> x = torch.randn(8, 64)
        >>> dense = nn.functional.linear(x, layer.to_dense_weight(), linear.bias)
        >>> bool(torch.allclose(layer(x), dense, atol=1e-5))
        True
        >>> layer(x).sum().backward(); layer.values.grad.shape == layer.values.shape
        True
    """

    row_ptr: torch.Tensor
    col_indices: torch.Tensor
    t_row_ptr: torch.Tensor
    t_indices: torch.Tensor
    t_order: torch.Tensor

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D floating-point weight [out, in], got {_describe(weight)}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"expected a bool mask of shape {tuple(weight.shape)}, got {_describe(mask)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
            raise ValueError(f"expected a bias of shape [{weight.shape[0]}] or None, got {_describe(bias)}")
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        mask = mask.to(weight.device)
        row_ptr, col_indices = formats.csr_structure(mask, formats.index_dtype_for(self.in_features))
        self.values = nn.Parameter(weight.detach()[mask].clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_indices", col_indices)
        self.capture_dense_grad = False
        self._captured: torch.Tensor | None = None  # the captured dense gradient, or the part formed so far
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # the rest, as (dy, x) pairs
        self._views: (
            dict[str, tuple[tuple[torch.Tensor, ...], tuple[tuple[int, int, int], ...], torch.Tensor]] | None
        )
        self._views = None
        self._build_transpose()

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> CompactLinear:
        """The active entries ``mask`` of ``linear`` (its bias too), as a compact layer."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, mask, linear.bias)

    @property
    def nnz(self) -> int:
        """Active weights."""
        return self.values.numel()

    @property
    def weight_shape(self) -> torch.Size:
        """``[out, in]``, the shape of the dense weight this layer stands for."""
        return torch.Size([self.out_features, self.in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected input [*, {self.in_features}], got {tuple(x.shape)}")
        return compact_linear(x, self.values, self.bias, self)

    # ------------------------------------------------------------------ dense views (inspection, scores, export)
    @contextlib.contextmanager
    def caching_views(self) -> Iterator[None]:
        """Within this block the dense views (positions, mask, weight) are built once and shared.

        A topology update reads the mask and the positions a dozen times, and each build costs a pass over
        ``out * in`` entries; outside the block nothing of that size is kept. An entry holds its source tensors
        (so their storage cannot be reused by another tensor while it lives) and is valid while every source has
        the same storage and the same in-place version.
        """
        outer = self._views is not None
        if not outer:
            self._views = {}
        try:
            yield
        finally:
            if not outer:
                self._views = None

    def _cached(
        self, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if self._views is None:
            return build()
        key = tuple((t.untyped_storage().data_ptr(), t.data_ptr(), t._version) for t in sources)
        cached = self._views.get(name)
        if cached is None or cached[1] != key:
            cached = (sources, key, build())
            self._views[name] = cached
        return cached[2]

    def _forget_views(self) -> None:
        """Drops the views cached for the topology that is being replaced (a re-pack allocates the new one's
        arrays while these would otherwise live until the end of :meth:`caching_views`)."""
        if self._views is not None:
            self._views.clear()

    def positions(self) -> torch.Tensor:
        """``[nnz]`` int64 row-major positions ``row * in + column`` of the entries, ascending (shared within
        :meth:`caching_views`: do not modify)."""

        def build() -> torch.Tensor:
            return formats.entry_positions(self.row_ptr, self.col_indices, self.in_features)

        return self._cached("positions", (self.row_ptr, self.col_indices), build)

    def shared_mask(self) -> torch.Tensor:
        """``[out, in]`` bool, True at the active entries; within :meth:`caching_views` one tensor per topology,
        shared (do not modify)."""

        def build() -> torch.Tensor:
            mask = torch.zeros(
                self.out_features * self.in_features, dtype=torch.bool, device=self.row_ptr.device
            )
            mask[self.positions()] = True
            return mask.view(self.weight_shape)

        return self._cached("mask", (self.row_ptr, self.col_indices), build)

    def mask(self) -> torch.Tensor:
        """``[out, in]`` bool, True at the active entries (a new tensor)."""
        return self.shared_mask().clone()

    def shared_dense_weight(self) -> torch.Tensor:
        """``[out, in]`` the weight with zeros at the inactive entries; within :meth:`caching_views` shared until
        the values or the topology change (do not modify)."""
        values = self.values.detach()

        def build() -> torch.Tensor:
            weight = values.new_zeros(self.out_features * self.in_features)
            weight[self.positions()] = values
            return weight.view(self.weight_shape)

        return self._cached("weight", (self.row_ptr, self.col_indices, values), build)

    def to_dense_weight(self) -> torch.Tensor:
        """``[out, in]`` the weight with zeros at the inactive entries (a new tensor, detached)."""
        return self.shared_dense_weight().clone()

    # ------------------------------------------------------------------ topology
    def set_mask(self, mask: torch.Tensor) -> Repack:
        """Moves the layer to the active entries ``mask [out, in]``: kept entries keep their values (and gradient),
        new ones start at zero, the others are removed.

        The ``values`` Parameter stays the same object (its data is replaced), so an optimizer keeps holding it;
        its per-entry state must be moved with the returned :class:`Repack` (the engine does this).
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != self.weight_shape:
            raise ValueError(
                f"expected a bool mask of shape {tuple(self.weight_shape)}, got {_describe(mask)}"
            )
        new_flat = mask.to(self.row_ptr.device).reshape(-1)
        old = self.positions()
        new = flat_nonzero(new_flat)
        # Both lists ascend by position, so the kept entries come in the same order on either side. The old
        # mask is the one the update's scores already built (shared within caching_views).
        return self._move_to(
            new, flat_nonzero(new_flat[old]), flat_nonzero(self.shared_mask().reshape(-1)[new])
        )

    def set_positions(self, kept: torch.Tensor, grown: torch.Tensor) -> Repack:
        """:meth:`set_mask` given as what changes: ``kept [K]`` (ascending indices of the entries that stay, into
        ``values``) and ``grown [G]`` (ascending row-major positions of new entries, none active now).

        The topology update of compact storage: no ``[out, in]`` tensor is built.
        """
        new, slots = merged_positions(self.positions(), kept, grown, self.out_features * self.in_features)
        self._forget_views()
        return self._move_to(new, kept, slots)

    def _move_to(self, new: torch.Tensor, old_index: torch.Tensor, new_index: torch.Tensor) -> Repack:
        repack = move_entries(self, new, old_index, new_index, self.out_features, self.in_features)
        self._build_transpose()
        return repack

    def _build_transpose(self) -> None:
        """The transposed structure (entries by input column, output rows ascending within a column)."""
        t_dtype = formats.index_dtype_for(self.out_features)
        args = (self.row_ptr, self.col_indices, self.in_features, t_dtype)
        if self.row_ptr.device.type == "cpu" and library.ensure_loaded().compiled:
            t_row_ptr, t_indices, t_order = torch.ops.sparseapps.csr_transpose(*args)  # a counting sort
        else:
            t_row_ptr, t_indices, t_order = reference.csr_transpose_reference(*args)
        self.register_buffer("t_row_ptr", t_row_ptr, persistent=False)
        self.register_buffer("t_indices", t_indices, persistent=False)
        self.register_buffer("t_order", t_order, persistent=False)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Loads a checkpoint of any topology of this shape (its nnz may differ), then rebuilds the transpose."""
        resize_to_checkpoint(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_csr_structure(
            self.row_ptr, self.col_indices, self.values.numel(), self.out_features, self.in_features
        )
        self._build_transpose()

    # ------------------------------------------------------------------ the captured dense gradient
    def accumulate_dense_grad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Adds one backward pass's dense gradient ``dy^T x`` (``dy [B, out]``, ``x [B, in]``; called by the
        backward while :attr:`capture_dense_grad` is set). Kept as factors while all of them hold fewer entries
        than ``out * in``, else formed; returns the product when it formed it (the backward reads its entries)."""
        rows = x.shape[0] + sum(f[1].shape[0] for f in self._factors)
        if rows * (self.in_features + self.out_features) < self.in_features * self.out_features:
            self._factors.append((dy.detach(), x.detach()))
            return None
        product = dy.mT.mm(x)
        self._captured = product if self._captured is None else self._captured + product
        return product

    def gradient_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(dy [B, out], x [B, in])`` with ``dense_grad == dy^T x``, while the capture is held as factors only."""
        if self._captured is not None or not self._factors:
            return None
        if len(self._factors) == 1:
            return self._factors[0]
        return torch.cat([f[0] for f in self._factors]), torch.cat([f[1] for f in self._factors])

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """``[out, in]`` the captured dense gradient (formed from its factors at the first read), or None."""
        for dy, x in self._factors:
            product = dy.mT.mm(x)
            self._captured = product if self._captured is None else self._captured + product
        self._factors = []
        return self._captured

    @dense_grad.setter
    def dense_grad(self, value: torch.Tensor | None) -> None:
        self._captured, self._factors = value, []

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.out_features * self.in_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"density={density:.4g}, bias={self.bias is not None}, index={self.col_indices.dtype}"
        )


def merged_positions(
    positions: torch.Tensor, kept: torch.Tensor, grown: torch.Tensor, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new, slots)``: the ascending positions of ``positions[kept]`` and ``grown`` together, and where each kept
    entry lands in them (a compact module's ``set_positions``).

    Raises:
        ValueError: ``kept`` does not index ``positions`` or ``grown`` lies outside ``[0, numel)``.
    """
    kept = kept.to(positions.device)
    grown = grown.to(positions.device)
    if kept.numel() and not (int(kept[0]) >= 0 and int(kept[-1]) < positions.numel()):
        raise ValueError(f"kept entries must index the {positions.numel()} current entries")
    if grown.numel() and not (int(grown[0]) >= 0 and int(grown[-1]) < numel):
        raise ValueError(f"grown positions must lie in [0, {numel})")
    kept_positions = positions.index_select(0, kept)
    if kept_positions.device.type == "cpu" and library.ensure_loaded().compiled:
        new, slots = torch.ops.sparseapps.merge_positions(kept_positions, grown)
        return new, slots
    return reference.merge_positions_reference(kept_positions, grown)


def move_entries(
    module: nn.Module,
    new: torch.Tensor,
    old_index: torch.Tensor,
    new_index: torch.Tensor,
    rows: int,
    columns: int,
) -> Repack:
    """Moves a compact module's ``values`` (and their gradient) to the ascending positions ``new`` of its
    ``[rows, columns]`` shape, entry ``old_index[k]`` becoming entry ``new_index[k]``, and rebuilds ``row_ptr`` and
    ``col_indices`` (``new`` is overwritten); returns the :class:`Repack` for the optimizer state."""
    repack = Repack(old_index, new_index, nnz=new.numel())
    with torch.no_grad():
        module.values.data = repack.apply(module.values.detach())
        if module.values.grad is not None:
            module.values.grad = repack.apply(module.values.grad)
    module.row_ptr = formats.row_pointers(new, rows, columns)
    module.col_indices = new.remainder_(columns).to(module.col_indices.dtype)  # `new` is spent
    return repack


def check_csr_structure(
    row_ptr: torch.Tensor, col_indices: torch.Tensor, nnz: int, rows: int, columns: int
) -> None:
    """Raises ``ValueError`` unless ``row_ptr [rows + 1]`` runs from 0 to ``nnz`` without decreasing and
    ``col_indices [nnz]`` lie in ``[0, columns)`` (a compact layer's or table's structure, e.g. from a checkpoint)."""
    valid = (
        row_ptr.shape == (rows + 1,)
        and col_indices.shape == (nnz,)
        and int(row_ptr[0]) == 0
        and int(row_ptr[-1]) == nnz
        and bool((row_ptr.diff() >= 0).all())
        and (nnz == 0 or 0 <= int(col_indices.min()) <= int(col_indices.max()) < columns)
    )
    if not valid:
        raise ValueError(
            f"expected a CSR structure of {rows} rows from 0 to nnz={nnz} with columns in [0, {columns}), got "
            f"row_ptr {tuple(row_ptr.shape)} from {int(row_ptr[0])} to {int(row_ptr[-1])} and col_indices "
            f"{tuple(col_indices.shape)}"
        )


def resize_to_checkpoint(module: nn.Module, state_dict: Any, prefix: str) -> None:
    """Gives ``module.values`` and ``module.col_indices`` the checkpoint's sizes (its nnz may differ), so that
    ``nn.Module._load_from_state_dict`` can copy into them."""
    values = state_dict.get(prefix + "values")
    indices = state_dict.get(prefix + "col_indices")
    if isinstance(values, torch.Tensor) and values.shape != module.values.shape:
        module.values.data = module.values.detach().new_empty(values.shape)
        module.values.grad = None
    if isinstance(indices, torch.Tensor) and indices.shape != module.col_indices.shape:
        module.col_indices = module.col_indices.new_empty(indices.shape)


def compact_linear(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, layer: CompactLinear
) -> torch.Tensor:
    """``x W^T + b`` for the structure of ``layer`` with weights ``values``, differentiable in all three tensors.

    Args:
        x: ``[*, in]``.
        values: ``[nnz]`` the weights in the layer's entry order.
        bias: ``[out]`` or None.
        layer: the structure (``row_ptr``, ``col_indices`` and the transpose) and the dense-gradient capture.

    Returns:
        ``[*, out]``.
    """
    library.ensure_loaded()
    return _CompactLinearFunction.apply(x, values, bias, layer)


class _CompactLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, layer: CompactLinear
    ) -> torch.Tensor:
        ctx.structure = (layer.row_ptr, layer.col_indices, layer.t_row_ptr, layer.t_indices, layer.t_order)
        ctx.in_features, ctx.out_features = layer.in_features, layer.out_features
        ctx.capture = layer if layer.capture_dense_grad else None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        return _csr_linear(x, layer.row_ptr, values, layer.col_indices, bias, layer.out_features)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, values = ctx.saved_tensors
        row_ptr, col_indices, t_row_ptr, t_indices, t_order = ctx.structure
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            transposed = values.index_select(0, t_order)
            grad_x = _csr_linear(dy, t_row_ptr, transposed, t_indices, None, ctx.in_features)
        dense_grad = None
        if ctx.capture is not None:
            dy2, x2 = dy.reshape(-1, ctx.out_features), x.reshape(-1, ctx.in_features)
            dense_grad = ctx.capture.accumulate_dense_grad(dy2, x2)
        if ctx.needs_input_grad[1]:
            if (
                dense_grad is not None and dense_grad.dtype == values.dtype
            ):  # the active entries of it: no SDDMM
                positions = formats.entry_positions(row_ptr, col_indices, ctx.in_features)
                grad_values = dense_grad.reshape(-1)[positions]
            else:
                grad_values = _csr_sddmm(x, dy, row_ptr, col_indices)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.reshape(-1, ctx.out_features).sum(0)
        return grad_x, grad_values, grad_bias, None


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _csr_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    if values.dtype in _KERNEL_DTYPES:
        return torch.ops.sparseapps.csr_linear(x, row_ptr, values, indices, bias, None, out_features)
    return reference.csr_linear_reference(x, row_ptr, values, indices, bias, None, out_features)


def _csr_sddmm(
    x: torch.Tensor, dy: torch.Tensor, row_ptr: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    if x.dtype == torch.float32:
        return torch.ops.sparseapps.csr_sddmm(x, dy, row_ptr, indices)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # bf16 activations: the float32 kernel over widened copies ([B, in] + [B, out], small beside the layer),
        # the products summed in float32 and rounded once, as a bf16 GEMM with float accumulation does.
        return torch.ops.sparseapps.csr_sddmm(x.float(), dy.float(), row_ptr, indices).to(torch.bfloat16)
    return reference.csr_sddmm_reference(x, dy, row_ptr, indices)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__
