"""DSL: sparse user/item embedding tables trained from the first step under a fixed budget, through the core engine.

Dynamic Sparse Learning (Wang et al., WSDM 2024) keeps a mask on the embedding tables; every ``ΔT`` steps the
``⌈ζ_t·nnz⌉`` smallest-magnitude entries are dropped and as many inactive entries with the largest gradient
magnitude are grown, starting at zero, with ζ decaying by a cosine from 0.5. Each row's number of active entries
is that user's or item's own embedding size. Here the update is the core :class:`DynamicSparsity` engine applied
to the torchrec tables of a :class:`~sparseapps.recsys.models.Recommender`:

- budget ``joint`` (default): one ``(U + I) x D`` table, so users and items draw on one budget (as the official
  code); ``per_table``: a users and an items table, each at the target density;
- drop and growth by any criterion of the core's score registry (:mod:`sparseapps.core.scores`), named in the
  held :class:`~sparseapps.core.SparsityConfig` (:data:`DSL_SPARSITY` by default): growth by the current batch's
  gradient (``gradient``, as published) or by its running average over steps (``momentum``, less biased to the
  last batch), or a criterion registered with ``scores.register_grow``;
- initial masks: ``random`` (Bernoulli-like, as published), ``prefix`` (every row keeps the same leading
  dimensions) or ``nested`` (row ``r`` keeps the leading ``k_r`` dimensions with ``k_r ∝ (1 + popularity_r)^a``).

Why alignment matters: a score ``e_u · e_i`` only uses dimensions active in both rows. Independent random masks
at density ``d`` overlap on about ``d²·D`` dimensions, and gradient growth can only grow an entry whose partner
rows are active in that dimension. Prefix and nested masks share one dimension order, so two rows of sizes
``k_u`` and ``k_i`` overlap on ``min(k_u, k_i)`` dimensions, and rows with long prefixes let the others grow.

After training, :func:`export_compact` stores each table as values + narrow column indices + row offsets, and
:class:`CompactScorer` serves scores from that storage (``compact.py``; the names are importable from here too).

Storage (``DSLConfig.storage``): ``masked`` keeps dense tables with exact zeros and a mask, run by the engine's
per-step masking; ``compact`` trains the tables as :class:`~sparseapps.core.compact.CompactEmbedding` modules,
each row's active entries only (values + uint8 columns + int64 row offsets), with gradients and Adam/Adagrad state
of the active entries only. :func:`make_compact` converts a model's tables before its optimizer is built. The same
engine drives both, so with the same seed both storages make the same masks at every update. Growth reads the
dense gradient of the step before each update only (``grow="gradient"``, as published): in that step the lookup's
backward adds the looked-up rows' output gradients (dense per row for free) into one ``[rows, D]`` buffer, freed
at the update, so nothing of the dense table's size lives between updates. The running average of growth by
``momentum`` is a dense ``[rows, D]`` state updated every step: compact storage refuses it rather than keep it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from sparseapps.core import DynamicSparsity, SparsityConfig, scores
from sparseapps.core.compact import CompactEmbedding
from sparseapps.core.config import STORAGES, Storage
from sparseapps.core.distributions import target_nnz
from sparseapps.core.masks import draw_mask
from sparseapps.core.validation import check_bool, check_choice, check_number
from sparseapps.recsys.compact import CompactEmbeddings, CompactScorer, CompactTable, export_compact
from sparseapps.recsys.models import Recommender, UserItemTables

SparseMethod = Literal["dsl", "static", "prune"]
InitialMask = Literal["random", "prefix", "nested"]

SPARSE_METHODS = ("dsl", "static", "prune")
INITIAL_MASKS = ("random", "prefix", "nested")

#: DSL as this package runs it (Wang et al., WSDM 2024; the growth criterion and ζ₀ tuned on ML-100K validation,
#: docs/recsys.md): magnitude drop, growth by the running average of gradients (momentum 0.99), ζ₀ = 0.5 decayed by
#: a cosine to 0 at 0.75 of the steps, an update every 200 steps, one uniform density over the embedding tables.
#: :attr:`DSLConfig.sparsity` defaults to it, and ``TrainConfig``'s DSL fields default to its values.
DSL_SPARSITY = SparsityConfig(
    sparsity=0.8,
    method="dst",
    distribution="uniform",
    module_types=("embedding",),
    drop="magnitude",
    grow="momentum",
    update_interval=200,
    drop_fraction=0.5,
    drop_schedule="cosine",
    end_fraction=0.75,
    momentum=0.99,
    seed=0,
)


@dataclass(frozen=True, kw_only=True)
class DSLConfig:
    """How the embedding tables are made and kept sparse: DSL's own choices plus the engine's :class:`SparsityConfig`.

    ``sparsity`` holds the drop/grow criteria (any names of :mod:`sparseapps.core.scores`), the update schedule,
    the momentum of momentum growth, the tie noise and the seed, exactly as the engine reads them; DSL sets its
    ``sparsity`` (from ``density``), ``method``, ``distribution`` (uniform), ``module_types``, ``include`` and
    ``embedding_rows`` (from the model's tables). ``method="static"`` and ``"prune"`` read only its seed.

    Example:
        >>> config = DSLConfig(density=0.2, sparsity=DSL_SPARSITY.replace(grow="gradient"))
        >>> engine_config = config.sparsity_config(("tables.collection.embeddings.nodes.weight",))
        >>> engine_config.sparsity, engine_config.grow, engine_config.update_interval
        (0.8, 'gradient', 200)
        >>> DSLConfig(density=1.5)
        Traceback (most recent call last):
        ...
        ValueError: density must be a finite number in (0, 1], got 1.5
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
    nested_exponent: float = field(
        default=0.5, metadata={"help": "nested masks: row size ∝ (1 + popularity)^exponent (0 = prefix)"}
    )
    prune_fraction: float = field(
        default=0.5, metadata={"help": "prune: fraction of the planned steps trained dense before pruning"}
    )
    rescale_init: bool = field(
        default=False,
        metadata={
            "help": "scale each row's initial active entries by sqrt(D / k_row) to keep row norms (off: equal "
            "on ML-100K, and it makes the first magnitude drops remove popular rows in short runs)"
        },
    )
    storage: Storage = field(
        default="masked",
        metadata={
            "help": "masked: dense tables with exact zeros and a mask; compact: each row's active entries only "
            "(values + column indices + row offsets) with optimizer state of that size (methods dsl and static; "
            "growth by the gradient of the step before each update, not momentum)"
        },
    )
    sparsity: SparsityConfig = field(
        default=DSL_SPARSITY,
        metadata={
            "help": "the engine's settings of method dsl: drop and grow criteria, update_interval, drop_fraction "
            "(ζ₀), drop_schedule, end_fraction, momentum, tie_noise, seed (a 'dst' SparsityConfig)"
        },
    )

    def __post_init__(self) -> None:
        check_number("density", self.density, low=0.0, high=1.0, low_open=True)
        check_choice("method", self.method, SPARSE_METHODS)
        check_choice("init", self.init, INITIAL_MASKS)
        check_number("nested_exponent", self.nested_exponent, low=0.0)
        check_number("prune_fraction", self.prune_fraction, low=0.0, high=1.0, low_open=True)
        check_bool("rescale_init", self.rescale_init)
        check_choice("storage", self.storage, STORAGES)
        if not isinstance(self.sparsity, SparsityConfig):
            raise TypeError(f"sparsity must be a SparsityConfig, got {type(self.sparsity).__name__}")
        if not self.sparsity.dynamic:
            raise ValueError(
                f"sparsity must be a 'dst' SparsityConfig (its drop/grow settings), got method="
                f"{self.sparsity.method!r}; choose static or pruned tables with DSLConfig.method"
            )
        if self.storage == "compact" and self.method == "prune":
            raise ValueError(
                "storage='compact' trains sparse from the first step (method 'dsl' or 'static'), got method "
                "'prune', which trains dense first; use storage='masked'"
            )
        for kind in ("drop", "grow"):
            name = getattr(self.sparsity, kind)
            if (
                self.storage == "compact"
                and self.method == "dsl"
                and "momentum" in scores.get(kind, name).needs
            ):
                raise ValueError(
                    f"storage='compact' keeps no dense state between updates, and {kind}={name!r} reads a gradient "
                    f"average over every step (a dense [rows, D] tensor); use grow='gradient' or storage='masked'"
                )
            if "activations" in scores.get(kind, name).needs:
                raise ValueError(
                    f"{kind}={name!r} reads layer activations, which embedding tables do not have; choose another "
                    f"{kind} criterion (registered: {', '.join(getattr(scores, f'{kind}_names')())})"
                )

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
            exclude=(),
            seed=self.sparsity.seed,
            embedding_rows=rows,
            storage=self.storage,
        )
        if self.method == "static":
            return SparsityConfig(method="static", grow="none", **common)
        if self.method == "prune":
            return SparsityConfig(
                method="one_shot", grow="none", start_fraction=self.prune_fraction, **common
            )
        return self.sparsity.replace(method="dst", **common)


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


def make_compact(
    model: Recommender,
    config: DSLConfig,
    *,
    user_popularity: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    initial_masks: Mapping[str, torch.Tensor] | None = None,
) -> Recommender:
    """Turns the model's tables into :class:`~sparseapps.core.compact.CompactEmbedding` modules of their initial
    masks (``storage="compact"``); build the optimizer afterwards, then :class:`SparseEmbeddings` on it.

    The masks are the ones the masked run starts from: ``initial_masks`` when given, else ``config.init``'s
    (nested / prefix from the popularity), else (``init="random"``) the engine's own draw from the seed, one
    ``draw_mask`` per table in order. Values are the dense initialization's at those entries, so a compact run
    and a masked run of the same seed start equal.

    Args:
        model: an MF, NeuMF or LightGCN :class:`Recommender` with dense tables; converted in place.
        config: a :class:`DSLConfig` with ``storage="compact"``.
        user_popularity, item_popularity: train interactions per user / item (nested masks).
        initial_masks: ``{weight fqn: [R, D] bool}`` to start from (PEP's found masks).

    Returns:
        ``model``.

    Example:
        >>> from sparseapps.recsys.models import MatrixFactorization, ModelConfig
        >>> model = MatrixFactorization(6, 10, ModelConfig(dim=8))
        >>> config = DSLConfig(density=0.25, init="prefix", storage="compact", sparsity=DSL_SPARSITY.replace(
        ...     grow="gradient"))
        >>> table = make_compact(model, config).tables.table_modules["nodes"]
        >>> type(table).__name__, table.nnz, table.values.shape
        ('CompactEmbedding', 32, torch.Size([32]))
    """
    if not isinstance(model, Recommender):
        raise TypeError(f"model must be a sparseapps.recsys Recommender, got {type(model).__name__}")
    if not isinstance(config, DSLConfig):
        raise TypeError(f"config must be a DSLConfig, got {type(config).__name__}")
    if config.storage != "compact":
        raise ValueError(f"make_compact expects a DSLConfig with storage='compact', got {config.storage!r}")
    tables = model.tables
    fqns = tables.table_fqns("tables")
    if initial_masks is None and config.init != "random":
        initial_masks = aligned_masks(config, tables, fqns, user_popularity, item_popularity)
    if initial_masks is None:
        engine_config = config.sparsity_config(tuple(fqns.values()))
        shapes = {fqn: tables.table_modules[name].weight.shape for name, fqn in fqns.items()}
        budgets = target_nnz(shapes, engine_config.density, engine_config.distribution)
        seed = (
            engine_config.seed
            if engine_config.seed is not None
            else int(torch.randint(0, 2**62, (1,)).item())
        )
        generator = torch.Generator().manual_seed(seed)  # the engine's draws, in its order
        initial_masks = {
            fqn: draw_mask(shapes[fqn], budgets[fqn], engine_config, generator) for fqn in fqns.values()
        }
    missing = sorted(set(fqns.values()) - set(initial_masks))
    if missing:
        raise ValueError(f"initial_masks must hold a mask for every table weight, missing {missing}")
    tables.make_compact({name: initial_masks[fqn].to(torch.bool) for name, fqn in fqns.items()})
    return model


class SparseEmbeddings:
    """DSL (or a static / pruned mask) on a recommender's embedding tables, run by the core engine.

    Construct it after the model and its optimizer; the training loop does not change (the engine hooks the
    optimizer). Each table row's nonzero count is that user's or item's embedding size. With
    ``config.storage == "compact"`` the tables must have been converted by :func:`make_compact` before the
    optimizer was built; the engine then re-packs them at each update instead of masking dense tables every step.

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
        hand_masks = False  # compact tables: whether the engine is handed their masks
        if config.storage == "compact":
            if not tables.compact:
                raise ValueError(
                    "storage='compact' expects compact tables: call make_compact(model, config, ...) before "
                    "building the optimizer, then SparseEmbeddings"
                )
            # The tables hold their topology. Masks are handed to the engine where the masked run hands them (so
            # with init='random' the engine draws from its generator as the masked run does and stays in step).
            hand_masks = initial_masks is not None or config.init != "random"
        elif tables.compact:
            raise ValueError("the model's tables are compact; use a DSLConfig with storage='compact'")
        elif initial_masks is None and config.method != "prune" and config.init != "random":
            initial_masks = aligned_masks(config, tables, self.fqns, user_popularity, item_popularity)
        with contextlib.ExitStack() as views:  # compact tables build their dense mask once, not per reader
            if tables.compact:
                for module in tables.table_modules.values():
                    views.enter_context(module.caching_views())
                if hand_masks:
                    modules = tables.table_modules
                    initial_masks = {fqn: modules[name].shared_mask() for name, fqn in self.fqns.items()}
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
            for module in self.model.tables.table_modules.values():
                if isinstance(module, CompactEmbedding):
                    sizes = module.row_sizes().to(module.values.dtype)
                    scale = torch.where(sizes > 0, (dim / sizes.clamp(min=1)).sqrt(), torch.ones_like(sizes))
                    module.values.mul_(
                        torch.repeat_interleave(scale, module.row_sizes(), output_size=module.nnz)
                    )
            for param, mask in self.engine.masked_parameters():
                sizes = mask.sum(1, keepdim=True).to(param.dtype)
                param.mul_(torch.where(sizes > 0, (dim / sizes.clamp(min=1)).sqrt(), torch.ones_like(sizes)))

    @property
    def density(self) -> float:
        """Current fraction of active entries over the tables."""
        tables = self.model.tables
        return self.nnz / ((tables.n_users + tables.n_items) * tables.dim)

    @property
    def nnz(self) -> int:
        """Active entries over the tables: the model's parameter count."""
        return int(self.row_sizes_stacked().sum())

    def stacked_mask(self) -> torch.Tensor:
        """``[U + I, D]`` bool: the users' rows then the items' rows (a new tensor for compact tables)."""
        masks = [self.engine.masks[self.fqns[name]] for name in self.model.tables.table_modules]
        return masks[0] if len(masks) == 1 else torch.cat(masks)

    def row_sizes_stacked(self) -> torch.Tensor:
        """``[U + I]`` int64: each row's active entries, users then items (compact tables: from the row offsets)."""
        modules = self.model.tables.table_modules.values()
        if self.model.tables.compact:
            return torch.cat([module.row_sizes() for module in modules])
        return self.stacked_mask().sum(1)

    def row_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users [U], items [I])`` int64: each row's active entries, i.e. its embedding size."""
        sizes = self.row_sizes_stacked()
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


__all__ = [
    "DSL_SPARSITY",
    "INITIAL_MASKS",
    "SPARSE_METHODS",
    "CompactEmbeddings",
    "CompactScorer",
    "CompactTable",
    "DSLConfig",
    "InitialMask",
    "SparseEmbeddings",
    "SparseMethod",
    "aligned_masks",
    "export_compact",
    "make_compact",
    "nested_row_sizes",
    "prefix_masks",
]
