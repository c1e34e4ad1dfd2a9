""":class:`TrainConfig`: one training run (data, model, sparsity method, optimization) as one flat dataclass.

Each field is a ``sparseapps recsys train`` option. The DSL fields (``drop``, ``grow``, ``update_interval``,
``drop_fraction``, ``end_fraction``, ``momentum``) are fields of the core :class:`~sparseapps.core.SparsityConfig`:
their defaults are :data:`~sparseapps.recsys.dsl.DSL_SPARSITY`'s, their help strings the engine's, and
:meth:`TrainConfig.dsl_config` hands them to the engine unchanged (any criterion of the score registry).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from sparseapps.core import SparsityConfig
from sparseapps.core.config import STORAGES, PlainConfig
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.recsys.data import DATASET_NAMES, DataConfig
from sparseapps.recsys.dsl import DSL_SPARSITY, INITIAL_MASKS, DSLConfig
from sparseapps.recsys.metrics import METRICS
from sparseapps.recsys.models import COLLECTION_KINDS, LAYOUTS, MODEL_NAMES, ModelConfig
from sparseapps.recsys.pep import GRANULARITIES, PEPConfig

Method = Literal["dense", "dsl", "static", "prune", "pep"]
METHODS = ("dense", "dsl", "static", "prune", "pep")
# Tuned on ML-100K validation Recall@20 with dense dim-64 models (docs/recsys.md); every method of a model uses
# the same values. The TrainConfig field defaults are MF's. LightGCN was retuned (L2 1e-3 -> 3e-3 with a 240-epoch
# cap instead of 120): the choice of validation Recall@20 over seeds 0-2 for dense 64, dense 13 and DSL 0.2 alike.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mf": {"lr": 5e-3, "reg_weight": 0.02, "epochs": 150},
    "lightgcn": {"lr": 5e-3, "reg_weight": 3e-3, "layers": 2, "epochs": 240},
    "neumf": {"lr": 2e-3, "reg_weight": 0.01, "epochs": 150},
}
#: The TrainConfig fields that are the DSL engine's SparsityConfig fields (same names, values passed unchanged).
ENGINE_FIELDS = ("drop", "grow", "update_interval", "drop_fraction", "end_fraction", "momentum")
_ENGINE_HELP = {item.name: item.metadata["help"] for item in dataclasses.fields(SparsityConfig)}


def _engine_field(name: str, help_text: str | None = None) -> Any:
    """A field that is the engine's ``name``: DSL's default and the engine's help string (unless ``help_text``)."""
    return field(default=getattr(DSL_SPARSITY, name), metadata={"help": help_text or _ENGINE_HELP[name]})


@dataclass(frozen=True, kw_only=True)
class TrainConfig(PlainConfig):
    """One training run: data, model, sparsity method and optimization.

    Example:
        >>> config = TrainConfig(dataset="synthetic-ml-100k", model="mf", method="dsl", density=0.2, epochs=5)
        >>> config.dsl_config().density, config.model_config().dim
        (0.2, 64)
        >>> TrainConfig(method="sparse")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of 'dense', 'dsl', 'static', 'prune', 'pep', got 'sparse'
    """

    dataset: str = field(default="ml-100k", metadata={"help": f"one of {', '.join(DATASET_NAMES)}"})
    data_root: str | None = field(default=None, metadata={"help": "data cache directory"})
    model: str = field(default="mf", metadata={"help": "mf (MF-BPR), lightgcn or neumf"})
    method: str = field(
        default="dense",
        metadata={
            "help": "dense, dsl (drop/grow), static (fixed mask), prune (magnitude pruning + fine-tune) or pep "
            "(PEP: learned thresholds find a mask, then the rewound tables are retrained under it)"
        },
    )
    density: float = field(default=0.2, metadata={"help": "fraction of table entries kept (sparse methods)"})
    dim: int = field(default=64, metadata={"help": "embedding dimension D"})
    layers: int = field(default=2, metadata={"help": "LightGCN propagation layers K"})
    budget: str = field(
        default="joint",
        metadata={"help": "joint: one (users + items) table and budget; per_table: a budget per table"},
    )
    collection: str = field(
        default="embedding",
        metadata={"help": "torchrec EmbeddingCollection (embedding) or EBC (embedding_bag)"},
    )
    init: str = field(default="nested", metadata={"help": "initial masks: random, prefix or nested"})
    storage: str = field(
        default="masked",
        metadata={
            "help": "sparse tables as masked (dense with exact zeros and a mask) or compact (each row's active "
            "entries only, with optimizer state of that size; needs --grow gradient for dsl)"
        },
    )
    drop: str = _engine_field("drop")
    grow: str = _engine_field(
        "grow",
        "which inactive entries are grown: a grow criterion of the score registry (DSL: momentum; gradient as "
        "published)",
    )
    nested_exponent: float = field(
        default=0.5, metadata={"help": "nested masks: row size ∝ (1 + popularity)^exponent"}
    )
    update_interval: int = _engine_field("update_interval")
    drop_fraction: float = _engine_field(
        "drop_fraction",
        "ζ₀: the fraction of each table's nnz dropped at the first update, decayed by a cosine",
    )
    end_fraction: float = _engine_field("end_fraction")
    prune_fraction: float = field(
        default=0.5, metadata={"help": "prune: fraction of the planned steps trained dense first"}
    )
    pep_granularity: str = field(
        default="row", metadata={"help": "pep: one threshold per row (feature-wise), per dimension or global"}
    )
    pep_threshold_init: float = field(
        default=-6.0,
        metadata={
            "help": "pep: initial threshold s (g(s) = sigmoid(s)); sets how fast and how far the search prunes "
            "(-6: best ML-100K validation Recall@20 of those tried, -15 (official) to -3; see docs/recsys.md)"
        },
    )
    pep_search_fraction: float = field(
        default=0.5,
        metadata={"help": "pep: most search steps, as a fraction of the planned steps (then |Ṽ| pruning)"},
    )
    momentum: float = _engine_field("momentum")
    rescale_init: bool = field(
        default=False,
        metadata={"help": "scale initial active entries by sqrt(D / k_row) (off: see docs/recsys.md)"},
    )
    init_std: float = field(default=0.1, metadata={"help": "std of the tables' normal initialization"})
    epochs: int = field(default=150, metadata={"help": "most epochs (the schedules are planned over them)"})
    batch_size: int = field(default=2048, metadata={"help": "BPR triples per step"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    reg_weight: float = field(default=0.02, metadata={"help": "L2 weight on the batch's layer-0 embeddings"})
    eval_every: int = field(default=1, metadata={"help": "epochs between validation evaluations"})
    patience: int = field(
        default=20, metadata={"help": "evaluations without improvement (after settling) before stopping"}
    )
    ks: tuple[int, ...] = field(default=(10, 20), metadata={"help": "metric cut-offs K"})
    selection_metric: str = field(default="recall@20", metadata={"help": "validation metric for selection"})
    seed: int = field(default=0, metadata={"help": "seed of the split, initialization, masks and sampling"})

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not (
            self.dataset in DATASET_NAMES or self.dataset.endswith(".inter")
        ):
            raise ValueError(
                f"dataset must be one of {', '.join(DATASET_NAMES)} or a '.inter' path, got {self.dataset!r}"
            )
        for name, value, choices in (
            ("model", self.model, MODEL_NAMES),
            ("method", self.method, METHODS),
            ("budget", self.budget, LAYOUTS),
            ("collection", self.collection, COLLECTION_KINDS),
            ("init", self.init, INITIAL_MASKS),
            ("storage", self.storage, STORAGES),
            ("pep_granularity", self.pep_granularity, GRANULARITIES),
        ):
            check_choice(name, value, choices)
        check_number("density", self.density, low=0.0, high=1.0, low_open=True)
        for name in ("dim", "layers", "epochs", "batch_size", "eval_every", "patience"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("reg_weight", self.reg_weight, low=0.0)
        ks = tuple(self.ks) if isinstance(self.ks, tuple | list) else None
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty tuple of positive integers, got {self.ks!r}")
        object.__setattr__(self, "ks", ks)
        metric, _, k = self.selection_metric.partition("@")
        if metric not in METRICS or not k.isdigit() or int(k) not in ks:
            raise ValueError(
                f"selection_metric must be '<{'|'.join(METRICS)}>@K' with K in ks={ks}, got {self.selection_metric!r}"
            )
        if self.storage == "compact" and self.method == "dense":
            raise ValueError(
                "storage='compact' holds sparse tables, got method 'dense' (choose a sparse method)"
            )
        self.model_config()
        self.dsl_config()  # validates the engine fields against the SparsityConfig and the score registry
        check_number("pep_threshold_init", self.pep_threshold_init)
        check_number("pep_search_fraction", self.pep_search_fraction, low=0.0, high=1.0, low_open=True)

    @classmethod
    def tuned(cls, model: str = "mf", **overrides: Any) -> TrainConfig:
        """A config with the hyperparameters tuned for ``model`` on ML-100K validation, then ``overrides``.

        Example:
            >>> TrainConfig.tuned("lightgcn").reg_weight, TrainConfig.tuned("mf", epochs=3).epochs
            (0.003, 3)
        """
        check_choice("model", model, MODEL_DEFAULTS)
        return cls(model=model, **{**MODEL_DEFAULTS[model], **overrides})

    def model_config(self) -> ModelConfig:
        """The model part (``budget`` sets the table layout)."""
        return ModelConfig(
            model=self.model,  # type: ignore[arg-type]
            dim=self.dim,
            layers=self.layers,
            layout=self.budget,  # type: ignore[arg-type]
            collection=self.collection,  # type: ignore[arg-type]
            init_std=self.init_std,
        )

    def dsl_config(self) -> DSLConfig:
        """The sparse part (unused by ``method="dense"``): DSL's choices and the engine's :class:`SparsityConfig`
        (:data:`~sparseapps.recsys.dsl.DSL_SPARSITY` with :data:`ENGINE_FIELDS` and ``seed`` from here)."""
        return DSLConfig(
            density=self.density,
            method={"dense": "dsl", "pep": "static"}.get(self.method, self.method),  # type: ignore[arg-type]
            init=self.init,  # type: ignore[arg-type]
            nested_exponent=self.nested_exponent,
            prune_fraction=self.prune_fraction,
            rescale_init=self.rescale_init,
            storage=self.storage,  # type: ignore[arg-type]
            sparsity=DSL_SPARSITY.replace(
                seed=self.seed, **{name: getattr(self, name) for name in ENGINE_FIELDS}
            ),
        )

    def pep_config(self) -> PEPConfig:
        """PEP's search settings (used by ``method="pep"``; its retrain is a static mask)."""
        return PEPConfig(
            density=self.density,
            granularity=self.pep_granularity,  # type: ignore[arg-type]
            threshold_init=self.pep_threshold_init,
            search_fraction=self.pep_search_fraction,
        )

    def data_config(self) -> DataConfig:
        """The data part (the split uses ``seed``)."""
        return DataConfig(dataset=self.dataset, data_root=self.data_root, seed=self.seed)

    def label(self) -> str:
        """A short name for tables and plots, e.g. ``mf dense d=64`` or ``lightgcn dsl 0.2``."""
        if self.method == "dense":
            return f"{self.model} dense d={self.dim}"
        return f"{self.model} {self.method} {self.density:g}"
