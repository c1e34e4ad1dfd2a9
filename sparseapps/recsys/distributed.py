"""DSL on torchrec ``DistributedModelParallel``: sparse embedding tables whose masks live with their shards.

:func:`shard_model` shards an MF-BPR model's tables with one torchrec sharding type and returns the
``DistributedModelParallel`` (DMP) and an optimizer for the loop; :class:`ShardedSparseEmbeddings` then keeps
the tables sparse:

- each local shard (``ShardedTensor`` local shards for table-, column- and row-wise tables; the whole replicated
  table for data-parallel ones) gets its own bool mask, cut from one global initial mask (random, prefix or
  nested, as :class:`~sparseapps.recsys.dsl.SparseEmbeddings`); each shard keeps its own nnz budget, so a
  table-wise shard behaves like the single-process per-table engine and column/row shards split the budget;
- torchrec's fused optimizer updates the tables inside the backward pass, so no ``.grad`` exists. The gradient a
  criterion reads (``"grad"`` or ``"momentum"`` in its needs) comes from the lookups instead: a forward hook on the
  tables records the ids and registers a gradient hook on the looked-up rows, which scatters ``∂loss/∂rows`` into
  a ``[R, D]`` buffer per table (the table's gradient from this rank's batch): at the step before each update
  (``"grad"``), or as a running average every step (``"momentum"``; linear, so each rank averages its own share).
  At an update the buffers are all-reduced once, so every shard sees the gradient of the global batch;
- after each optimizer step the masks are re-applied to the shards (exact zeros outside the mask); at an update
  the criteria the :class:`~sparseapps.recsys.dsl.DSLConfig` names (the core's score registry, as in the
  single-process engine) score each shard, and one :func:`~sparseapps.core.rules.update_masks` drops each shard's
  ``⌈ζ·nnz⌉`` lowest-scoring entries and grows as many; ``history`` holds its
  :class:`~sparseapps.core.rules.UpdateRecord` dicts (tensors named ``"<fqn>@<shard offsets>"``). Replicated
  (data-parallel) tables are checked to hold the same masks on every rank (a fingerprint all-gather);
- :meth:`ShardedSparseEmbeddings.state_dict` holds the masks as ``ShardedTensor``s with the weights' layout, so
  ``torch.distributed.checkpoint`` saves and loads them beside ``dmp.state_dict()``.

What works with the installed torchrec 1.9.2 / fbgemm-gpu-cpu 1.9.0 on CPU with gloo: ``table_wise``,
``column_wise`` and ``row_wise`` with the fused kernel (``EXACT_SGD``; fbgemm's CPU kernels have no Adam), and
``data_parallel`` with an ``EmbeddingBagCollection`` (with an ``EmbeddingCollection`` torchrec's data-parallel
lookup fails on these jagged features, so that combination is refused). The score buffers hold whole tables on
every rank, so they suit tables that fit one host; the weights themselves stay sharded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sparseapps.core import rules, schedules, scores
from sparseapps.core.distributed import collective_device, require_process_group, verify_same_tensors
from sparseapps.core.distributions import target_nnz
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.recsys.dsl import DSLConfig, aligned_masks
from sparseapps.recsys.models import MatrixFactorization
from sparseapps.recsys.tables import _import_torchrec

ShardingType = Literal["data_parallel", "table_wise", "column_wise", "row_wise"]
EmbeddingOptimizer = Literal["sgd"]
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise")
MULTI_HOST_SHARDING_TYPES = ("table_row_wise", "table_column_wise", "grid_shard")
EMBEDDING_OPTIMIZERS = ("sgd",)


@dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How the tables are sharded and updated under ``DistributedModelParallel``.

    Example:
        >>> ShardingConfig(sharding="column_wise").sharding
        'column_wise'
        >>> ShardingConfig(sharding="grid_shard")
        Traceback (most recent call last):
        ...
        ValueError: sharding 'grid_shard' needs tables split across hosts and ranks; use one of 'data_parallel', \
'table_wise', 'column_wise', 'row_wise'
    """

    sharding: ShardingType = field(
        default="table_wise",
        metadata={
            "help": "torchrec sharding type of every table: data_parallel, table_wise, column_wise, row_wise"
        },
    )
    optimizer: EmbeddingOptimizer = field(
        default="sgd", metadata={"help": "table optimizer: sgd (fbgemm's CPU fused kernels have no Adam)"}
    )
    learning_rate: float = field(
        default=0.05,
        metadata={
            "help": "learning rate for the global batch's mean loss (torchrec divides the sharded tables' "
            "gradients by the world size and DDP averages the replicated ones, so no rescaling is needed)"
        },
    )
    column_shards: int = field(
        default=0,
        metadata={
            "help": "column_wise: column shards per table, placed round-robin over the ranks (0: one per rank)"
        },
    )

    def __post_init__(self) -> None:
        if self.sharding in MULTI_HOST_SHARDING_TYPES:
            raise ValueError(
                f"sharding {self.sharding!r} needs tables split across hosts and ranks; use one of "
                f"{', '.join(map(repr, SHARDING_TYPES))}"
            )
        check_choice("sharding", self.sharding, SHARDING_TYPES)
        check_choice("optimizer", self.optimizer, EMBEDDING_OPTIMIZERS)
        check_int("column_shards", self.column_shards, low=0)
        check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)


def _check_backend(
    config: ShardingConfig, model: MatrixFactorization, group: dist.ProcessGroup | None
) -> str:
    """The device type for the plan; refuses combinations this backend or torchrec cannot run."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA devices, none is available; use 'gloo' on CPU")
        return "cuda"
    if backend != "gloo":
        raise ValueError(f"sharded tables need backend 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    if config.sharding == "data_parallel" and model.config.collection == "embedding":
        raise ValueError(
            "sharding 'data_parallel' with an EmbeddingCollection fails in torchrec 1.9.2's data-parallel "
            "sequence lookup on these features; build the model with ModelConfig(collection='embedding_bag') or "
            "use 'table_wise', 'column_wise' or 'row_wise'"
        )
    return "cpu"


def shard_model(
    model: MatrixFactorization, config: ShardingConfig, *, group: dist.ProcessGroup | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Shards ``model``'s tables with ``config.sharding``; returns ``(dmp, optimizer)``.

    Table-wise places table ``t`` on rank ``t mod world_size``; column-wise splits ``D`` evenly into
    ``config.column_shards`` shards (default: one per rank) placed round-robin; row-wise splits the rows over all ranks; data-parallel
    replicates the tables (DMP wraps them in DDP). Every table starts from ``model``'s weights (rank 0's for
    replicated tables, which torchrec would otherwise re-initialize). The optimizer steps both the fused tables (a no-op: their
    update ran in backward) and the data-parallel ones.

    Raises:
        RuntimeError: no process group.
        ValueError: a sharding type the backend or torchrec cannot run here (names it), a non-MF model.
    """
    require_process_group(group)
    if not isinstance(model, MatrixFactorization):
        raise TypeError(
            f"sharded DSL supports MatrixFactorization (LightGCN propagates over whole tables), got "
            f"{type(model).__name__}"
        )
    if not isinstance(config, ShardingConfig):
        raise TypeError(f"config must be a ShardingConfig, got {type(config).__name__}")
    device_type = _check_backend(config, model, group)
    _import_torchrec()
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import sharding_plan as plans
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    world = dist.get_world_size(group)
    tables = model.tables
    column_ranks = [shard % world for shard in range(config.column_shards or world)]
    if config.sharding == "column_wise" and tables.dim % len(column_ranks):
        raise ValueError(
            f"column_wise needs dim divisible by the number of column shards {len(column_ranks)}, "
            f"got dim={tables.dim}"
        )
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": config.learning_rate}
    if tables.collection_kind == "embedding":
        sharder: Any = EmbeddingCollectionSharder(fused_params=fused)
    else:
        sharder = EmbeddingBagCollectionSharder(fused_params=fused)
    per_table = {}
    for index, name in enumerate(tables.table_modules):
        if config.sharding == "table_wise":
            per_table[name] = plans.table_wise(rank=index % world, compute_kernel="fused")
        elif config.sharding == "column_wise":
            per_table[name] = plans.column_wise(ranks=column_ranks, compute_kernel="fused")
        elif config.sharding == "row_wise":
            per_table[name] = plans.row_wise(compute_kernel="fused")
        else:
            per_table[name] = plans.data_parallel()
    module_plan = plans.construct_module_sharding_plan(
        tables.collection,
        per_table,
        sharder=sharder,
        local_size=world,
        world_size=world,
        device_type=device_type,
    )
    device = (
        torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    )
    originals = {
        tables.table_fqns("tables")[name]: module.weight.detach().clone()
        for name, module in tables.table_modules.items()
    }
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group or dist.GroupMember.WORLD),
        device=device,
        plan=ShardingPlan({"tables.collection": module_plan}),
        sharders=[sharder],
    )
    if config.sharding == "data_parallel":
        # torchrec re-initializes replicated tables (sharded ones copy the module's weights): restore rank 0's
        state = dmp.state_dict()
        source = dist.get_global_rank(group, 0) if group else 0
        with torch.no_grad():
            for fqn, weight in originals.items():
                target = state[fqn]
                target.copy_(weight.to(target.device))
                dist.broadcast(target, src=source, group=group)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers: list[Any] = [dmp.fused_optimizer]
    if dense:
        optimizers.append(
            KeyedOptimizerWrapper(dense, lambda params: torch.optim.SGD(params, lr=config.learning_rate))
        )
    return dmp, CombinedOptimizer(optimizers)


@dataclass
class _Shard:
    """One local piece of a table: rows ``[r0, r0 + rows)``, columns ``[c0, c0 + cols)``."""

    fqn: str
    table: str
    offsets: tuple[int, int]
    weight: torch.Tensor
    mask: torch.Tensor
    budget: int

    @property
    def region(self) -> tuple[slice, slice]:
        rows, cols = self.weight.shape
        return slice(self.offsets[0], self.offsets[0] + rows), slice(self.offsets[1], self.offsets[1] + cols)


def _seed_for(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


class ShardedSparseEmbeddings:
    """DSL on the sharded tables of a ``DistributedModelParallel`` MF model.

    Build it on every rank after :func:`shard_model`; the training loop is unchanged (it hooks the optimizer's
    ``step``). Only ``method='dsl'`` and ``'static'`` are supported (``'prune'`` trains dense first).

    Args:
        dmp: the model returned by :func:`shard_model`.
        optimizer: its optimizer.
        config: a :class:`DSLConfig`.
        total_steps: planned optimizer steps.
        user_popularity: ``[U]`` train interactions per user (nested masks).
        item_popularity: ``[I]`` train interactions per item.

    Example (every rank, under ``torchrun``)::

        dmp, optimizer = shard_model(MatrixFactorization(943, 1682), ShardingConfig(sharding="table_wise"))
        sparse = ShardedSparseEmbeddings(dmp, optimizer, DSLConfig(density=0.2, init="prefix"), 2000)
        loss = dmp.module.loss(users, positives, negatives); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        dmp: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DSLConfig,
        total_steps: int,
        *,
        user_popularity: np.ndarray | None = None,
        item_popularity: np.ndarray | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        require_process_group(group)
        model = getattr(dmp, "module", None)
        if not isinstance(model, MatrixFactorization) or not hasattr(dmp, "fused_optimizer"):
            raise TypeError(
                f"dmp must be the DistributedModelParallel of a MatrixFactorization from shard_model, got "
                f"{type(dmp).__name__} of {type(model).__name__}"
            )
        if not isinstance(config, DSLConfig):
            raise TypeError(f"config must be a DSLConfig, got {type(config).__name__}")
        if config.method not in ("dsl", "static"):
            raise ValueError(f"sharded tables support method 'dsl' or 'static', got {config.method!r}")
        if config.storage != "masked":
            raise ValueError(f"sharded tables are masked (storage='masked'), got storage={config.storage!r}")
        check_int("total_steps", total_steps, low=1)
        if config.sparsity.seed is None:
            raise ValueError(
                "sharded tables need a seed (every rank draws the same masks), got DSLConfig.sparsity.seed=None"
            )
        self.dmp = dmp
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        self.group = group
        self.world_size = dist.get_world_size(group)
        tables = model.tables
        self.table_of = {fqn: name for name, fqn in tables.table_fqns("tables").items()}
        self.sparsity_config = config.sparsity_config(tuple(self.table_of))
        self._drop = scores.get("drop", self.sparsity_config.drop)
        self._grow = scores.get("grow", self.sparsity_config.grow) if config.method == "dsl" else None
        self._collect = self._collected_gradient()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.shards: list[_Shard] = []
        self.replicated: dict[str, bool] = {}
        shapes = {fqn: self._table_shape(name) for fqn, name in self.table_of.items()}
        global_masks = self._initial_masks(shapes, user_popularity, item_popularity)
        state = dmp.state_dict()
        for fqn in self.table_of:
            value = state[fqn]
            if hasattr(value, "local_shards"):
                self.replicated[fqn] = False
                pieces = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
            else:
                self.replicated[fqn] = True
                pieces = [((0, 0), value)]
            for offsets, weight in pieces:
                row, col = int(offsets[0]), int(offsets[1])
                rows, cols = weight.shape
                mask = global_masks[fqn][row : row + rows, col : col + cols].to(weight.device).clone()
                self.shards.append(_Shard(fqn, self.table_of[fqn], (row, col), weight, mask, int(mask.sum())))
        self._scores: dict[str, torch.Tensor] = {}
        self._capturing = False
        self._prepare_capture(self.step + 1)
        self.apply_masks()
        self.verify_replicated()
        self._handles = [
            optimizer.register_step_post_hook(self._after_step),
            tables.register_forward_hook(self._lookup_hook),
        ]

    # ------------------------------------------------------------------ setup
    def _collected_gradient(self) -> str | None:
        """What the lookups collect for the criteria (``"grad"``, ``"momentum"`` or ``None``); refuses the rest."""
        if self._grow is None:
            return None
        needs = self._drop.needs | self._grow.needs
        unavailable = sorted(needs - {"grad", "momentum"})
        if unavailable or needs >= {"grad", "momentum"}:
            raise ValueError(
                f"sharded tables collect one of the lookups' gradient ('grad') or its running average "
                f"('momentum'); drop={self._drop.name!r} and grow={self._grow.name!r} need {sorted(needs)}"
            )
        return next(iter(needs), None)

    def _table_shape(self, name: str) -> tuple[int, int]:
        tables = self.model.tables
        rows = {
            "nodes": tables.n_users + tables.n_items,
            "user_table": tables.n_users,
            "item_table": tables.n_items,
        }
        return rows[name], tables.dim

    def _initial_masks(
        self,
        shapes: Mapping[str, tuple[int, int]],
        user_popularity: np.ndarray | None,
        item_popularity: np.ndarray | None,
    ) -> dict[str, torch.Tensor]:
        """One global ``[R, D]`` mask per table, the same on every rank (seeded, or from popularity)."""
        config, tables = self.config, self.model.tables
        if config.init == "random":
            budgets = target_nnz({fqn: torch.Size(s) for fqn, s in shapes.items()}, config.density, "uniform")
            generator = torch.Generator().manual_seed(self.sparsity_config.seed)
            return {
                fqn: rules.select_top(
                    torch.rand(shape, generator=generator), torch.ones(shape, dtype=torch.bool), budgets[fqn]
                )
                for fqn, shape in shapes.items()
            }
        table_fqns = {name: fqn for fqn, name in self.table_of.items()}
        return aligned_masks(config, tables, table_fqns, user_popularity, item_popularity)

    # ------------------------------------------------------------------ views
    @property
    def masks(self) -> dict[tuple[str, tuple[int, int]], torch.Tensor]:
        """``{(fqn, shard offsets): bool mask of this rank's shard}``."""
        return {(s.fqn, s.offsets): s.mask for s in self.shards}

    def local_nnz(self) -> int:
        """Active entries in this rank's shards (replicated tables counted once per rank)."""
        return sum(int(s.mask.sum()) for s in self.shards)

    def apply_masks(self) -> None:
        """Zeroes every masked entry of this rank's shards."""
        with torch.no_grad():
            for shard in self.shards:
                shard.weight.mul_(shard.mask)

    def full_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{table name: (weight [R, D], mask [R, D])}`` assembled from every rank's shards (a collective).

        Every rank gets the whole tables (an all-reduce of zero-padded shards; replicated tables come from rank
        0). For evaluation and tests of small models.
        """
        device = collective_device(self.group)
        rank = dist.get_rank(self.group)
        out = {}
        for fqn, name in self.table_of.items():
            shape = self._table_shape(name)
            weight = torch.zeros(shape, device=device)
            mask = torch.zeros(shape, dtype=torch.uint8, device=device)
            for shard in self.shards:
                if shard.fqn == fqn and (not self.replicated[fqn] or rank == 0):
                    weight[shard.region] = shard.weight.detach().to(device, torch.float32)
                    mask[shard.region] = shard.mask.to(device, torch.uint8)
            dist.all_reduce(weight, group=self.group)
            dist.all_reduce(mask, group=self.group)
            out[name] = (weight.cpu(), mask.cpu().bool())
        return out

    def verify_replicated(self) -> None:
        """Checks that replicated (data-parallel) tables hold the same masks on every rank.

        Raises:
            MaskDivergenceError: naming the ranks and tables that differ from rank 0.
        """
        shards = [s for s in self.shards if self.replicated[s.fqn]]
        if shards:
            verify_same_tensors(
                {s.table: s.mask for s in shards},
                step=self.step,
                what="replicated table masks",
                group=self.group,
            )

    # ------------------------------------------------------------------ training hooks
    def _prepare_capture(self, upcoming: int) -> None:
        """Whether the lookups of step ``upcoming`` feed the criteria's gradients; zeroes gradient buffers."""
        if self._collect is None:
            self._capturing = False
            return
        if self._collect == "momentum":
            self._capturing = upcoming <= math.floor(self.sparsity_config.end_fraction * self.total_steps)
            if self._capturing and not self._scores:
                self._scores = {name: torch.zeros(self._table_shape(name)) for name in self.table_of.values()}
            return
        self._capturing = schedules.is_update_step(upcoming, self.sparsity_config, self.total_steps)
        if self._capturing:
            self._scores = {name: torch.zeros(self._table_shape(name)) for name in self.table_of.values()}

    def _lookup_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self._capturing or not torch.is_grad_enabled():
            return
        features = inputs[0]
        joint = self.model.tables.layout == "joint"
        for rows, feature in zip(output, ("user", "item"), strict=True):
            if not isinstance(rows, torch.Tensor) or not rows.requires_grad:
                continue
            ids = features[feature].values()[: rows.shape[0]].to("cpu", torch.int64)
            table = "nodes" if joint else f"{feature}_table"
            rows.register_hook(self._accumulator(table, ids))

    def _accumulator(self, table: str, ids: torch.Tensor) -> Any:
        def accumulate(grad: torch.Tensor) -> None:
            buffer = self._scores[table]
            values = grad.detach().to("cpu", torch.float32)
            if self._collect == "momentum":
                buffer.index_add_(0, ids, values, alpha=1.0 - self.sparsity_config.momentum)
            else:
                buffer.index_add_(0, ids, values)

        return accumulate

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.apply_masks()
        if self._grow is not None and schedules.is_update_step(
            self.step, self.sparsity_config, self.total_steps
        ):
            self._update_topology()
        if self._collect == "momentum" and self._scores:
            for buffer in self._scores.values():
                buffer.mul_(
                    self.sparsity_config.momentum
                )  # the next step's gradient joins with weight 1 - momentum
        self._prepare_capture(self.step + 1)

    def _global_scores(self) -> dict[str, torch.Tensor]:
        """The captured buffers summed over ranks (a momentum of sums is the sum of the ranks' momenta)."""
        device = collective_device(self.group)
        out = {}
        for name, buffer in self._scores.items():
            total = buffer.to(device)
            dist.all_reduce(total, group=self.group)
            out[name] = total.cpu() / self.world_size
        return out

    def _update_topology(self) -> None:
        """One drop/grow update of every local shard, with the engine's criteria and updater."""
        config = self.sparsity_config
        fraction = schedules.drop_fraction(self.step, config, self.total_steps)
        gradients = self._global_scores() if self._scores else {}
        masks, drop_scores, grow_scores = {}, {}, {}
        assert self._grow is not None  # only method 'dsl' updates
        for shard in self.shards:
            name = f"{shard.fqn}@{shard.offsets}"
            gradient = gradients[shard.table][shard.region] if gradients else None
            context = scores.ScoreContext(
                fqn=name,
                weight=shard.weight.detach().cpu(),
                mask=shard.mask.cpu(),
                step=self.step,
                generator=torch.Generator().manual_seed(
                    _seed_for(config.seed, self.step, shard.fqn, shard.offsets)
                ),
                grad=gradient if self._collect == "grad" else None,
                momentum=gradient if self._collect == "momentum" else None,
            )
            masks[name] = context.mask
            drop_scores[name] = scores.compute(self._drop, context, config.tie_noise)
            grow_scores[name] = scores.compute(self._grow, context, config.tie_noise)
        new_masks, record = rules.update_masks(
            masks,
            drop_scores,
            grow_scores,
            rules.drop_counts(masks, fraction),
            step=self.step,
            drop_fraction=fraction,
        )
        with torch.no_grad():
            for shard in self.shards:
                shard.mask.copy_(new_masks[f"{shard.fqn}@{shard.offsets}"].to(shard.mask.device))
                shard.weight.mul_(shard.mask)  # grown entries start at zero
        self.history.append(record.to_dict())
        self.verify_replicated()

    def remove(self) -> None:
        """Detaches the hooks; the shards keep their zeros."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks as ``ShardedTensor``s laid out like the weights (plain tensors for replicated tables), the step
        and the growth scores summed over ranks; save it with ``torch.distributed.checkpoint`` (a collective)."""
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

        rank = dist.get_rank(self.group)
        masks: dict[str, Any] = {}
        for fqn, name in self.table_of.items():
            shards = [s for s in self.shards if s.fqn == fqn]
            if self.replicated[fqn]:
                masks[fqn] = shards[0].mask
                continue
            local = [
                Shard(
                    tensor=s.mask,
                    metadata=ShardMetadata(
                        shard_offsets=list(s.offsets),
                        shard_sizes=list(s.mask.shape),
                        placement=f"rank:{rank}/{s.mask.device}",
                    ),
                )
                for s in shards
            ]
            masks[fqn] = ShardedTensor._init_from_local_shards(
                local, *self._table_shape(name), process_group=self.group
            )
        gradients = self._global_scores() if self._scores else {}
        return {"step": self.step, "masks": masks, "scores": gradients, "seed": self.sparsity_config.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` after ``torch.distributed.checkpoint.load`` filled it in place."""
        if not isinstance(state, Mapping) or set(state) != {"step", "masks", "scores", "seed"}:
            raise ValueError(f"expected a ShardedSparseEmbeddings state_dict, got keys {sorted(state)}")
        if state["seed"] != self.sparsity_config.seed:
            raise ValueError(f"checkpoint has seed {state['seed']}, this run {self.sparsity_config.seed}")
        for fqn, value in state["masks"].items():
            shards = [s for s in self.shards if s.fqn == fqn]
            pieces = (
                {(0, 0): value}
                if not hasattr(value, "local_shards")
                else {tuple(int(o) for o in p.metadata.shard_offsets): p.tensor for p in value.local_shards()}
            )
            for shard in shards:
                if shard.offsets not in pieces or pieces[shard.offsets].shape != shard.mask.shape:
                    raise ValueError(
                        f"checkpoint masks of {fqn!r} do not match this rank's shard at {shard.offsets}"
                    )
                if pieces[shard.offsets] is not shard.mask:
                    shard.mask.copy_(pieces[shard.offsets])
                shard.budget = int(shard.mask.sum())
        self.step = int(state["step"])
        rank = dist.get_rank(self.group)
        self._scores = {
            name: (value.clone() * self.world_size if rank == 0 else torch.zeros_like(value))
            for name, value in state["scores"].items()
        }
        self._prepare_capture(self.step + 1)
        self.apply_masks()
        self.verify_replicated()
