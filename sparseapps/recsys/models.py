"""Recommenders whose user and item embeddings live in torchrec tables: MF-BPR, LightGCN and NeuMF.

MF and LightGCN score a user ``u`` and an item ``i`` by a dot product of final embeddings,
``s(u, i) = e_u · e_i``; NeuMF by a GMF branch and an MLP branch over the same table rows. All three train
with the BPR loss ``-log σ(s(u, i⁺) - s(u, i⁻))`` plus an optional L2 penalty on the batch's layer-0 embeddings.
MF's final embeddings are the table rows; LightGCN's are the mean of ``K + 1`` layers ``E⁽ᵏ⁺¹⁾ = Â E⁽ᵏ⁾`` of
propagation over the normalized user-item graph ``Â = D^-½ A D^-½``.

The tables (``tables.py``) are an unsharded torchrec collection fed by ``KeyedJaggedTensor``s, in a ``joint``
(one ``(U + I) x D`` table, one budget) or ``per_table`` layout; NeuMF's dense layers are in ``neumf.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.recsys.neumf import SCORE_CHUNK_ELEMENTS, NeuMFHead, gmf_column_mask, neumf_widths
from sparseapps.recsys.tables import (
    COLLECTION_KINDS,
    FEATURES,
    LAYOUTS,
    CollectionKind,
    Layout,
    UserItemTables,
)

ModelName = Literal["mf", "lightgcn", "neumf"]
MODEL_NAMES = ("mf", "lightgcn", "neumf")
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "COLLECTION_KINDS",
    "FEATURES",
    "LAYOUTS",
    "MODEL_NAMES",
    "SCORE_CHUNK_ELEMENTS",
    "CollectionKind",
    "Layout",
    "LightGCN",
    "MatrixFactorization",
    "ModelConfig",
    "ModelName",
    "NeuMF",
    "NeuMFHead",
    "Recommender",
    "UserItemTables",
    "bpr_loss",
    "build_model",
    "csr_tensor",
    "gmf_column_mask",
    "neumf_widths",
    "normalized_adjacency",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which recommender and how its embedding tables are laid out.

    Example:
        >>> ModelConfig(model="lightgcn", layers=2).layers
        2
        >>> ModelConfig(dim=0)
        Traceback (most recent call last):
        ...
        ValueError: dim must be an integer >= 1, got 0
    """

    model: ModelName = field(default="mf", metadata={"help": "mf (MF-BPR), lightgcn or neumf"})
    dim: int = field(default=64, metadata={"help": "embedding dimension D"})
    layers: int = field(default=3, metadata={"help": "LightGCN: propagation layers K"})
    layout: Layout = field(
        default="joint",
        metadata={"help": "joint: one (users + items) x D table; per_table: a users and an items table"},
    )
    collection: CollectionKind = field(
        default="embedding",
        metadata={"help": "torchrec module: embedding (EmbeddingCollection) or embedding_bag (EBC)"},
    )
    init_std: float = field(default=0.1, metadata={"help": "std of the normal initialization of the tables"})
    gmf_dim: int | None = field(
        default=None,
        metadata={
            "help": "NeuMF: table columns that feed GMF (spread evenly), the rest feed the MLP; None: D // 2"
        },
    )
    mlp_layers: int = field(
        default=3,
        metadata={"help": "NeuMF: ReLU layers of the MLP tower, widths M, M/2, M/4, ... (M MLP columns)"},
    )

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODEL_NAMES)
        check_int("dim", self.dim, low=1)
        check_int("layers", self.layers, low=1)
        if self.gmf_dim is not None:
            check_int("gmf_dim", self.gmf_dim, low=1)
        check_int("mlp_layers", self.mlp_layers, low=1)
        if self.model == "neumf":
            neumf_widths(self.dim, self.gmf_dim, self.mlp_layers)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("collection", self.collection, COLLECTION_KINDS)
        check_number("init_std", self.init_std, low=0.0, low_open=True)


def bpr_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """``mean(-log σ(s⁺ - s⁻))`` over ``[B]`` score pairs (numerically stable through ``logsigmoid``)."""
    return -F.logsigmoid(positive_scores - negative_scores).mean()


class Recommender(nn.Module):
    """Shared parts of MF-BPR, LightGCN and NeuMF: the tables, the BPR step loss and full-ranking scores.

    The default :meth:`scorer` ranks by dot products of :meth:`final_embeddings`; NeuMF overrides it.
    """

    tables: UserItemTables
    #: Whether training reads the tables outside their lookups (graph propagation). When it does not, sparse
    #: training masks only the looked-up rows each step (``SparsityConfig.embedding_rows="looked_up"``).
    reads_tables_whole: bool = False

    #: The ``ModelConfig.model`` name a subclass is built from.
    model_name: str = ""

    def __init__(self, n_users: int, n_items: int, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig(model=self.model_name)  # type: ignore[arg-type]
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if config.model != self.model_name:
            raise ValueError(
                f"{type(self).__name__} needs config.model {self.model_name!r}, got {config.model!r}"
            )
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.tables = UserItemTables(
            n_users,
            n_items,
            config.dim,
            layout=config.layout,
            collection=config.collection,
            init_std=config.init_std,
        )

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users [U, D], items [I, D])``: the embeddings whose dot products are the scores."""
        raise NotImplementedError

    def loss(
        self,
        users: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        *,
        reg_weight: float = 0.0,
    ) -> torch.Tensor:
        """BPR loss of a batch plus ``reg_weight · ½(‖e⁰_u‖² + ‖e⁰_i⁺‖² + ‖e⁰_i⁻‖²) / B`` on layer-0 rows.

        This default scores the batch from its looked-up table rows with :meth:`row_bpr_scores` (MF, NeuMF);
        LightGCN, which scores propagated embeddings, overrides it.

        Args:
            users, positives, negatives: ``[B]`` int64 ids.
            reg_weight: L2 weight on the batch's layer-0 embeddings (looked up by ``KeyedJaggedTensor``).
        """
        user_rows, item_rows = self.tables.lookup(users, torch.cat([positives, negatives]))
        loss = bpr_loss(*self.row_bpr_scores(user_rows, item_rows))
        if reg_weight:
            loss = loss + reg_weight * self._l2(user_rows, item_rows, len(users))
        return loss

    def row_bpr_scores(
        self, user_rows: torch.Tensor, item_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows ``user_rows [B, D]`` and ``item_rows [2B, D]`` (positives, then negatives) -> the
        ``[B]`` positive and ``[B]`` negative scores."""
        raise NotImplementedError(f"{type(self).__name__} does not score pairs from table rows alone")

    def _l2(self, user_rows: torch.Tensor, item_rows: torch.Tensor, batch: int) -> torch.Tensor:
        return 0.5 * (user_rows.pow(2).sum() + item_rows.pow(2).sum()) / batch

    @torch.no_grad()
    def scorer(self) -> ScoreFunction:
        """A function ``users [B] -> scores [B, I]`` over all items, with the final embeddings computed once."""
        users, items = (tensor.detach() for tensor in self.final_embeddings())
        items_t = items.t().contiguous()
        return lambda ids: users[ids.to(users.device)] @ items_t

    def parameter_count(self) -> int:
        """Entries of the embedding tables (dense count; sparse runs count their nonzeros instead)."""
        tables = self.tables
        return (tables.n_users + tables.n_items) * tables.dim


class MatrixFactorization(Recommender):
    """MF-BPR: ``s(u, i) = e_u · e_i`` with ``e`` the table rows.

    Example:
        >>> model = MatrixFactorization(5, 7, ModelConfig(dim=4))
        >>> loss = model.loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
        >>> loss.backward(); model.scorer()(torch.tensor([0, 4])).shape
        torch.Size([2, 7])
    """

    model_name = "mf"

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables.weights()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users [B]``, ``items [B, M]`` -> scores ``[B, M]`` from one ``KeyedJaggedTensor`` lookup."""
        user_rows, item_rows = self.tables.lookup(users, items.reshape(-1))
        return torch.einsum("bd,bmd->bm", user_rows, item_rows.reshape(*items.shape, -1))

    def row_bpr_scores(
        self, user_rows: torch.Tensor, item_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positive_rows, negative_rows = item_rows.split(len(user_rows))
        return (user_rows * positive_rows).sum(1), (user_rows * negative_rows).sum(1)


def normalized_adjacency(pairs: np.ndarray | torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """``Â = D^-½ A D^-½`` of the bipartite user-item graph, as a sparse CSR ``[U + I, U + I]`` float32 tensor.

    Node ``u < U`` is a user, node ``U + i`` item ``i``; each (user, item) pair is an undirected edge. Nodes
    without edges get zero rows.

    Args:
        pairs: ``[N, 2]`` (user, item) train interactions, without duplicates.
        n_users: ``U``.
        n_items: ``I``.

    Example:
        >>> normalized_adjacency(np.array([[0, 0], [1, 0]]), 2, 1).to_dense()
        tensor([[0.0000, 0.0000, 0.7071],
                [0.0000, 0.0000, 0.7071],
                [0.7071, 0.7071, 0.0000]])
    """
    pairs = torch.as_tensor(pairs, dtype=torch.int64)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape [N, 2], got {tuple(pairs.shape)}")
    if len(pairs) and (
        int(pairs.min()) < 0 or int(pairs[:, 0].max()) >= n_users or int(pairs[:, 1].max()) >= n_items
    ):
        raise ValueError(f"pairs hold ids outside [0, {n_users}) x [0, {n_items})")
    n = n_users + n_items
    rows = torch.cat([pairs[:, 0], pairs[:, 1] + n_users])
    cols = torch.cat([pairs[:, 1] + n_users, pairs[:, 0]])
    degree = torch.bincount(rows, minlength=n).to(torch.float32)
    inverse_sqrt = torch.where(degree > 0, degree.clamp(min=1.0).rsqrt(), torch.zeros_like(degree))
    values = inverse_sqrt[rows] * inverse_sqrt[cols]
    order = torch.argsort(rows * n + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return csr_tensor(crow, cols, values, (n, n))


def csr_tensor(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` ``[R, C]`` from valid CSR arrays, without the beta-state warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


class _SymmetricPropagation(torch.autograd.Function):
    """``Â x`` for a symmetric sparse ``Â``: the backward is ``Â g`` again (no transpose of the CSR matrix)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, adjacency: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        ctx.adjacency = adjacency  # type: ignore[attr-defined]
        return adjacency @ x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.adjacency @ grad  # type: ignore[attr-defined]


class LightGCN(Recommender):
    """LightGCN (He et al., SIGIR 2020): ``E = mean_k Â^k E⁰`` for ``k = 0..K``, ``s(u, i) = e_u · e_i``.

    ``E⁰`` is the torchrec table (users then items); the propagation reads it whole, and the L2 penalty
    looks the batch's layer-0 rows up with a ``KeyedJaggedTensor``.

    Args:
        n_users, n_items: ``U``, ``I``.
        train_pairs: ``[N, 2]`` train (user, item) pairs that define the graph.
        config: a :class:`ModelConfig` (``layers`` is ``K``).

    Example:
        >>> pairs = np.array([[0, 0], [0, 1], [1, 1], [2, 2]])
        >>> model = LightGCN(3, 3, pairs, ModelConfig(model="lightgcn", dim=4, layers=2))
        >>> users, items = model.final_embeddings()
        >>> users.shape, items.shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """

    reads_tables_whole = True

    adjacency: torch.Tensor

    model_name = "lightgcn"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        train_pairs: np.ndarray | torch.Tensor,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__(n_users, n_items, config)
        self.register_buffer(
            "adjacency", normalized_adjacency(train_pairs, n_users, n_items), persistent=False
        )

    def propagate(self, layer0: torch.Tensor) -> torch.Tensor:
        """``[U + I, D] -> [U + I, D]``: the mean of ``Â^k E⁰`` over ``k = 0..K``."""
        total, current = layer0, layer0
        for _ in range(self.config.layers):
            current = _SymmetricPropagation.apply(self.adjacency, current)
            total = total + current
        return total / (self.config.layers + 1)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        final = self.propagate(self.tables.stacked())
        return final[: self.n_users], final[self.n_users :]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users [B]``, ``items [B, M]`` -> scores ``[B, M]`` from the propagated embeddings."""
        user_final, item_final = self.final_embeddings()
        return torch.einsum("bd,bmd->bm", user_final[users], item_final[items])

    def loss(
        self,
        users: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        *,
        reg_weight: float = 0.0,
    ) -> torch.Tensor:
        user_final, item_final = self.final_embeddings()
        user_rows = user_final[users]
        loss = bpr_loss(
            (user_rows * item_final[positives]).sum(1), (user_rows * item_final[negatives]).sum(1)
        )
        if reg_weight:
            ego_users, ego_items = self.tables.lookup(users, torch.cat([positives, negatives]))
            loss = loss + reg_weight * self._l2(ego_users, ego_items, len(users))
        return loss


class NeuMF(Recommender):
    """NeuMF (He et al., WWW 2017) on one user and one item table: ``s(u, i)`` of :class:`NeuMFHead`.

    The GMF and MLP embeddings of the paper are two column sets of the same rows (``G`` GMF columns spread
    evenly, :func:`gmf_column_mask`), so a user or an item has one row and one embedding size, the joint DSL
    budget, nested masks and compact export apply unchanged, and DSL sparsifies both branches' embeddings; the
    MLP and the output layer stay dense. Training reads the tables only through ``KeyedJaggedTensor`` lookups.

    Differences from the paper: the loss is BPR with one sampled negative per positive (the paper: pointwise
    log loss with 4 negatives), so that every model here trains with one sampler and one protocol; no
    pre-training of GMF and MLP (the paper's NeuMF without pre-training); the L2 penalty is on the batch's
    looked-up rows as for MF, the dense layers have none.

    Args:
        n_users, n_items: ``U``, ``I``.
        config: a :class:`ModelConfig` with ``model="neumf"`` (``gmf_dim``, ``mlp_layers``).

    Example:
        >>> model = NeuMF(5, 7, ModelConfig(model="neumf", dim=8))
        >>> loss = model.loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
        >>> loss.backward(); model.scorer()(torch.tensor([0, 4])).shape
        torch.Size([2, 7])
    """

    model_name = "neumf"

    def __init__(self, n_users: int, n_items: int, config: ModelConfig | None = None) -> None:
        super().__init__(n_users, n_items, config)
        self.head = NeuMFHead(self.config.dim, self.config.gmf_dim, self.config.mlp_layers)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("NeuMF scores through an MLP, not by dot products: use scorer() or head")

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users [B]``, ``items [B, M]`` -> scores ``[B, M]`` from one ``KeyedJaggedTensor`` lookup."""
        user_rows, item_rows = self.tables.lookup(users, items.reshape(-1))
        scores = self.head.pair_scores(user_rows.repeat_interleave(items.shape[1], 0), item_rows)
        return scores.reshape(items.shape)

    def row_bpr_scores(
        self, user_rows: torch.Tensor, item_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positive_scores, negative_scores = self.head.pair_scores(user_rows.repeat(2, 1), item_rows).split(
            len(user_rows)
        )
        return positive_scores, negative_scores

    @torch.no_grad()
    def scorer(self) -> ScoreFunction:
        """``users [B] -> scores [B, I]`` over all items; the items' first-layer part is computed once."""
        users, items = (tensor.detach() for tensor in self.tables.weights())
        item_hidden = self.head.item_hidden(items)

        def score(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.head.rank_scores(users[ids.to(users.device)], items, item_hidden)

        return score


def build_model(
    config: ModelConfig, n_users: int, n_items: int, train_pairs: np.ndarray | torch.Tensor | None = None
) -> Recommender:
    """The recommender ``config.model`` names; LightGCN needs ``train_pairs`` for its graph.

    Example:
        >>> build_model(ModelConfig(model="mf", dim=8), 4, 5).tables.dim
        8
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.model == "mf":
        return MatrixFactorization(n_users, n_items, config)
    if config.model == "neumf":
        return NeuMF(n_users, n_items, config)
    if train_pairs is None:
        raise ValueError("lightgcn needs train_pairs to build its graph, got None")
    return LightGCN(n_users, n_items, train_pairs, config)
