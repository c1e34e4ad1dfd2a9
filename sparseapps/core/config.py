"""`SparsityConfig`: every knob of sparse training in one frozen dataclass, plus the literature's presets.

Words used throughout: ``sparsity`` is the fraction of zeros, ``density = 1 - sparsity``.

An algorithm is a configuration, not a class: RigL is magnitude drop + gradient growth, SET is signed-magnitude
drop + random growth, and so on. ``SparsityConfig.preset(name, **overrides)`` returns the published defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Self, get_args

from sparseapps.core import (
    criteria,  # noqa: F401  (imported for its side effect: it registers taylor, ... in the score registry)
    nm,
    scores,
)
from sparseapps.core.validation import check_choice, check_int, check_number

Distribution = Literal["uniform", "erk", "er"]
# Drop and grow criteria are names in the score registry (sparseapps.core.scores): the built-ins below and any
# criterion a user registers.
DropSchedule = Literal["constant", "cosine", "linear"]
Redistribution = Literal["none", "momentum", "dsr"]
Method = Literal[
    "dst",
    "static",
    "gmp",
    "one_shot",
    "obs",
    "sparsegpt",
    "snip",
    "grasp",
    "synflow",
    "lottery",
    "topkast",
    "cs",
    "sr_ste",
    "soft_movement",
    "edge_popup",
]
ModuleKind = Literal["linear", "conv", "embedding"]
Storage = Literal["masked", "compact"]

# The tuples of accepted values, from the Literal types above (one list of names each).
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
DROP_SCHEDULES: tuple[str, ...] = get_args(DropSchedule)
REDISTRIBUTIONS: tuple[str, ...] = get_args(Redistribution)
METHODS: tuple[str, ...] = get_args(Method)
MODULE_KINDS: tuple[str, ...] = get_args(ModuleKind)
GROW_OPTIMIZER_STATES = ("reset", "momentum")
EMBEDDING_ROWS = ("all", "looked_up")
FORESIGHT_METHODS = ("snip", "grasp", "synflow")
# One-shot pruning with a second-order reconstruction from the steps before it (sparseapps.core.calibration).
CALIBRATED_METHODS = ("obs", "sparsegpt")
# Methods that prune once, at start_fraction of training.
ONE_SHOT_METHODS = ("one_shot", *CALIBRATED_METHODS)
# Masks learned through the straight-through estimator over dense weights (sparseapps.core.learned_masks).
LEARNED_METHODS = ("topkast", "cs", "sr_ste", "soft_movement", "edge_popup")
STORAGES: tuple[str, ...] = get_args(Storage)
# How an N:M update picks its changes (sparseapps.core.nm.nm_update / nm_swap_update; auto: by the growth).
N_M_RULES = ("auto", "drop", "swap")


class ConfigMismatchError(ValueError):
    """A checkpoint or saved run was made with another configuration than the one resuming it."""


class PlainConfig:
    """``replace`` / ``to_dict`` / ``from_dict`` shared by the frozen config dataclasses (tuples stored as lists)."""

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for checkpoints and results.json)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True, kw_only=True)
class SparsityConfig(PlainConfig):
    """How a model is made and kept sparse.

    Example:
        >>> config = SparsityConfig.preset("rigl", sparsity=0.9)
        >>> config.drop, config.grow, config.distribution
        ('magnitude', 'gradient', 'erk')
        >>> SparsityConfig(sparsity=0.8, grow="random", drop="signed_magnitude").density
        0.2
    """

    sparsity: float = field(
        default=0.9, metadata={"help": "target fraction of zeros over the sparse tensors"}
    )
    method: Method = field(
        default="dst",
        metadata={
            "help": "dst: sparse from scratch with drop/grow updates; static: fixed random mask; gmp / one_shot: "
            "dense-to-sparse magnitude pruning; obs / sparsegpt: one-shot pruning with Optimal Brain Surgeon's "
            "or SparseGPT's update of the survivors, from the steps before it; snip / grasp / synflow: pruning at "
            "initialization; lottery: "
            "iterative magnitude pruning with rewinding; topkast / cs / sr_ste: masks learned over dense weights "
            "through the straight-through estimator (sparseapps.core.learned_masks)"
        },
    )
    distribution: Distribution = field(
        default="erk", metadata={"help": "how the budget is split across tensors: uniform, erk or er"}
    )
    drop: str = field(
        default="magnitude",
        metadata={"help": "which active entries are dropped: a drop criterion of the score registry"},
    )
    grow: str = field(
        default="gradient",
        metadata={
            "help": "which inactive entries are grown: a grow criterion of the score registry, or none"
        },
    )
    update_interval: int = field(default=100, metadata={"help": "optimizer steps between topology updates"})
    end_fraction: float = field(
        default=0.75, metadata={"help": "fraction of total_steps after which the topology is frozen"}
    )
    start_fraction: float = field(
        default=0.0, metadata={"help": "fraction of total_steps before which the topology (or pruning) waits"}
    )
    drop_fraction: float = field(
        default=0.3, metadata={"help": "fraction of each tensor's nnz dropped at step 0"}
    )
    drop_schedule: DropSchedule = field(
        default="cosine", metadata={"help": "decay of the drop fraction: constant, cosine or linear to 0"}
    )
    redistribution: Redistribution = field(
        default="none",
        metadata={
            "help": "moving the budget across tensors at updates: none, momentum (SNFS, by mean momentum "
            "magnitude) or dsr (one global magnitude threshold, regrowth proportional to nnz)"
        },
    )
    random_grow_fraction: float = field(
        default=0.0,
        metadata={"help": "share of grown entries picked uniformly at random (CTRE's exploration)"},
    )
    grow_init_range: float = field(
        default=0.0, metadata={"help": "grown weights start at U(-r, r); 0 means exactly zero (RigL)"}
    )
    grow_optimizer_state: Literal["reset", "momentum"] = field(
        default="reset",
        metadata={
            "help": "reset: grown entries start with zero optimizer state (RigL); momentum: their first moment "
            "starts from the tracked gradient momentum (SNFS)"
        },
    )
    momentum: float = field(
        default=0.9, metadata={"help": "decay of the dense-gradient momentum tracked for momentum growth"}
    )
    embedding_rows: Literal["all", "looked_up"] = field(
        default="all",
        metadata={
            "help": "all: mask every embedding table's whole gradient each step; looked_up: only the rows the "
            "step's forward passes looked up through the table's module (the momentum average of the other rows "
            "is decayed lazily, exactly). looked_up is for tables read only through their module's forward "
            "(MF-style lookups): a table also read directly (LightGCN's propagation) needs all. Tables under "
            "16,384 rows, and steps that looked up over a quarter of a table's rows, are processed whole"
        },
    )
    tie_noise: float = field(
        default=1e-5,
        metadata={"help": "std of noise added to drop/grow scores to break ties (RigL uses 1e-5)"},
    )
    constant_fan_in: bool = field(
        default=False, metadata={"help": "SRigL: every active output neuron keeps the same number of inputs"}
    )
    ablation_threshold: float = field(
        default=0.0,
        metadata={
            "help": "SRigL's gamma_sal: a neuron with fewer than gamma*k salient weights is ablated (0 = never)"
        },
    )
    n_m: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "N:M structure (sparseapps.core.nm), e.g. (2, 4): in every group of m consecutive inputs of a "
            "row exactly n are active, in the initial masks and after every update (methods dst and static). "
            "sparsity must be 1 - n/m; every tensor holds n/m of its entries, so distribution is set to "
            "'uniform'; every selected tensor's fan-in must be a multiple of m (exclude the others)"
        },
    )
    n_m_rule: str = field(
        default="auto",
        metadata={
            "help": "how an N:M update picks its changes: 'swap' (the best inactive entries by grow score come in "
            "tensor-wide, each replacing its group's weakest active entry: nm.nm_swap_update), 'drop' (the weakest "
            "active entries leave tensor-wide, each group regrows its best inactive ones: nm.nm_update), or 'auto': "
            "'drop' for random growth (SET), 'swap' otherwise (chosen on MNIST-1D validation, docs/nm.md)"
        },
    )
    rescale_initialization: bool = field(
        default=False,
        metadata={
            "help": "scale each row's surviving initial weights by sqrt(fan_in / row nnz), so a sparse layer "
            "starts with the output variance of its dense initialization (Linear/Conv only)"
        },
    )
    module_types: tuple[ModuleKind, ...] = field(
        default=("linear", "conv", "embedding"),
        metadata={"help": "kinds of modules whose weights are sparsified"},
    )
    include: tuple[str, ...] = field(
        default=(),
        metadata={"help": "fnmatch patterns on parameter fqns to sparsify (empty: all of module_types)"},
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "fnmatch patterns on parameter fqns to keep dense"}
    )
    dense_first_layer: bool = field(default=False, metadata={"help": "keep the first selected layer dense"})
    dense_last_layer: bool = field(default=False, metadata={"help": "keep the last selected layer dense"})
    pruning_interval: int = field(
        default=100, metadata={"help": "gmp: optimizer steps between pruning steps"}
    )
    foresight_iterations: int = field(
        default=100, metadata={"help": "synflow: pruning rounds (exponential schedule); snip/grasp use one"}
    )
    calibration_steps: int = field(
        default=64,
        metadata={
            "help": "obs / sparsegpt: the training steps right before the one-shot step whose mini-batch gradients "
            "(obs: the block-diagonal empirical Fisher) or layer inputs (sparsegpt: H = 2 X X^T) are collected"
        },
    )
    lottery_rounds: int = field(default=3, metadata={"help": "lottery: pruning rounds to reach the target"})
    rewind_step: int = field(
        default=0, metadata={"help": "lottery and cs: optimizer step whose weights are rewound to"}
    )
    backward_extra_density: float = field(
        default=0.1,
        metadata={
            "help": "topkast: M, the extra density of the backward set: the top (density + M) entries of |theta| "
            "get gradients, the top density are used in the forward pass"
        },
    )
    exploration_penalty: float = field(
        default=1e-4,
        metadata={
            "help": "topkast: L2 coefficient on the backward set, the entries outside the forward set scaled by "
            "1 / density (the exploration loss)"
        },
    )
    refine_decay: float = field(
        default=2e-4,
        metadata={
            "help": "sr_ste: lambda_W, the sparse-refined term lambda_W * (1 - mask) * theta added to the gradient"
        },
    )
    gate_init: float = field(
        default=0.0, metadata={"help": "cs: s_0, the initial value of every gate score (and its reset cap)"}
    )
    gate_penalty: float = field(
        default=1e-8, metadata={"help": "cs: lambda, the L1 coefficient on the soft gates sigmoid(beta * s)"}
    )
    gate_temperature: float = field(
        default=200.0, metadata={"help": "cs: beta at the end of each search round (from 1, exponentially)"}
    )
    score_penalty: float = field(
        default=1.0,
        metadata={
            "help": "soft_movement: lambda, the L1 coefficient on sigmoid(S) (per tensor, its mean over the tensor's "
            "entries, averaged over tensors, as the movement-pruning code regularizes)"
        },
    )
    gate_rounds: int = field(
        default=2,
        metadata={
            "help": "cs: search rounds; total_steps is split into gate_rounds search rounds and one round that "
            "trains the ticket (hard mask, weights rewound to rewind_step)"
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the engine's own RNG (None: from torch)"}
    )
    storage: Storage = field(
        default="masked",
        metadata={
            "help": "masked: dense weights with exact zeros and a mask buffer (any layer, any method); compact: "
            "Linear layers hold only their active weights (sparseapps.core.to_compact), with sparse forward and "
            "backward kernels and gradients and optimizer state of the same size (methods dst and static)"
        },
    )

    def __post_init__(self) -> None:
        check_number("sparsity", self.sparsity, low=0.0, high=1.0, high_open=True)
        check_choice("method", self.method, METHODS)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_choice("drop", self.drop, scores.drop_names())
        check_choice("grow", self.grow, ("none", *scores.grow_names()))
        check_choice("drop_schedule", self.drop_schedule, DROP_SCHEDULES)
        check_choice("redistribution", self.redistribution, REDISTRIBUTIONS)
        check_choice("grow_optimizer_state", self.grow_optimizer_state, GROW_OPTIMIZER_STATES)
        for name in (
            "update_interval",
            "pruning_interval",
            "foresight_iterations",
            "lottery_rounds",
            "calibration_steps",
        ):
            check_int(name, getattr(self, name), low=1)
        check_int("rewind_step", self.rewind_step, low=0)
        check_number("end_fraction", self.end_fraction, low=0.0, high=1.0, high_open=False)
        check_number("start_fraction", self.start_fraction, low=0.0, high=1.0, high_open=False)
        if self.start_fraction > self.end_fraction:
            raise ValueError(
                f"start_fraction must not exceed end_fraction, got {self.start_fraction} > {self.end_fraction}"
            )
        check_number("drop_fraction", self.drop_fraction, low=0.0, high=1.0, high_open=False)
        check_number("random_grow_fraction", self.random_grow_fraction, low=0.0, high=1.0, high_open=False)
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_choice("embedding_rows", self.embedding_rows, EMBEDDING_ROWS)
        check_number("ablation_threshold", self.ablation_threshold, low=0.0, high=1.0, high_open=False)
        for name in ("grow_init_range", "tie_noise"):
            check_number(name, getattr(self, name), low=0.0)
        kinds = tuple(self.module_types)
        if not kinds:
            raise ValueError("module_types must name at least one of 'linear', 'conv', 'embedding', got ()")
        for kind in kinds:
            check_choice("module_types entry", kind, MODULE_KINDS)
        for name in ("include", "exclude", "module_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a tuple of strings, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.dynamic and self.grow == "none":
            raise ValueError("method 'dst' needs a grow criterion, got grow='none' (use method='static')")
        if self.redistribution != "none" and self.constant_fan_in:
            raise ValueError(
                f"redistribution={self.redistribution!r} moves budget across tensors, which constant_fan_in "
                "(SRigL) does not allow; use redistribution='none'"
            )
        if self.ablation_threshold > 0 and not self.constant_fan_in:
            raise ValueError(
                "ablation_threshold > 0 needs constant_fan_in=True (SRigL), got constant_fan_in=False"
            )
        check_choice("n_m_rule", self.n_m_rule, N_M_RULES)
        if self.n_m is not None:
            self._check_n_m()
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        check_choice("storage", self.storage, STORAGES)
        self._check_learned()
        if self.storage == "compact":
            self._check_compact()

    def _check_n_m(self) -> None:
        """N:M fixes every tensor's density at n/m and needs updates that keep it (``nm.nm_update``)."""
        nm.check_n_m(self.n_m)  # type: ignore[arg-type]
        n, m = (int(v) for v in self.n_m)  # type: ignore[union-attr]
        object.__setattr__(self, "n_m", (n, m))
        if abs(self.sparsity - (1.0 - n / m)) > 1e-9:
            raise ValueError(
                f"n_m={self.n_m} holds every tensor at sparsity 1 - n/m = {1.0 - n / m:g}, got "
                f"sparsity={self.sparsity!r}; pass sparsity={1.0 - n / m:g}"
            )
        if self.method not in ("dst", "static", "sr_ste"):
            raise ValueError(
                f"n_m={self.n_m} is kept by the drop/grow updates of methods 'dst' and 'static' (and by sr_ste), got "
                f"method={self.method!r}, whose pruning does not keep it"
            )
        if self.constant_fan_in:
            raise ValueError(f"n_m={self.n_m} and constant_fan_in=True are two structures; choose one")
        if self.redistribution != "none":
            raise ValueError(
                f"redistribution={self.redistribution!r} moves budget across tensors, which n_m={self.n_m} fixes "
                "at n/m each; use redistribution='none'"
            )
        if self.random_grow_fraction > 0 and self.grow != "random":
            raise ValueError(
                f"random_grow_fraction={self.random_grow_fraction!r} (CTRE's exploration) is not kept N:M; use "
                "random_grow_fraction=0 with n_m"
            )
        # Every tensor holds n/m of its entries whatever the distribution: 'uniform' gives exactly those budgets.
        object.__setattr__(self, "distribution", "uniform")
        # 'auto': growth-led swaps, but drop-led for random growth (SET), whose random incoming entries would
        # evict their groups' weakest
        if self.n_m_rule == "auto":
            object.__setattr__(self, "n_m_rule", "drop" if self.grow == "random" else "swap")

    def _check_learned(self) -> None:
        """The learned-mask methods' fields, and what those methods cannot combine with."""
        for name in ("backward_extra_density",):
            check_number(name, getattr(self, name), low=0.0, high=1.0)
        for name in ("exploration_penalty", "refine_decay", "gate_penalty", "score_penalty"):
            check_number(name, getattr(self, name), low=0.0)
        check_number("gate_init", self.gate_init)
        check_number("gate_temperature", self.gate_temperature, low=1.0)
        check_int("gate_rounds", self.gate_rounds, low=1)
        if self.method not in LEARNED_METHODS:
            return
        if self.storage == "compact":
            raise ValueError(
                f"method {self.method!r} trains dense weights under a learned mask, which storage='compact' (the "
                "active weights only) cannot hold; use storage='masked'"
            )
        if self.embedding_rows != "all":
            raise ValueError(
                f"method {self.method!r} passes every entry's gradient to the dense weights, got "
                f"embedding_rows={self.embedding_rows!r}; use embedding_rows='all'"
            )
        if self.constant_fan_in or self.redistribution != "none":
            raise ValueError(
                f"method {self.method!r} chooses its masks itself, got constant_fan_in={self.constant_fan_in} and "
                f"redistribution={self.redistribution!r}; use False and 'none'"
            )
        if self.rescale_initialization:
            raise ValueError(
                f"method {self.method!r} keeps the dense initial weights under its masks, got "
                "rescale_initialization=True; use False"
            )
        if self.method == "sr_ste" and self.n_m is None:
            raise ValueError("method 'sr_ste' keeps an N:M mask and needs n_m, e.g. n_m=(2, 4), got n_m=None")

    def _check_compact(self) -> None:
        """Compact storage drops the dense state that dense-to-sparse methods and momentum criteria read."""
        if self.method not in ("dst", "static"):
            raise ValueError(
                f"storage='compact' trains sparse from the start (method 'dst' or 'static'), got "
                f"method={self.method!r}, which starts dense; use storage='masked'"
            )
        for name in ("redistribution", "grow_optimizer_state"):
            if getattr(self, name) == "momentum":
                raise ValueError(
                    f"storage='compact' keeps no dense gradient between updates, which {name}='momentum' "
                    "tracks every step; use storage='masked'"
                )

    @property
    def density(self) -> float:
        """Fraction of nonzeros, ``1 - sparsity``."""
        return round(1.0 - self.sparsity, 12)

    @property
    def dynamic(self) -> bool:
        """Whether the topology changes by drop/grow updates during training."""
        return self.method == "dst"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`. A saved N:M configuration from before ``n_m_rule`` existed ran the ``drop``
        rule, and reads back so: resuming it under today's ``auto`` (``swap`` for RigL) is then refused by the
        checkpoint's configuration check, which names ``n_m_rule``, instead of changing rule silently."""
        if values.get("n_m") is not None and "n_m_rule" not in values:
            values = {**values, "n_m_rule": "drop"}
        return super().from_dict(values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SparsityConfig:
        """The published defaults of a named method, with ``overrides`` applied on top.

        Args:
            name: one of :data:`PRESETS` (``static``, ``set``, ``rigl``, ``snfs``, ``ctre``, ``dsr``, ``srigl``,
                ``gmp``, ``one_shot``, ``snip``, ``grasp``, ``synflow``, ``lottery``, ``taylor``, ``movement``,
                ``obd``, ``momentum_magnitude``, ``obs``, ``sparsegpt``, ``topkast``, ``cs``, ``sr_ste``, ``soft_movement``, ``edge_popup``).
            **overrides: any :class:`SparsityConfig` field, e.g. ``sparsity=0.95``. An N:M preset (``sr_ste``,
                2:4) given a ``sparsity`` and no ``n_m`` runs at ``1:m`` with ``1 - 1/m`` that sparsity (0.9: 1:10).

        Example:
            >>> SparsityConfig.preset("sr_ste").n_m, SparsityConfig.preset("sr_ste", sparsity=0.9).n_m
            ((2, 4), (1, 10))
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields in overrides: {unknown}")
        fields = {**PRESETS[name], **overrides}
        if PRESETS[name].get("n_m") is not None and "sparsity" in overrides and "n_m" not in overrides:
            fields["n_m"] = _n_m_at(PRESETS[name]["n_m"], overrides["sparsity"])
        return cls(**fields)


def _n_m_at(own: tuple[int, int], sparsity: Any) -> tuple[int, int]:
    """An N:M preset's structure at ``sparsity``: its own where ``1 - n/m`` is it, else ``1:m`` where ``1 - 1/m``
    is, else its own (which the config then refuses, naming both)."""
    n, m = own
    if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        return own
    if abs(1.0 - n / m - sparsity) < 1e-9:
        return own
    groups = round(1.0 / (1.0 - sparsity))
    return (1, groups) if abs(1.0 - 1.0 / groups - sparsity) < 1e-9 else own


# The literature's defaults (see ../shared/REFERENCES.md). Each is a set of field values, nothing more.
# Methods published without a stop (SET, SNFS, CTRE, DSR) stop changing the topology at 90% of training here:
# an update in the last steps drops up to 30% of the weights right before evaluation (measured on the digits
# demo: SET fell from 0.92 to 0.36 test accuracy after a final-step update). end_fraction=1.0 restores the original.
PRESETS: dict[str, dict[str, Any]] = {
    # A fixed random mask at the target distribution.
    "static": dict(method="static", grow="none", distribution="erk"),
    # Mocanu et al. 2018: ER, drop 0.3 of the weights per update (half smallest positive, half largest
    # negative), random growth, no decay.
    "set": dict(
        method="dst",
        distribution="er",
        drop="signed_magnitude",
        grow="random",
        drop_fraction=0.3,
        drop_schedule="constant",
        end_fraction=0.9,
    ),
    # Evci et al. 2020: ERK, magnitude drop, dense-gradient growth, alpha 0.3 cosine to 0 at 0.75 T, every 100.
    "rigl": dict(
        method="dst",
        distribution="erk",
        drop="magnitude",
        grow="gradient",
        drop_fraction=0.3,
        drop_schedule="cosine",
        update_interval=100,
        end_fraction=0.75,
    ),
    # Dettmers & Zettlemoyer 2019: momentum growth, budget redistributed by mean momentum magnitude,
    # prune rate 0.5 with cosine decay.
    "snfs": dict(
        method="dst",
        distribution="uniform",
        drop="magnitude",
        grow="momentum",
        redistribution="momentum",
        drop_fraction=0.5,
        drop_schedule="cosine",
        end_fraction=0.9,
        grow_optimizer_state="momentum",
    ),
    # Atashgahi et al.: magnitude drop, growth by cosine similarity of neuron activations with random
    # exploration, new weights from a small uniform range, ER distribution.
    "ctre": dict(
        method="dst",
        distribution="er",
        drop="magnitude",
        grow="cosine",
        random_grow_fraction=0.5,
        drop_fraction=0.3,
        drop_schedule="constant",
        end_fraction=0.9,
        grow_init_range=1e-2,
        module_types=("linear", "conv"),
    ),
    # Mostafa & Wang 2019: one adaptive global magnitude threshold, random regrowth proportional to nnz.
    "dsr": dict(
        method="dst",
        distribution="uniform",
        drop="magnitude",
        grow="random",
        redistribution="dsr",
        drop_fraction=0.3,
        drop_schedule="constant",
        end_fraction=0.9,
    ),
    # Zhu & Gupta 2017: cubic schedule from dense to the target between 10% and 75% of training.
    "gmp": dict(
        method="gmp",
        grow="none",
        distribution="uniform",
        start_fraction=0.1,
        end_fraction=0.75,
        pruning_interval=100,
    ),
    # Train dense until start_fraction, prune once by magnitude to the target, fine-tune.
    "one_shot": dict(method="one_shot", grow="none", distribution="uniform", start_fraction=0.5),
    # Pruning at initialization with global scores, then a fixed mask.
    "snip": dict(method="snip", grow="none"),
    "grasp": dict(method="grasp", grow="none"),
    "synflow": dict(method="synflow", grow="none", foresight_iterations=100),
    # Frankle et al.: iterative magnitude pruning with rewinding to an early step.
    "lottery": dict(method="lottery", grow="none", distribution="uniform", lottery_rounds=3, rewind_step=0),
}
# Lasby et al. 2024: RigL with constant fan-in and neuron ablation (gamma 0.3, the CNN setting).
PRESETS["srigl"] = {**PRESETS["rigl"], "constant_fan_in": True, "ablation_threshold": 0.3}
# Molchanov et al. 2017: prune the weights whose first-order Taylor term |w * E[g]| is smallest, E[g] averaged over
# recent mini-batches (the gradient EMA, decay `momentum`), gradually with fine-tuning between pruning steps; the
# paper's per-feature-map schedule is replaced by GMP's cubic one (same window and interval as the gmp preset).
PRESETS["taylor"] = {**PRESETS["gmp"], "drop": "taylor", "momentum": 0.9}
# Sanh et al. 2020: hard movement pruning, S = -sum_t g_t * w_t, with the cubic sparsity schedule they use (GMP's:
# here pruned weights stay pruned; the paper's top-k re-ranking may revive them).
PRESETS["movement"] = {**PRESETS["gmp"], "drop": "movement"}
# LeCun et al. 1990: OBD saliency 0.5 * H_ii * w^2 with H_ii the diagonal empirical Fisher (average of g^2 over
# recent mini-batches, decay `momentum`), pruned gradually on GMP's schedule instead of once after training.
PRESETS["obd"] = {**PRESETS["gmp"], "drop": "obd", "momentum": 0.99}
# Momentum-based pruning (the survey's "magnitudes tracked over the last epochs"): |w| averaged with decay 0.99
# (~100 steps, a few epochs of MNIST-1D) on GMP's schedule.
PRESETS["momentum_magnitude"] = {**PRESETS["gmp"], "drop": "momentum_magnitude", "momentum": 0.99}
# Hassibi & Stork 1993 with WoodFisher's block-diagonal empirical Fisher (Singh & Alistarh 2020: blocks of
# consecutive weights, damp 1e-4, mini-batch gradients), once at half of training like one_shot, then fine-tuned.
# The Fisher comes from the last 64 training steps' mini-batch gradients (sparseapps.core.calibration).
PRESETS["obs"] = {**PRESETS["one_shot"], "method": "obs", "calibration_steps": 64}
# Frantar & Alistarh 2023: SparseGPT's layer-wise reconstruction (column blocks of 128, damp 1% of mean diag H),
# H from the inputs of the last 64 training forwards, once at half of training like one_shot, then fine-tuned.
PRESETS["sparsegpt"] = {**PRESETS["one_shot"], "method": "sparsegpt", "calibration_steps": 64}
# Masks learned through the straight-through estimator over dense weights (sparseapps.core.learned_masks,
# docs/learned_masks.md). Jayakumar et al. 2020 (Top-KAST): forward on the top-D of |theta| per layer, gradients on
# the top-(D + M) (their 90% forward / 80% backward: M = 0.1), masks recomputed from |theta| every step, an L2
# exploration penalty on the backward set with the backward-only entries scaled by 1/D (the coefficient is ours:
# the paper gives the form, not a value).
PRESETS["topkast"] = dict(
    method="topkast",
    grow="none",
    distribution="uniform",
    backward_extra_density=0.1,
    exploration_penalty=1e-4,
    update_interval=1,
    end_fraction=1.0,
)
# Savarese et al. 2020 (continuous sparsification, official code's defaults): gates sigmoid(beta * s) with s_0 = 0,
# lambda = 1e-8, beta from 1 to 200 within each round, rounds ending with s <- min(beta * s, s_0); then the ticket
# (the top of s to the configured sparsity) retrained from the rewind point. Two search rounds here.
PRESETS["cs"] = dict(
    method="cs",
    grow="none",
    distribution="uniform",
    gate_init=0.0,
    gate_penalty=1e-8,
    gate_temperature=200.0,
    gate_rounds=2,
    rewind_step=0,
)
# Zhou et al. 2021 (SR-STE): 2:4 recomputed from |theta| every step, the gradient passed straight through with the
# sparse-refined term lambda_W (1 - mask) * theta, lambda_W = 2e-4. Its sparsity is N:M's, 1 - n/m.
PRESETS["sr_ste"] = dict(
    method="sr_ste",
    grow="none",
    n_m=(2, 4),
    sparsity=0.5,
    refine_decay=2e-4,
    update_interval=1,
    end_fraction=1.0,
)
# Sanh et al. 2020, soft movement pruning: scores S learned through the straight-through estimator (dL/dS = dL/dW' * W,
# S starts at 0 and is trained by the optimizer, in a group without weight decay) with the L1 penalty
# lambda * sigmoid(S); the mask is one global threshold on S, so each tensor's sparsity is learned. The paper sets
# lambda to reach a sparsity; here the threshold is set, at every step, to keep the density of GMP's cubic schedule
# (10% to 75% of training, as the movement preset), reaching the configured sparsity exactly. Masked weights are kept
# and may come back while the threshold moves (the difference from hard movement here, whose pruned weights are zero).
PRESETS["soft_movement"] = dict(
    method="soft_movement",
    grow="none",
    distribution="uniform",
    start_fraction=0.1,
    end_fraction=0.75,
    update_interval=1,
    score_penalty=1.0,
)
# Ramanujan et al. 2020 (edge-popup): frozen signed-constant weights, learned scores, the top density of |scores| per
# tensor as the mask, every step (the paper's defaults beyond this: SGD lr 0.1 with cosine decay on the scores, set
# by the user's optimizer here; scripts/bench_supermask.py runs the paper's optimizer with sparseapps.core.supermask).
PRESETS["edge_popup"] = dict(
    method="edge_popup",
    grow="none",
    distribution="uniform",
    update_interval=1,
    end_fraction=1.0,
)
