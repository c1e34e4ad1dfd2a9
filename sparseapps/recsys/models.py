"""Recommenders whose user and item embeddings live in torchrec tables: MF-BPR, LightGCN and NeuMF.

MF and LightGCN score a user ``u`` and an item ``i`` by a dot product of final embeddings,
``s(u, i) = e_u · e_i``; NeuMF by a GMF branch and an MLP branch over the same table rows. All three train
with the BPR loss ``-log σ(s(u, i⁺) - s(u, i⁻))`` plus an optional L2 penalty on the batch's layer-0 embeddings.
MF's final embeddings are the table rows; LightGCN's are the mean of ``K + 1`` layers ``E⁽ᵏ⁺¹⁾ = Â E⁽ᵏ⁾`` of
propagation over the normalized user-item graph ``Â = D^-½ A D^-½``.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

ModelName = Literal["mf", "lightgcn", "neumf"]
Layout = Literal["joint", "per_table"]
CollectionKind = Literal["embedding", "embedding_bag"]

MODEL_NAMES = ("mf", "lightgcn", "neumf")
LAYOUTS = ("joint", "per_table")
COLLECTION_KINDS = ("embedding", "embedding_bag")
FEATURES = ("user", "item")
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]
#: NeuMF full ranking: most elements of one ``[B, items, width]`` block of MLP activations (16 MB in float32).
SCORE_CHUNK_ELEMENTS = 1 << 22


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


def neumf_widths(dim: int, gmf_dim: int | None = None, mlp_layers: int = 3) -> tuple[int, tuple[int, ...]]:
    """NeuMF's sizes for tables of width ``D``: ``(G, (h_1, ..., h_L))``.

    ``G`` columns feed GMF (``D // 2`` when ``gmf_dim`` is None) and ``M = D - G`` feed the MLP, whose input
    is ``[e_u ; e_i]`` (``2M``) and whose ``L`` ReLU layers have widths ``h_k = M // 2^(k-1)``, each at least 1.

    Example:
        >>> neumf_widths(64)
        (32, (32, 16, 8))
        >>> neumf_widths(8, mlp_layers=4)
        Traceback (most recent call last):
        ...
        ValueError: mlp_layers must be at most 3 for 4 MLP columns (widths 4, 2, 1), got 4
    """
    _check_positive_int("dim", dim)
    if dim < 2:
        raise ValueError(f"dim must be >= 2 for neumf (GMF and MLP columns), got {dim}")
    gmf = dim // 2 if gmf_dim is None else gmf_dim
    if not isinstance(gmf, int) or isinstance(gmf, bool) or not 1 <= gmf <= dim - 1:
        raise ValueError(f"gmf_dim must be an integer in [1, dim - 1] = [1, {dim - 1}], got {gmf!r}")
    _check_positive_int("mlp_layers", mlp_layers)
    mlp = dim - gmf
    most = mlp.bit_length()
    if mlp_layers > most:
        widths = ", ".join(str(mlp >> k) for k in range(most))
        raise ValueError(
            f"mlp_layers must be at most {most} for {mlp} MLP columns (widths {widths}), got {mlp_layers}"
        )
    return gmf, tuple(mlp >> k for k in range(mlp_layers))


def gmf_column_mask(dim: int, gmf_dim: int) -> torch.Tensor:
    """``[D]`` bool: the ``G`` columns that feed NeuMF's GMF branch, spread evenly (the others feed the MLP).

    Column ``d`` is GMF's when ``⌈(d + 1)G / D⌉ > ⌈dG / D⌉``, so every prefix of ``k`` columns holds
    ``⌈kG / D⌉`` of them: the prefix and nested masks of DSL give both branches their share of each row.

    Example:
        >>> gmf_column_mask(6, 3).int().tolist()
        [1, 0, 1, 0, 1, 0]
    """
    columns = torch.arange(dim + 1) * gmf_dim
    ceil = -torch.div(-columns, dim, rounding_mode="floor")
    return ceil[1:] > ceil[:-1]


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
        _check_choice("model", self.model, MODEL_NAMES)
        _check_positive_int("dim", self.dim)
        _check_positive_int("layers", self.layers)
        if self.gmf_dim is not None:
            _check_positive_int("gmf_dim", self.gmf_dim)
        _check_positive_int("mlp_layers", self.mlp_layers)
        if self.model == "neumf":
            neumf_widths(self.dim, self.gmf_dim, self.mlp_layers)
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
        return sum(module.weight.numel() for module in self.tables.table_modules.values())


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


class NeuMFHead(nn.Module):
    """NeuMF's dense layers over table rows of width ``D``: a GMF branch, an MLP tower and the output layer.

    With ``G`` GMF columns (:func:`gmf_column_mask`), the other ``M`` MLP columns ``e^M`` and
    ``a = ReLU``, a user and an item score

    ``s(u, i) = w_G · (e_u^G ⊙ e_i^G) + w_M · a(W_L ... a(W_1 [e_u^M ; e_i^M] + b_1) ... + b_L)``,

    with ``W_1 : 2M -> M`` and each later layer halving the width (:func:`neumf_widths`). The output layer has
    no bias: the BPR loss only sees score differences, so a bias would never get a gradient.

    Full ranking uses that the first layer splits into a user and an item part, ``W_1 [e_u ; e_i] =
    W_1^u e_u + W_1^i e_i``: the item part is computed once per item (:meth:`item_hidden`), and
    :meth:`rank_scores` adds the user part and runs the rest of the tower on blocks of items, so memory stays
    ``O(B · block · M)``. Both accept the item table as a dense tensor or as a sparse CSR matrix (compact
    serving).

    Args:
        dim: table width ``D``.
        gmf_dim: ``G``; ``None`` is ``D // 2``.
        mlp_layers: ``L``, the ReLU layers of the tower.

    Example:
        >>> head = NeuMFHead(8)
        >>> head.gmf_dim, [layer.out_features for layer in head.mlp]
        (4, [4, 2, 1])
        >>> users, items = torch.randn(2, 8), torch.randn(5, 8)
        >>> head.rank_scores(users, items).shape
        torch.Size([2, 5])
        >>> pairs = head.pair_scores(users.repeat_interleave(5, 0), items.repeat(2, 1)).reshape(2, 5)
        >>> torch.allclose(pairs, head.rank_scores(users, items), atol=1e-6)
        True
    """

    gmf_columns: torch.Tensor
    mlp_columns: torch.Tensor

    def __init__(self, dim: int, gmf_dim: int | None = None, mlp_layers: int = 3) -> None:
        super().__init__()
        gmf, widths = neumf_widths(dim, gmf_dim, mlp_layers)
        self.dim, self.gmf_dim, self.mlp_dim = dim, gmf, dim - gmf
        is_gmf = gmf_column_mask(dim, gmf)
        self.register_buffer("gmf_columns", is_gmf.nonzero().flatten(), persistent=False)
        self.register_buffer("mlp_columns", (~is_gmf).nonzero().flatten(), persistent=False)
        inputs = (2 * self.mlp_dim, *widths[:-1])
        self.mlp = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(inputs, widths, strict=True))
        self.output = nn.Linear(gmf + widths[-1], 1, bias=False)

    def _tower(self, first: torch.Tensor) -> torch.Tensor:
        """``[..., h_1]`` pre-activations of the first layer -> ``[..., h_L]`` output of the tower."""
        hidden = F.relu(first)
        for layer in self.mlp[1:]:
            hidden = F.relu(layer(hidden))
        return hidden

    def pair_scores(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """``user_rows [N, D]``, ``item_rows [N, D]`` -> ``[N]``: the score of each (user, item) pair."""
        gmf = user_rows[:, self.gmf_columns] * item_rows[:, self.gmf_columns]
        mlp_input = torch.cat([user_rows[:, self.mlp_columns], item_rows[:, self.mlp_columns]], dim=1)
        mlp = self._tower(self.mlp[0](mlp_input))
        return self.output(torch.cat([gmf, mlp], dim=1)).squeeze(1)

    def _padded(self, matrix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``[n, len(columns)]`` -> ``[n, D]`` with the values in ``columns`` and zeros elsewhere."""
        out = matrix.new_zeros(matrix.shape[0], self.dim)
        out[:, columns] = matrix
        return out

    def item_hidden(self, items: torch.Tensor) -> torch.Tensor:
        """``items [I, D]`` (dense or sparse CSR) -> ``[I, h_1]``: the item part ``W_1^i e_i^M`` of layer 1."""
        item_weight = self.mlp[0].weight[:, self.mlp_dim :]
        return items @ self._padded(item_weight, self.mlp_columns).t()

    def rank_scores(
        self,
        user_rows: torch.Tensor,
        items: torch.Tensor,
        item_hidden: torch.Tensor | None = None,
        *,
        chunk_elements: int = SCORE_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        """Scores of every user against every item, the MLP run on blocks of items.

        Args:
            user_rows: ``[B, D]``.
            items: ``[I, D]`` item table, dense or sparse CSR.
            item_hidden: ``[I, h_1]`` from :meth:`item_hidden` (computed here when None).
            chunk_elements: most elements of one ``[B, block, h_1]`` activation block.

        Returns:
            ``[B, I]``.
        """
        _check_positive_int("chunk_elements", chunk_elements)
        if item_hidden is None:
            item_hidden = self.item_hidden(items)
        weight = self.output.weight[0]
        gmf_query = self._padded(user_rows[:, self.gmf_columns] * weight[: self.gmf_dim], self.gmf_columns)
        scores = (items @ gmf_query.t()).t().contiguous()
        user_weight, bias = self.mlp[0].weight[:, : self.mlp_dim], self.mlp[0].bias
        user_hidden = (user_rows[:, self.mlp_columns] @ user_weight.t() + bias).unsqueeze(1)
        mlp_weight = weight[self.gmf_dim :]
        block = max(1, chunk_elements // max(1, user_hidden.shape[0] * user_hidden.shape[2]))
        for start in range(0, item_hidden.shape[0], block):
            first = user_hidden + item_hidden[start : start + block].unsqueeze(0)
            scores[:, start : start + block] += self._tower(first) @ mlp_weight
        return scores

    def to_dict(self) -> dict[str, Any]:
        """Sizes and weights, for compact export and ``torch.save``."""
        state = {name: tensor.detach().to("cpu").clone() for name, tensor in self.state_dict().items()}
        return {"dim": self.dim, "gmf_dim": self.gmf_dim, "mlp_layers": len(self.mlp), "state": state}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NeuMFHead:
        """Inverse of :meth:`to_dict`."""
        head = cls(int(values["dim"]), int(values["gmf_dim"]), int(values["mlp_layers"]))
        head.load_state_dict(values["state"])
        return head.eval()


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
