"""Compact storage of trained embedding tables, and serving scores from it.

:func:`export_compact` stores each table as values + narrow column indices (uint8 for ``D <= 256``, int16 up to
32768) + row offsets (NeuMF adds its small dense MLP head), and :class:`CompactScorer` serves full-ranking scores
from that storage without densifying MF's or NeuMF's item table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparseapps.core.accounting import index_bytes
from sparseapps.core.compact import CompactEmbedding
from sparseapps.core.validation import check_int
from sparseapps.recsys.models import LightGCN, NeuMF, Recommender, csr_tensor, normalized_adjacency
from sparseapps.recsys.neumf import NeuMFHead


def _column_dtype(dim: int) -> torch.dtype:
    width = index_bytes(dim)
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}[width]


@dataclass(frozen=True, kw_only=True, eq=False)
class CompactTable:
    """A sparse ``[R, D]`` table as values + narrow column indices + row offsets (CSR).

    Attributes:
        values: ``[nnz]`` float32, row by row, columns ascending within a row.
        columns: ``[nnz]`` column of each value: uint8 when ``D <= 256``, int16 up to 32768, else int32.
        offsets: ``[R + 1]`` int32 (int64 past 2³¹ - 1 entries): row ``r`` is ``offsets[r]:offsets[r + 1]``.
        dim: ``D``.

    Example:
        >>> table = CompactTable.from_dense(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]))
        >>> table.columns.tolist(), table.offsets.tolist(), table.nbytes
        ([1, 0, 2], [0, 1, 3], 27)
        >>> table.rows(torch.tensor([1])).tolist()
        [[1.0, 0.0, 3.0]]
    """

    values: torch.Tensor
    columns: torch.Tensor
    offsets: torch.Tensor
    dim: int

    def __post_init__(self) -> None:
        check_int("dim", self.dim, low=1)
        if self.values.dim() != 1 or self.columns.shape != self.values.shape:
            raise ValueError(
                f"values and columns must be [nnz] of one length, got {tuple(self.values.shape)} and "
                f"{tuple(self.columns.shape)}"
            )
        if self.columns.dtype != _column_dtype(self.dim):
            raise ValueError(
                f"columns must be {_column_dtype(self.dim)} for dim {self.dim}, got {self.columns.dtype}"
            )
        if self.offsets.dim() != 1 or len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.values):
            raise ValueError(
                f"offsets must be [R + 1] ending at nnz={len(self.values)}, got shape "
                f"{tuple(self.offsets.shape)}"
            )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> CompactTable:
        """Compacts ``weight [R, D]``, keeping the entries where ``mask`` is True (default: the nonzeros)."""
        weight = weight.detach().to("cpu", torch.float32)
        if weight.dim() != 2:
            raise ValueError(f"weight must be [R, D], got shape {tuple(weight.shape)}")
        mask = (weight != 0) if mask is None else mask.to("cpu", torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        rows, columns = mask.nonzero(as_tuple=True)
        counts = mask.sum(1)
        nnz = int(counts.sum())
        offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        offset_dtype = torch.int32 if nnz < 2**31 else torch.int64
        return cls(
            values=weight[rows, columns].contiguous(),
            columns=columns.to(_column_dtype(weight.shape[1])),
            offsets=offsets.to(offset_dtype),
            dim=int(weight.shape[1]),
        )

    @classmethod
    def from_compact_rows(cls, table: CompactEmbedding, start: int, stop: int) -> CompactTable:
        """Rows ``start:stop`` of a trainable :class:`~sparseapps.core.compact.CompactEmbedding`, read straight from
        its storage (the same CSR layout: values copied, offsets rebased, no dense pass).

        Example:
            >>> from sparseapps.core.compact import CompactEmbedding
            >>> weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
            >>> trained = CompactEmbedding(weight, torch.tensor([[True, False], [False, True], [True, True]]))
            >>> part = CompactTable.from_compact_rows(trained, 1, 3)
            >>> part.values.tolist(), part.columns.tolist(), part.offsets.tolist()
            ([4.0, 5.0, 6.0], [1, 0, 1], [0, 1, 3])
        """
        row_ptr = table.row_ptr[start : stop + 1]
        first, last = int(row_ptr[0]), int(row_ptr[-1])
        offset_dtype = torch.int32 if last - first < 2**31 else torch.int64
        return cls(
            values=table.values.detach()[first:last].to("cpu", torch.float32, copy=True),
            columns=table.col_indices[first:last].to("cpu", _column_dtype(table.embedding_dim), copy=True),
            offsets=(row_ptr - first).to("cpu", offset_dtype),
            dim=table.embedding_dim,
        )

    @property
    def n_rows(self) -> int:
        """``R``."""
        return len(self.offsets) - 1

    @property
    def nnz(self) -> int:
        """Stored values."""
        return len(self.values)

    @property
    def nbytes(self) -> int:
        """Bytes of values, columns and offsets together."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.offsets))

    def row_sizes(self) -> torch.Tensor:
        """``[R]`` int64 stored entries per row."""
        return torch.diff(self.offsets.to(torch.int64))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B]`` -> the dense rows ``[B, D]`` (zeros where nothing is stored)."""
        ids = ids.to("cpu", torch.int64)
        starts = self.offsets.to(torch.int64)[ids]
        lengths = self.offsets.to(torch.int64)[ids + 1] - starts
        owner = torch.repeat_interleave(torch.arange(len(ids)), lengths)
        positions = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        source = starts[owner] + positions
        out = torch.zeros(len(ids), self.dim, dtype=self.values.dtype)
        out[owner, self.columns[source].to(torch.int64)] = self.values[source]
        return out

    def to_dense(self) -> torch.Tensor:
        """``[R, D]`` float32 with zeros outside the stored entries."""
        return self.rows(torch.arange(self.n_rows))

    def to_sparse_csr(self) -> torch.Tensor:
        """A ``torch.sparse_csr_tensor`` ``[R, D]`` of the same entries (int64 indices, for matmuls)."""
        return csr_tensor(
            self.offsets.to(torch.int64), self.columns.to(torch.int64), self.values, (self.n_rows, self.dim)
        )

    def to_dict(self) -> dict[str, Any]:
        """Tensors and ``dim``, for ``torch.save``."""
        return {"values": self.values, "columns": self.columns, "offsets": self.offsets, "dim": self.dim}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompactTable:
        """Inverse of :meth:`to_dict`."""
        return cls(
            values=values["values"], columns=values["columns"], offsets=values["offsets"], dim=values["dim"]
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class CompactEmbeddings:
    """A trained recommender's tables in compact storage, plus what serving needs to score.

    Attributes:
        users: ``[U, D]`` :class:`CompactTable`.
        items: ``[I, D]`` :class:`CompactTable`.
        model: ``"mf"``, ``"lightgcn"`` or ``"neumf"``.
        layers: LightGCN's ``K`` (0 for the others).
        head: NeuMF's dense layers as :meth:`~sparseapps.recsys.models.NeuMFHead.to_dict` gives them (not
            counted in :attr:`nbytes`); ``None`` for the others.
    """

    users: CompactTable
    items: CompactTable
    model: str
    layers: int = 0
    head: Mapping[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of both tables (values, indices and offsets)."""
        return self.users.nbytes + self.items.nbytes

    @property
    def nnz(self) -> int:
        """Stored values: the parameter count."""
        return self.users.nnz + self.items.nnz

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same tables as dense float32."""
        return 4 * (self.users.n_rows + self.items.n_rows) * self.users.dim

    @property
    def head_nbytes(self) -> int:
        """Bytes of NeuMF's dense head (0 for the others)."""
        if self.head is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.head["state"].values())

    def to_dict(self) -> dict[str, Any]:
        """Plain form for ``torch.save``."""
        values = {
            "users": self.users.to_dict(),
            "items": self.items.to_dict(),
            "model": self.model,
            "layers": self.layers,
        }
        if self.head is not None:
            values["head"] = dict(self.head)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompactEmbeddings:
        """Inverse of :meth:`to_dict`."""
        return cls(
            users=CompactTable.from_dict(values["users"]),
            items=CompactTable.from_dict(values["items"]),
            model=str(values["model"]),
            layers=int(values["layers"]),
            head=values.get("head"),
        )


def export_compact(model: Recommender) -> CompactEmbeddings:
    """The model's layer-0 tables in compact storage: masked entries (or exact zeros when dense) are dropped.

    Entries are taken from each table's mask buffer when it has one (so a trained weight that happens to be
    exactly 0 inside the mask is still stored), else from the nonzeros; compact tables
    (``storage="compact"``) are read straight from their storage.

    Example:
        >>> from sparseapps.recsys.models import MatrixFactorization, ModelConfig
        >>> compact = export_compact(MatrixFactorization(3, 4, ModelConfig(dim=8)))
        >>> compact.nnz, compact.nbytes, compact.dense_nbytes
        (56, 316, 224)
    """
    if not isinstance(model, Recommender):
        raise TypeError(f"model must be a sparseapps.recsys Recommender, got {type(model).__name__}")
    tables = model.tables
    modules = tables.table_modules
    common = dict(
        model=model.config.model,
        layers=model.config.layers if isinstance(model, LightGCN) else 0,
        head=model.head.to_dict() if isinstance(model, NeuMF) else None,
    )
    if tables.compact:  # the training storage is the serving format: no dense pass
        if tables.layout == "joint":
            nodes, n_users = modules["nodes"], model.n_users
            users = CompactTable.from_compact_rows(nodes, 0, n_users)
            items = CompactTable.from_compact_rows(nodes, n_users, nodes.num_embeddings)
        else:
            user_table, item_table = modules["user_table"], modules["item_table"]
            users = CompactTable.from_compact_rows(user_table, 0, user_table.num_embeddings)
            items = CompactTable.from_compact_rows(item_table, 0, item_table.num_embeddings)
        return CompactEmbeddings(users=users, items=items, **common)
    masks = [getattr(module, "weight_mask", None) for module in modules.values()]
    weight = tables.stacked().detach()
    if all(mask is not None for mask in masks):
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)  # type: ignore[arg-type]
    else:
        mask = weight != 0
    return CompactEmbeddings(
        users=CompactTable.from_dense(weight[: model.n_users], mask[: model.n_users]),
        items=CompactTable.from_dense(weight[model.n_users :], mask[model.n_users :]),
        **common,
    )


class CompactScorer:
    """Serves full-ranking scores ``users [B] -> [B, I]`` from :class:`CompactEmbeddings`.

    MF scores straight from the compact tables: the batch's user rows are expanded and multiplied by the item
    table held as a sparse CSR matrix, so the table is never densified. LightGCN's final embeddings are
    propagations over the graph, dense by nature: they are computed once from the compact layer-0 tables
    when the scorer is built. NeuMF keeps the item table as a sparse CSR matrix too: its GMF scores and the
    items' part of the first MLP layer are products with it, in
    :meth:`~sparseapps.recsys.models.NeuMFHead.rank_scores`, the code the dense model ranks with.

    Args:
        compact: the exported tables.
        train_pairs: LightGCN only: the ``[N, 2]`` train pairs that define the graph.

    Example:
        >>> from sparseapps.recsys.models import MatrixFactorization, ModelConfig
        >>> model = MatrixFactorization(3, 4, ModelConfig(dim=8))
        >>> scores = CompactScorer(export_compact(model))(torch.tensor([0, 2]))
        >>> torch.allclose(scores, model.scorer()(torch.tensor([0, 2])), atol=1e-6)
        True
    """

    def __init__(
        self, compact: CompactEmbeddings, train_pairs: np.ndarray | torch.Tensor | None = None
    ) -> None:
        if not isinstance(compact, CompactEmbeddings):
            raise TypeError(f"compact must be CompactEmbeddings, got {type(compact).__name__}")
        self.compact = compact
        self._items_csr = torch.empty(0)
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        self._head: NeuMFHead | None = None
        self._item_hidden = torch.empty(0)
        if compact.model == "lightgcn":
            if train_pairs is None:
                raise ValueError("a LightGCN scorer needs train_pairs to rebuild the graph, got None")
            n_users = compact.users.n_rows
            adjacency = normalized_adjacency(train_pairs, n_users, compact.items.n_rows)
            layer = torch.cat([compact.users.to_dense(), compact.items.to_dense()])
            total = layer
            for _ in range(compact.layers):
                layer = adjacency @ layer
                total = total + layer
            final = total / (compact.layers + 1)
            self._final = (final[:n_users], final[n_users:].t().contiguous())
        elif compact.model == "mf":
            self._items_csr = compact.items.to_sparse_csr()
        elif compact.model == "neumf":
            if compact.head is None:
                raise ValueError("a NeuMF scorer needs the exported MLP head (compact.head), got None")
            self._head = NeuMFHead.from_dict(compact.head)
            self._items_csr = compact.items.to_sparse_csr()
            with torch.no_grad():
                self._item_hidden = self._head.item_hidden(self._items_csr)
        else:
            raise ValueError(f"compact.model must be 'mf', 'lightgcn' or 'neumf', got {compact.model!r}")

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        """``users [B]`` int64 -> scores ``[B, I]``."""
        if self._final is not None:
            user_final, items_t = self._final
            return user_final[users.to("cpu", torch.int64)] @ items_t
        user_rows = self.compact.users.rows(users)
        if self._head is not None:
            with torch.no_grad():
                return self._head.rank_scores(user_rows, self._items_csr, self._item_hidden)
        return (self._items_csr @ user_rows.t()).t()
