"""DSL: sparse user/item embedding tables trained from the first step under a fixed budget, through the core engine.

Dynamic Sparse Learning (Wang et al., WSDM 2024) keeps a mask on the embedding tables; every ``ΔT`` steps the
``⌈ζ_t·nnz⌉`` smallest-magnitude entries are dropped and as many inactive entries with the largest gradient
magnitude are grown, starting at zero, with ζ decaying by a cosine from 0.5. Each row's number of active entries
is that user's or item's own embedding size. Here the update is the core :class:`DynamicSparsity` engine applied
to the torchrec tables of a :class:`~sparseapps.recsys.models.Recommender`:

- budget ``joint`` (default): one ``(U + I) x D`` table, so users and items draw on one budget (as the official
  code); ``per_table``: a users and an items table, each at the target density;
- growth by the current batch's gradient (``gradient``, as published) or by its running average over steps
  (``momentum``, less biased to the last batch);
- initial masks: ``random`` (Bernoulli-like, as published), ``prefix`` (every row keeps the same leading
  dimensions) or ``nested`` (row ``r`` keeps the leading ``k_r`` dimensions with ``k_r ∝ (1 + popularity_r)^a``).

Why alignment matters: a score ``e_u · e_i`` only uses dimensions active in both rows. Independent random masks
at density ``d`` overlap on about ``d²·D`` dimensions, and gradient growth can only grow an entry whose partner
rows are active in that dimension. Prefix and nested masks share one dimension order, so two rows of sizes
``k_u`` and ``k_i`` overlap on ``min(k_u, k_i)`` dimensions, and rows with long prefixes let the others grow.

After training, :func:`export_compact` stores each table as values + narrow column indices (uint8 for
``D <= 256``, int16 up to 32768) + row offsets (NeuMF adds its small dense MLP head), and :class:`CompactScorer`
serves scores from that storage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.accounting import index_bytes
from sparseapps.recsys.models import (
    LightGCN,
    NeuMF,
    NeuMFHead,
    Recommender,
    UserItemTables,
    csr_tensor,
    normalized_adjacency,
)

SparseMethod = Literal["dsl", "static", "prune"]
InitialMask = Literal["random", "prefix", "nested"]
Growth = Literal["gradient", "momentum"]

SPARSE_METHODS = ("dsl", "static", "prune")
INITIAL_MASKS = ("random", "prefix", "nested")
GROWTH = ("gradient", "momentum")


def _check_fraction(name: str, value: object, *, low_open: bool = True, high: float = 1.0) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and value <= high
    if not ok:
        bracket = "(0" if low_open else "[0"
        raise ValueError(f"{name} must be in {bracket}, {high:g}], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DSLConfig:
    """How the embedding tables are made and kept sparse.

    Example:
        >>> config = DSLConfig(density=0.2)
        >>> config.sparsity_config(("tables.collection.embeddings.nodes.weight",)).sparsity
        0.8
        >>> DSLConfig(density=1.5)
        Traceback (most recent call last):
        ...
        ValueError: density must be in (0, 1], got 1.5
    """

    density: float = field(default=0.2, metadata={"help": "fraction of table entries kept, in (0, 1]"})
    method: SparseMethod = field(
        default="dsl",
        metadata={
            "help": "dsl: drop/grow updates; static: a fixed mask; prune: dense training, one magnitude "
            "pruning at prune_fraction, then fine-tuning"
        },
    )
    init: InitialMask = field(
        default="nested",
        metadata={
            "help": "initial masks: random (as published), prefix or nested (popularity-sized prefixes)"
        },
    )
    grow: Growth = field(
        default="momentum",
        metadata={
            "help": "growth score: gradient (current batch, as published) or momentum (running average)"
        },
    )
    nested_exponent: float = field(
        default=0.5, metadata={"help": "nested masks: row size ∝ (1 + popularity)^exponent (0 = prefix)"}
    )
    update_interval: int = field(default=200, metadata={"help": "optimizer steps between topology updates"})
    drop_fraction: float = field(default=0.5, metadata={"help": "ζ at the first update (cosine decay to 0)"})
    end_fraction: float = field(
        default=0.75, metadata={"help": "fraction of the planned steps after which the topology is frozen"}
    )
    prune_fraction: float = field(
        default=0.5, metadata={"help": "prune: fraction of the planned steps trained dense before pruning"}
    )
    momentum: float = field(
        default=0.99, metadata={"help": "momentum growth: decay of the running average of gradients"}
    )
    rescale_init: bool = field(
        default=False,
        metadata={
            "help": "scale each row's initial active entries by sqrt(D / k_row) to keep row norms (off: equal "
            "on ML-100K, and it makes the first magnitude drops remove popular rows in short runs)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the engine's RNG (random masks, tie noise)"})

    def __post_init__(self) -> None:
        _check_fraction("density", self.density)
        for name, value, choices in (
            ("method", self.method, SPARSE_METHODS),
            ("init", self.init, INITIAL_MASKS),
            ("grow", self.grow, GROWTH),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if (
            not isinstance(self.nested_exponent, int | float)
            or isinstance(self.nested_exponent, bool)
            or not math.isfinite(self.nested_exponent)
            or self.nested_exponent < 0
        ):
            raise ValueError(f"nested_exponent must be a finite number >= 0, got {self.nested_exponent!r}")
        if (
            not isinstance(self.update_interval, int)
            or isinstance(self.update_interval, bool)
            or (self.update_interval < 1)
        ):
            raise ValueError(f"update_interval must be a positive integer, got {self.update_interval!r}")
        _check_fraction("drop_fraction", self.drop_fraction)
        _check_fraction("end_fraction", self.end_fraction)
        _check_fraction("prune_fraction", self.prune_fraction, high=1.0)
        _check_fraction("momentum", self.momentum, low_open=False, high=0.999999)
        if not isinstance(self.rescale_init, bool):
            raise ValueError(f"rescale_init must be a bool, got {self.rescale_init!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def sparsity_config(self, include: tuple[str, ...], *, rows: str = "all") -> SparsityConfig:
        """The core engine's configuration for the table weights named by ``include`` (fqns).

        ``rows="looked_up"`` restricts the per-step masking to the rows each batch looked up (for models that
        read their tables only through lookups, as MF does); see ``SparsityConfig.embedding_rows``.
        """
        common: dict[str, Any] = dict(
            sparsity=round(1.0 - self.density, 12),
            distribution="uniform",
            module_types=("embedding",),
            include=include,
            seed=self.seed,
            embedding_rows=rows,
        )
        if self.method == "static":
            return SparsityConfig(method="static", grow="none", **common)
        if self.method == "prune":
            return SparsityConfig(
                method="one_shot", grow="none", start_fraction=self.prune_fraction, **common
            )
        return SparsityConfig(
            method="dst",
            drop="magnitude",
            grow=self.grow,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            drop_schedule="cosine",
            end_fraction=self.end_fraction,
            momentum=self.momentum,
            **common,
        )


def nested_row_sizes(
    popularity: np.ndarray, budget: int, dim: int, exponent: float, *, minimum: int = 1
) -> np.ndarray:
    """Row sizes ``k_r ∝ (1 + popularity_r)^exponent`` clipped to ``[minimum, dim]`` that sum to ``budget``.

    ``exponent = 0`` gives equal sizes (the remainder goes to the most popular rows). Rounding is by largest
    remainder, so the sum is exact.

    Args:
        popularity: ``[R]`` non-negative interaction counts.
        budget: total active entries, in ``[R * minimum, R * dim]``.
        dim: the row width ``D``.
        exponent: ``a >= 0``.
        minimum: smallest row size.

    Returns:
        ``[R]`` int64 sizes.

    Example:
        >>> nested_row_sizes(np.array([0, 3, 15]), budget=9, dim=8, exponent=1.0).tolist()
        [1, 2, 6]
        >>> nested_row_sizes(np.array([5, 1, 9]), budget=7, dim=4, exponent=0.0).tolist()
        [2, 2, 3]
    """
    popularity = np.asarray(popularity, dtype=np.float64)
    rows = len(popularity)
    if popularity.ndim != 1 or rows == 0 or bool((popularity < 0).any()):
        raise ValueError(
            f"popularity must be a non-empty [R] array of counts >= 0, got shape {popularity.shape}"
        )
    if not rows * minimum <= budget <= rows * dim:
        raise ValueError(
            f"budget must be in [{rows * minimum}, {rows * dim}] for {rows} rows of sizes {minimum}..{dim}, "
            f"got {budget}"
        )
    weights = (1.0 + popularity) ** float(exponent)

    def total(scale: float) -> float:
        return float(np.clip(scale * weights, minimum, dim).sum())

    low, high = 0.0, float(dim) / float(weights.min())
    for _ in range(200):
        middle = 0.5 * (low + high)
        if total(middle) < budget:
            low = middle
        else:
            high = middle
    ideal = np.clip(high * weights, minimum, dim)
    sizes = np.floor(ideal).astype(np.int64)
    remainder = ideal - sizes + 1e-9 * popularity / (popularity.max() + 1.0)  # ties go to popular rows
    missing = budget - int(sizes.sum())
    if missing > 0:
        open_rows = np.flatnonzero(sizes < dim)
        chosen = open_rows[np.argsort(-remainder[open_rows], kind="stable")[:missing]]
        sizes[chosen] += 1
    elif missing < 0:
        open_rows = np.flatnonzero(sizes > minimum)
        chosen = open_rows[np.argsort(remainder[open_rows], kind="stable")[:-missing]]
        sizes[chosen] -= 1
    return sizes


def prefix_masks(sizes: np.ndarray | torch.Tensor, dim: int) -> torch.Tensor:
    """``[R, D]`` bool: row ``r`` keeps its first ``sizes[r]`` dimensions (one shared dimension order).

    Example:
        >>> prefix_masks(np.array([1, 3]), 4).int().tolist()
        [[1, 0, 0, 0], [1, 1, 1, 0]]
    """
    sizes = torch.as_tensor(np.asarray(sizes), dtype=torch.int64)
    return torch.arange(dim).unsqueeze(0) < sizes.unsqueeze(1)


def aligned_masks(
    config: DSLConfig,
    tables: UserItemTables,
    table_fqns: Mapping[str, str],
    user_popularity: np.ndarray | None,
    item_popularity: np.ndarray | None,
) -> dict[str, torch.Tensor]:
    """The nested (or, with exponent 0, prefix) initial masks ``{fqn: [rows, D] bool}`` of ``config.init``.

    Args:
        config: the DSL settings (``density``, ``init``, ``nested_exponent``).
        tables: the model's tables (their sizes and layout).
        table_fqns: ``{table name: weight fqn}`` of the tables to mask (``nodes``, or ``user_table`` and
            ``item_table``).
        user_popularity, item_popularity: train interactions per user / item (needed by nested masks).
    """
    exponent = config.nested_exponent if config.init == "nested" else 0.0
    if config.init == "nested" and exponent > 0 and (user_popularity is None or item_popularity is None):
        raise ValueError("nested masks need user_popularity and item_popularity, got None")
    users = np.zeros(tables.n_users) if user_popularity is None else np.asarray(user_popularity)
    items = np.zeros(tables.n_items) if item_popularity is None else np.asarray(item_popularity)
    if users.shape != (tables.n_users,) or items.shape != (tables.n_items,):
        raise ValueError(
            f"popularity must have shapes ({tables.n_users},) and ({tables.n_items},), "
            f"got {users.shape} and {items.shape}"
        )
    popularity = {"nodes": np.concatenate([users, items]), "user_table": users, "item_table": items}
    masks = {}
    for name, fqn in table_fqns.items():
        rows = popularity[name]
        budget = max(len(rows), round(config.density * len(rows) * tables.dim))
        masks[fqn] = prefix_masks(nested_row_sizes(rows, budget, tables.dim, exponent), tables.dim)
    return masks


class SparseEmbeddings:
    """DSL (or a static / pruned mask) on a recommender's embedding tables, run by the core engine.

    Construct it after the model and its optimizer; the training loop does not change (the engine hooks the
    optimizer). Each table row's nonzero count is that user's or item's embedding size.

    Args:
        model: an MF, LightGCN or NeuMF :class:`Recommender`.
        optimizer: the optimizer holding the tables' weights.
        config: a :class:`DSLConfig`.
        total_steps: planned optimizer steps (schedules are fractions of it).
        user_popularity: ``[U]`` train interactions per user (nested masks; else may be ``None``).
        item_popularity: ``[I]`` train interactions per item.
        initial_masks: ``{weight fqn: [R, D] bool}`` to start from instead of ``config.init``'s masks (PEP's
            found masks); the budget is their nonzeros. Not with ``method="prune"``.

    Example:
        >>> from sparseapps.recsys.models import MatrixFactorization, ModelConfig
        >>> model = MatrixFactorization(6, 10, ModelConfig(dim=8))
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> sparse = SparseEmbeddings(model, optimizer, DSLConfig(density=0.25, init="prefix"), total_steps=100)
        >>> sparse.density, sparse.row_sizes()[0].tolist()
        (0.25, [2, 2, 2, 2, 2, 2])
    """

    def __init__(
        self,
        model: Recommender,
        optimizer: torch.optim.Optimizer,
        config: DSLConfig,
        total_steps: int,
        *,
        user_popularity: np.ndarray | None = None,
        item_popularity: np.ndarray | None = None,
        initial_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, Recommender):
            raise TypeError(f"model must be a sparseapps.recsys Recommender, got {type(model).__name__}")
        if not isinstance(config, DSLConfig):
            raise TypeError(f"config must be a DSLConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        tables = model.tables
        self.fqns = tables.table_fqns("tables")
        if initial_masks is not None and config.method == "prune":
            raise ValueError(
                "initial_masks need method 'static' or 'dsl' (pruning starts dense), got 'prune'"
            )
        if initial_masks is None and config.method != "prune" and config.init != "random":
            initial_masks = aligned_masks(config, tables, self.fqns, user_popularity, item_popularity)
        self.engine = DynamicSparsity(
            model,
            optimizer,
            config.sparsity_config(
                tuple(self.fqns.values()), rows="all" if model.reads_tables_whole else "looked_up"
            ),
            total_steps,
            initial_masks=initial_masks,
        )
        if config.rescale_init and config.method != "prune":
            self._rescale_rows()

    # ------------------------------------------------------------------ masks
    def _rescale_rows(self) -> None:
        dim = self.model.tables.dim
        with torch.no_grad():
            for param, mask in self.engine.masked_parameters():
                sizes = mask.sum(1, keepdim=True).to(param.dtype)
                param.mul_(torch.where(sizes > 0, (dim / sizes.clamp(min=1)).sqrt(), torch.ones_like(sizes)))

    @property
    def density(self) -> float:
        """Current fraction of active entries over the tables."""
        return self.engine.density

    @property
    def nnz(self) -> int:
        """Active entries over the tables: the model's parameter count."""
        return sum(int(mask.sum()) for mask in self.engine.masks.values())

    def stacked_mask(self) -> torch.Tensor:
        """``[U + I, D]`` bool: the users' rows then the items' rows."""
        masks = [self.engine.masks[self.fqns[name]] for name in self.model.tables.table_modules]
        return masks[0] if len(masks) == 1 else torch.cat(masks)

    def row_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users [U], items [I])`` int64: each row's active entries, i.e. its embedding size."""
        sizes = self.stacked_mask().sum(1)
        return sizes[: self.model.n_users], sizes[self.model.n_users :]

    @property
    def settle_step(self) -> int:
        """The optimizer step after which the mask no longer changes (model selection may start there)."""
        engine = self.engine
        if self.config.method == "static":
            return 0
        if self.config.method == "prune":
            return max(math.floor(engine.config.start_fraction * engine.total_steps), 1)
        return math.floor(engine.config.end_fraction * engine.total_steps)

    def settled(self) -> bool:
        """Whether the topology is final (no pruning or drop/grow update will run again)."""
        return self.engine.step >= self.settle_step

    def state_dict(self) -> dict[str, Any]:
        """The engine's state (masks, schedule position, RNG, momentum) for checkpoints."""
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; refuses a checkpoint of another configuration."""
        self.engine.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Compact storage and serving


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
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
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
    exactly 0 inside the mask is still stored), else from the nonzeros.

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
    masks = [getattr(module, "weight_mask", None) for module in modules.values()]
    weight = tables.stacked().detach()
    if all(mask is not None for mask in masks):
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)  # type: ignore[arg-type]
    else:
        mask = weight != 0
    return CompactEmbeddings(
        users=CompactTable.from_dense(weight[: model.n_users], mask[: model.n_users]),
        items=CompactTable.from_dense(weight[model.n_users :], mask[model.n_users :]),
        model=model.config.model,
        layers=model.config.layers if isinstance(model, LightGCN) else 0,
        head=model.head.to_dict() if isinstance(model, NeuMF) else None,
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
