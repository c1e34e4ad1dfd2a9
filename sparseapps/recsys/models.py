"""Recommenders whose user and item embeddings live in torchrec tables: MF-BPR and LightGCN.

Both models score a user ``u`` and an item ``i`` by a dot product of final embeddings, ``s(u, i) = e_u · e_i``,
and train with the BPR loss ``-log σ(s(u, i⁺) - s(u, i⁻))`` plus an optional L2 penalty on the batch's
layer-0 embeddings. MF's final embeddings are the table rows; LightGCN's are the mean of ``K + 1`` layers
``E⁽ᵏ⁺¹⁾ = Â E⁽ᵏ⁾`` of propagation over the normalized user-item graph ``Â = D^-½ A D^-½``.

The tables are an unsharded torchrec ``EmbeddingCollection`` (or ``EmbeddingBagCollection``) fed by
``KeyedJaggedTensor``s with the features ``"user"`` and ``"item"``. Unsharded collections hold plain
``nn.Embedding`` / ``nn.EmbeddingBag`` modules, so the core engine sparsifies their weights like any other.
Two layouts:

- ``joint``: one ``(U + I) x D`` table ``"nodes"`` (item ``i`` is row ``U + i``), as the official DSL code keeps
  it; a sparsity budget on the table is shared by users and items.
- ``per_table``: tables ``"user_table"`` (``U x D``) and ``"item_table"`` (``I x D``), one budget each.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

ModelName = Literal["mf", "lightgcn"]
Layout = Literal["joint", "per_table"]
CollectionKind = Literal["embedding", "embedding_bag"]

MODEL_NAMES = ("mf", "lightgcn")
LAYOUTS = ("joint", "per_table")
COLLECTION_KINDS = ("embedding", "embedding_bag")
FEATURES = ("user", "item")
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]


def _drop_fx_tracing_notice(record: logging.LogRecord) -> bool:
    """Filters torch.fx's one-off notice that torchrec's forward triggers by calling ``is_fx_tracing``."""
    return "is_fx_tracing will return true" not in record.getMessage()


def _import_torchrec() -> Any:
    """torchrec, imported on first use: the import takes seconds, and the CLI's parser needs only this module's
    names. Its import-time deprecation warnings (fbgemm modules) and torch.fx's ``is_fx_tracing`` notice, which
    its forward triggers, are silenced; nothing else is."""
    if "torchrec" not in sys.modules:
        logging.getLogger("torch.fx._symbolic_trace").addFilter(_drop_fx_tracing_notice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torchrec  # noqa: F401
    return sys.modules["torchrec"]


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which recommender and how its embedding tables are laid out.

    Example:
        >>> ModelConfig(model="lightgcn", layers=2).layers
        2
        >>> ModelConfig(dim=0)
        Traceback (most recent call last):
        ...
        ValueError: dim must be a positive integer, got 0
    """

    model: ModelName = field(default="mf", metadata={"help": "mf (MF-BPR) or lightgcn"})
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

    def __post_init__(self) -> None:
        _check_choice("model", self.model, MODEL_NAMES)
        _check_positive_int("dim", self.dim)
        _check_positive_int("layers", self.layers)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("collection", self.collection, COLLECTION_KINDS)
        if (
            not isinstance(self.init_std, int | float)
            or not math.isfinite(self.init_std)
            or self.init_std <= 0
        ):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")


class UserItemTables(nn.Module):
    """User and item embedding tables in one torchrec collection, looked up with a ``KeyedJaggedTensor``.

    Args:
        n_users: number of users ``U``.
        n_items: number of items ``I``.
        dim: embedding dimension ``D``.
        layout: ``"joint"`` (one ``(U + I) x D`` table, item ``i`` at row ``U + i``) or ``"per_table"``.
        collection: ``"embedding"`` (``EmbeddingCollection``) or ``"embedding_bag"`` (``EmbeddingBagCollection``,
            one id per bag, sum pooling: the same numbers).
        init_std: the tables start ``N(0, init_std²)``.

    Example:
        >>> tables = UserItemTables(3, 4, 8)
        >>> users, items = tables.lookup(torch.tensor([0, 2]), torch.tensor([1, 3, 0]))
        >>> users.shape, items.shape
        (torch.Size([2, 8]), torch.Size([3, 8]))
        >>> [name for name, _ in tables.named_parameters()]
        ['collection.embeddings.nodes.weight']
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        *,
        layout: Layout = "joint",
        collection: CollectionKind = "embedding",
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive_int("n_users", n_users)
        _check_positive_int("n_items", n_items)
        _check_positive_int("dim", dim)
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("collection", collection, COLLECTION_KINDS)
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.layout: Layout = layout
        self.collection_kind: CollectionKind = collection
        if layout == "joint":
            specs = [("nodes", n_users + n_items, list(FEATURES))]
        else:
            specs = [("user_table", n_users, ["user"]), ("item_table", n_items, ["item"])]
        torchrec = _import_torchrec()
        cpu = torch.device("cpu")
        bags = collection == "embedding_bag"
        table_config = torchrec.EmbeddingBagConfig if bags else torchrec.EmbeddingConfig
        collection_class = torchrec.EmbeddingBagCollection if bags else torchrec.EmbeddingCollection
        self.collection: nn.Module = collection_class(
            tables=[
                table_config(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features)
                for name, rows, features in specs
            ],
            device=cpu,
        )
        modules = self.collection.embedding_bags if bags else self.collection.embeddings
        self._modules_by_table = dict(modules.items())
        with torch.no_grad():
            for module in self._modules_by_table.values():
                module.weight.normal_(0.0, init_std)

    @property
    def table_modules(self) -> dict[str, nn.Module]:
        """``{table name: nn.Embedding or nn.EmbeddingBag}``: ``nodes``, or ``user_table`` and ``item_table``."""
        return dict(self._modules_by_table)

    def table_fqns(self, prefix: str = "") -> dict[str, str]:
        """``{table name: fqn of its weight}`` as the core engine names it, under a module ``prefix``."""
        attribute = "embeddings" if self.collection_kind == "embedding" else "embedding_bags"
        head = f"{prefix}." if prefix else ""
        return {name: f"{head}collection.{attribute}.{name}.weight" for name in self._modules_by_table}

    def features(self, users: torch.Tensor, items: torch.Tensor) -> KeyedJaggedTensor:
        """The ``KeyedJaggedTensor`` of one lookup: feature ``"user"`` holds ``users [B]``, ``"item"`` ``items [M]``.

        The batch has ``S = max(B, M)`` rows; each feature has one id in its first ``B`` (or ``M``) rows and none
        in the rest, so one KJT carries both lists. In the joint layout item ids are offset by ``U``.
        """
        users, items = users.reshape(-1), items.reshape(-1)
        if self.layout == "joint":
            items = items + self.n_users
        stride = max(len(users), len(items))
        lengths = torch.zeros(2, stride, dtype=torch.int32, device=users.device)
        lengths[0, : len(users)] = 1
        lengths[1, : len(items)] = 1
        values = torch.cat([users, items]).to(torch.int64)
        return _import_torchrec().KeyedJaggedTensor(
            keys=list(FEATURES), values=values, lengths=lengths.reshape(-1), stride=stride
        )

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A :meth:`features` ``KeyedJaggedTensor`` -> ``(user rows [B, D], item rows [M, D])``."""
        output = self.collection(features)
        if self.collection_kind == "embedding":
            return output["user"].values(), output["item"].values()
        lengths = features.lengths().reshape(2, -1)
        pooled = output.to_dict()
        n_users, n_items = int(lengths[0].sum()), int(lengths[1].sum())
        return pooled["user"][:n_users], pooled["item"][:n_items]

    def lookup(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``users [B]``, ``items [M]`` int64 -> ``([B, D], [M, D])`` through the torchrec collection."""
        return self(self.features(users, items))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole tables as ``(users [U, D], items [I, D])`` views of the parameters (autograd flows)."""
        if self.layout == "joint":
            weight = self._modules_by_table["nodes"].weight
            return weight[: self.n_users], weight[self.n_users :]
        return self._modules_by_table["user_table"].weight, self._modules_by_table["item_table"].weight

    def stacked(self) -> torch.Tensor:
        """``[U + I, D]``: users then items (the joint table itself, or the two tables concatenated)."""
        if self.layout == "joint":
            return self._modules_by_table["nodes"].weight
        users, items = self.weights()
        return torch.cat([users, items])


def bpr_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """``mean(-log σ(s⁺ - s⁻))`` over ``[B]`` score pairs (numerically stable through ``logsigmoid``)."""
    return -F.logsigmoid(positive_scores - negative_scores).mean()


class Recommender(nn.Module):
    """Shared parts of MF-BPR and LightGCN: the tables, the BPR step loss and full-ranking scores."""

    tables: UserItemTables
    #: Whether training reads the tables outside their lookups (graph propagation). When it does not, sparse
    #: training masks only the looked-up rows each step (``SparsityConfig.embedding_rows="looked_up"``).
    reads_tables_whole: bool = False

    def __init__(self, n_users: int, n_items: int, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
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

        Args:
            users, positives, negatives: ``[B]`` int64 ids.
            reg_weight: L2 weight on the batch's layer-0 embeddings (looked up by ``KeyedJaggedTensor``).
        """
        raise NotImplementedError

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
        return sum(module.weight.numel() for module in self.tables.table_modules.values())


class MatrixFactorization(Recommender):
    """MF-BPR: ``s(u, i) = e_u · e_i`` with ``e`` the table rows.

    Example:
        >>> model = MatrixFactorization(5, 7, ModelConfig(dim=4))
        >>> loss = model.loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
        >>> loss.backward(); model.scorer()(torch.tensor([0, 4])).shape
        torch.Size([2, 7])
    """

    def __init__(self, n_users: int, n_items: int, config: ModelConfig | None = None) -> None:
        config = config or ModelConfig(model="mf")
        if isinstance(config, ModelConfig) and config.model != "mf":
            raise ValueError(f"MatrixFactorization needs config.model 'mf', got {config.model!r}")
        super().__init__(n_users, n_items, config)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables.weights()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users [B]``, ``items [B, M]`` -> scores ``[B, M]`` from one ``KeyedJaggedTensor`` lookup."""
        user_rows, item_rows = self.tables.lookup(users, items.reshape(-1))
        return torch.einsum("bd,bmd->bm", user_rows, item_rows.reshape(*items.shape, -1))

    def loss(
        self,
        users: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        *,
        reg_weight: float = 0.0,
    ) -> torch.Tensor:
        user_rows, item_rows = self.tables.lookup(users, torch.cat([positives, negatives]))
        positive_rows, negative_rows = item_rows.split(len(users))
        loss = bpr_loss((user_rows * positive_rows).sum(1), (user_rows * negative_rows).sum(1))
        if reg_weight:
            loss = loss + reg_weight * self._l2(user_rows, item_rows, len(users))
        return loss


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

    def __init__(
        self,
        n_users: int,
        n_items: int,
        train_pairs: np.ndarray | torch.Tensor,
        config: ModelConfig | None = None,
    ) -> None:
        config = config or ModelConfig(model="lightgcn")
        if isinstance(config, ModelConfig) and config.model != "lightgcn":
            raise ValueError(f"LightGCN needs config.model 'lightgcn', got {config.model!r}")
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
    if train_pairs is None:
        raise ValueError("lightgcn needs train_pairs to build its graph, got None")
    return LightGCN(n_users, n_items, train_pairs, config)
