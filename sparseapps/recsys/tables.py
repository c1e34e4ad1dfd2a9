"""The user and item embedding tables of every recommender: one torchrec collection, looked up with a
``KeyedJaggedTensor``.

The tables are an unsharded torchrec ``EmbeddingCollection`` (or ``EmbeddingBagCollection``) fed by
``KeyedJaggedTensor``s with the features ``"user"`` and ``"item"``. Unsharded collections hold plain
``nn.Embedding`` / ``nn.EmbeddingBag`` modules, so the core engine sparsifies their weights like any other.
Two layouts:

- ``joint``: one ``(U + I) x D`` table ``"nodes"`` (item ``i`` is row ``U + i``), as the official DSL code keeps
  it; a sparsity budget on the table is shared by users and items.
- ``per_table``: tables ``"user_table"`` (``U x D``) and ``"item_table"`` (``I x D``), one budget each.

:meth:`UserItemTables.make_compact` swaps the tables for :class:`~sparseapps.core.compact.CompactEmbedding`
modules (each row's active entries only) inside the same collection, so the ``KeyedJaggedTensor`` lookup and the
weights' fqns stay as they are.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sparseapps.core.allocator import release_free_memory
from sparseapps.core.compact import CompactEmbedding
from sparseapps.core.validation import check_choice, check_int

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

Layout = Literal["joint", "per_table"]
CollectionKind = Literal["embedding", "embedding_bag"]

LAYOUTS = ("joint", "per_table")
COLLECTION_KINDS = ("embedding", "embedding_bag")
FEATURES = ("user", "item")


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
        check_int("n_users", n_users, low=1)
        check_int("n_items", n_items, low=1)
        check_int("dim", dim, low=1)
        check_choice("layout", layout, LAYOUTS)
        check_choice("collection", collection, COLLECTION_KINDS)
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

    @property
    def compact(self) -> bool:
        """Whether the tables are :class:`~sparseapps.core.compact.CompactEmbedding` modules."""
        return all(isinstance(m, CompactEmbedding) for m in self._modules_by_table.values())

    def make_compact(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replaces each table by a :class:`~sparseapps.core.compact.CompactEmbedding` of its entries ``masks[name]``
        (``{table name: [rows, D] bool}``), in place inside the collection; build the optimizer afterwards.

        Example:
            >>> tables = UserItemTables(2, 3, 4)
            >>> tables.make_compact({"nodes": torch.arange(4) < torch.tensor([[1], [2], [4], [0], [3]])})
            >>> users, items = tables.lookup(torch.tensor([1]), torch.tensor([0, 2]))
            >>> (users != 0).sum(1).tolist(), (items != 0).sum(1).tolist(), tables.compact
            ([2], [4, 3], True)
        """
        if set(masks) != set(self._modules_by_table):
            raise ValueError(
                f"expected masks for the tables {sorted(self._modules_by_table)}, got {sorted(masks)}"
            )
        modules = (
            self.collection.embedding_bags
            if self.collection_kind == "embedding_bag"
            else self.collection.embeddings
        )
        for name, module in self._modules_by_table.items():
            if isinstance(module, CompactEmbedding):
                raise ValueError(f"table {name!r} is already compact")
            compact = CompactEmbedding.from_embedding(module, masks[name])
            modules[name] = compact
            self._modules_by_table[name] = compact
        release_free_memory()  # the dense tables and the conversion's temporaries (sparseapps.core.allocator)

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

    def table_weight(self, name: str) -> torch.Tensor:
        """``[rows, D]`` table ``name`` whole: the parameter, or a compact table's dense view (a new tensor each
        call; autograd flows to its active entries)."""
        module = self._modules_by_table[name]
        return module.dense() if isinstance(module, CompactEmbedding) else module.weight

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole tables as ``(users [U, D], items [I, D])`` views of the parameters (autograd flows)."""
        if self.layout == "joint":
            weight = self.table_weight("nodes")
            return weight[: self.n_users], weight[self.n_users :]
        return self.table_weight("user_table"), self.table_weight("item_table")

    def stacked(self) -> torch.Tensor:
        """``[U + I, D]``: users then items (the joint table itself, or the two tables concatenated)."""
        if self.layout == "joint":
            return self.table_weight("nodes")
        users, items = self.weights()
        return torch.cat([users, items])
