"""Training MF-BPR, LightGCN and NeuMF, dense or with sparse embedding tables, on a MovieLens split.

One :class:`TrainConfig` describes a run; :func:`train` reads it top to bottom: load and split the data, build the
model and Adam, attach :class:`~sparseapps.recsys.dsl.SparseEmbeddings` (DSL, a static mask or pruning), then
epochs of BPR steps, each followed by a full-ranking evaluation on the validation split. The model is selected on
validation Recall@20 only, and only once the topology has settled (after the last drop/grow update, or after
pruning): an update with a large ζ briefly costs accuracy, and stopping there would select a half-rewired model.
Early stopping counts evaluations without improvement from that point on.

With an output directory, a run writes ``checkpoint.pt`` after every epoch (atomically), ``results.json``,
``compact.pt`` (the tables in compact storage), ``recall_vs_epoch.png`` and ``embedding_size_vs_popularity.png``;
``resume=True`` continues from the checkpoint and refuses one made with another configuration. The directory is
claimed (:func:`~sparseapps.core.io.claim_output`, ``sparseapps-run.json``): a run of other settings, another
tool's run or foreign files there are refused unless ``overwrite=True``, which removes only :data:`OUTPUTS`.

``method="pep"`` first runs PEP's threshold search (:func:`~sparseapps.recsys.pep.search_masks`, its state in
``pep_search.pt``), then trains the tables rewound to step 0 under the mask it found, as a static mask.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sparseapps.core.config import ConfigMismatchError, PlainConfig
from sparseapps.core.io import (
    OWNER_FILE,
    CorruptFileError,
    OutputConflictError,
    claim_output,
    load_json,
    load_torch,
    save_torch,
    write_atomic,
    write_json,
)
from sparseapps.recsys.data import DATASET_NAMES, BPRSampler, DataConfig, InteractionSplit, load_split
from sparseapps.recsys.dsl import (
    GROWTH,
    INITIAL_MASKS,
    CompactScorer,
    DSLConfig,
    SparseEmbeddings,
    export_compact,
)
from sparseapps.recsys.metrics import METRICS, evaluate_split
from sparseapps.recsys.models import COLLECTION_KINDS, LAYOUTS, MODEL_NAMES, ModelConfig, build_model
from sparseapps.recsys.pep import GRANULARITIES, PEPConfig, search_masks

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
CHECKPOINT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
PEP_CHECKPOINT = "pep_search.pt"
RESULTS = "results.json"
COMPACT = "compact.pt"
RECALL_PLOT = "recall_vs_epoch.png"
SIZE_PLOT = "embedding_size_vs_popularity.png"
TOOL = "recsys train"
# Every file :func:`train` writes to its output directory (``overwrite`` removes these, and only these).
OUTPUTS = (CHECKPOINT, PEP_CHECKPOINT, RESULTS, COMPACT, RECALL_PLOT, SIZE_PLOT)
# Test hook: seconds to pause halfway through writing each checkpoint, so that a kill lands inside the write.
SLOW_CHECKPOINT_VARIABLE = "SPARSEAPPS_TEST_SLOW_CHECKPOINT"


def _check_number(name: str, value: object, *, low: float, low_open: bool, high: float | None = None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


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
    grow: str = field(
        default="momentum", metadata={"help": "DSL growth: gradient (current batch) or momentum"}
    )
    nested_exponent: float = field(
        default=0.5, metadata={"help": "nested masks: row size ∝ (1 + popularity)^exponent"}
    )
    update_interval: int = field(default=200, metadata={"help": "optimizer steps between DSL updates"})
    drop_fraction: float = field(default=0.5, metadata={"help": "ζ at the first update (cosine decay)"})
    end_fraction: float = field(
        default=0.75, metadata={"help": "fraction of the planned steps after which the topology is frozen"}
    )
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
    momentum: float = field(default=0.99, metadata={"help": "momentum growth: running-average decay"})
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
            ("grow", self.grow, GROWTH),
            ("pep_granularity", self.pep_granularity, GRANULARITIES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        _check_number("density", self.density, low=0.0, low_open=True, high=1.0)
        for name in ("dim", "layers", "update_interval", "epochs", "batch_size", "eval_every", "patience"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("reg_weight", self.reg_weight, low=0.0, low_open=False)
        ks = tuple(self.ks) if isinstance(self.ks, tuple | list) else None
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty tuple of positive integers, got {self.ks!r}")
        object.__setattr__(self, "ks", ks)
        metric, _, k = self.selection_metric.partition("@")
        if metric not in METRICS or not k.isdigit() or int(k) not in ks:
            raise ValueError(
                f"selection_metric must be '<{'|'.join(METRICS)}>@K' with K in ks={ks}, got {self.selection_metric!r}"
            )
        self.model_config()
        self.dsl_config()
        _check_number("pep_threshold_init", self.pep_threshold_init, low=-math.inf, low_open=True)
        _check_number("pep_search_fraction", self.pep_search_fraction, low=0.0, low_open=True, high=1.0)

    @classmethod
    def tuned(cls, model: str = "mf", **overrides: Any) -> TrainConfig:
        """A config with the hyperparameters tuned for ``model`` on ML-100K validation, then ``overrides``.

        Example:
            >>> TrainConfig.tuned("lightgcn").reg_weight, TrainConfig.tuned("mf", epochs=3).epochs
            (0.003, 3)
        """
        if model not in MODEL_DEFAULTS:
            raise ValueError(f"model must be one of {', '.join(map(repr, MODEL_DEFAULTS))}, got {model!r}")
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
        """The sparse part (unused by ``method="dense"``)."""
        return DSLConfig(
            density=self.density,
            method={"dense": "dsl", "pep": "static"}.get(self.method, self.method),  # type: ignore[arg-type]
            init=self.init,  # type: ignore[arg-type]
            grow=self.grow,  # type: ignore[arg-type]
            nested_exponent=self.nested_exponent,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            end_fraction=self.end_fraction,
            prune_fraction=self.prune_fraction,
            momentum=self.momentum,
            rescale_init=self.rescale_init,
            seed=self.seed,
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


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`train` (tensors and plain data only: no code runs from it).

    Raises:
        CorruptFileError: a damaged or foreign file, or one that holds anything but tensors and plain data.
    """
    state = load_torch(path, "a checkpoint written by sparseapps recsys train")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CorruptFileError(
            f"{path} is not a sparseapps recsys checkpoint of version {CHECKPOINT_VERSION} "
            f"(expected a dict with 'version': {CHECKPOINT_VERSION})"
        )
    return state


def config_differences(saved: dict[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for every field on which a saved config differs from ``current``.

    A field the saved config lacks (written before the field existed) counts as its default value, and PEP's
    ``pep_*`` settings count only when one of the two runs is a PEP run (no other method reads them).
    """
    now, defaults = current.to_dict(), type(current)().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    differences = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v} | {
        k: (v, None) for k, v in saved.items() if k not in now
    }
    if "pep" not in (saved.get("method"), current.method):
        differences = {k: v for k, v in differences.items() if not k.startswith("pep_")}
    return differences


def _read_record(out_dir: Path, *, overwrite: bool) -> tuple[bool, str | None, dict[str, Any] | None]:
    """``(present, tool, settings)`` of the record in ``out_dir``: ``(False, None, None)`` when there is none, a
    ``None`` tool and settings for a record that is not a sparseapps one (damaged: an error unless ``overwrite``)."""
    record = out_dir / OWNER_FILE
    if not record.exists():
        return False, None, None
    try:
        saved = load_json(record, "the record of which sparseapps tool and settings wrote this directory")
    except CorruptFileError:
        if overwrite:
            return True, None, None
        raise
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return True, None, None
    return True, saved.get("tool"), saved["settings"]


@dataclass(frozen=True)
class _OutputPlan:
    """What :func:`_plan_output` found in an output directory and what :meth:`claim` will do there.

    Attributes:
        checkpoint: the saved training state to continue from, or ``None`` to start.
        search: the saved PEP search state to continue from, or ``None``.
        settings: the settings to record (the recorded ones when they equal the configuration's).
        replace: remove the files of the run there first (``overwrite``, or a record with nothing else).
        adopt: record a run of a version that recorded no settings (its checkpoint matched).
    """

    checkpoint: dict[str, Any] | None
    search: dict[str, Any] | None
    settings: dict[str, Any]
    replace: bool
    adopt: bool

    def claim(self, out_dir: Path) -> None:
        """Records the run in ``out_dir`` (:func:`~sparseapps.core.io.claim_output`), first removing the files
        of the run it replaces."""
        if self.replace:  # without a record, claim_output(overwrite=True) removes every file of a run
            (out_dir / OWNER_FILE).unlink(missing_ok=True)
        claim_output(
            out_dir,
            tool=TOOL,
            settings=self.settings,
            outputs=() if self.adopt else OUTPUTS,
            overwrite=self.replace,
        )


def _plan_output(out_dir: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> _OutputPlan:
    """Checks what ``out_dir`` holds against a run of ``config``, writing nothing; returns what to resume.

    A directory holding a run of ``config`` is continued with ``resume`` and refused without it; one holding
    anything else (another configuration, another tool's run, files without a record) is refused, naming what
    differs, unless ``overwrite``, which removes the files :func:`train` writes (:data:`OUTPUTS`) and starts
    afresh. ``resume`` into an empty or missing directory simply starts, as does any run into a directory that
    holds only the record of a run that wrote nothing. A configuration that differs only in fields added since
    the run was recorded (at their defaults), or in PEP settings that neither run reads, counts as the same. A run
    of a version that recorded no settings is continued (and recorded) when its checkpoint's configuration matches.
    :func:`train` checks first and claims (:meth:`_OutputPlan.claim`) once the data has loaded, so a run that fails
    before it starts leaves the directory as it was.

    Raises:
        ConfigMismatchError: the run there (its record or checkpoint) has another configuration (a ValueError).
        FileExistsError: a run is there and ``resume`` is False, or results but no checkpoint to resume from;
            :class:`~sparseapps.core.io.OutputConflictError` for another tool's run or foreign files.
        CorruptFileError: a damaged checkpoint or record (a ValueError).
    """
    has_record, tool, recorded = _read_record(out_dir, overwrite=overwrite)
    present = [name for name in (CHECKPOINT, PEP_CHECKPOINT, RESULTS) if (out_dir / name).exists()]
    written = [name for name in OUTPUTS if (out_dir / name).exists()]
    if not overwrite:  # what claim_output would refuse, refused before the data is loaded
        problem = None
        if has_record and tool != TOOL:
            problem = (
                f"{out_dir} holds a run of `sparseapps {tool}` ({out_dir / OWNER_FILE}), not `sparseapps {TOOL}`"
                if tool is not None
                else f"{out_dir / OWNER_FILE} is not a sparseapps run record"
            )
        elif not has_record and written and not present:  # (a checkpoint or results: an older version's run?)
            problem = (
                f"{out_dir} holds {out_dir / written[0]} but no {OWNER_FILE}: it was written by another program or "
                "by a sparseapps version that did not record its settings"
            )
        if problem is not None:
            raise OutputConflictError(
                f"{problem}. Nothing was changed. Choose another output directory, or pass --overwrite "
                "(overwrite=True) to replace it"
            )
    if tool != TOOL:
        recorded = None
    settings: dict[str, Any] = config.to_dict()
    states: dict[str, dict[str, Any]] = {}
    empty_run = recorded is not None and not written
    if (recorded is not None or not has_record) and not empty_run:
        differences = config_differences(recorded, config) if recorded is not None else {}
        if differences and not overwrite:
            raise ConfigMismatchError(
                f"{out_dir} holds a run of another configuration ({out_dir / OWNER_FILE}); (saved, current) "
                f"differ in {differences}. Nothing was changed: choose another output directory, or pass "
                "--overwrite (overwrite=True) to replace it"
            )
        if recorded is not None and not differences:
            settings = recorded  # equal to config, up to fields added since and PEP settings no run reads
        if present and not resume and not overwrite:
            what = (
                "a run"
                if has_record
                else f"{', '.join(present)} but no {OWNER_FILE} (a run of a sparseapps version that did not "
                "record its settings, or another program's files)"
            )
            raise FileExistsError(
                f"{out_dir} already holds {what}; pass resume=True (--resume) to continue it, overwrite=True "
                "(--overwrite) to replace it, or choose another output directory"
            )
        if present and resume and not differences:
            paths = [out_dir / name for name in (CHECKPOINT, PEP_CHECKPOINT) if (out_dir / name).exists()]
            if not paths and not overwrite:
                raise FileExistsError(
                    f"{out_dir} holds {RESULTS} but no {CHECKPOINT} to resume from; refusing to retrain over "
                    "those results: choose another output directory, move them away or pass --overwrite"
                )
            for path in paths:
                saved = load_checkpoint(path)
                mismatch = config_differences(saved["config"], config)
                if mismatch and not overwrite:
                    raise ConfigMismatchError(
                        f"{path} was made with another configuration; (saved, current) differ in {mismatch}. "
                        "Nothing was changed: choose another output directory, or pass --overwrite "
                        "(overwrite=True) to replace it"
                    )
                if mismatch:
                    states = {}
                    break
                states[path.name] = saved
    return _OutputPlan(
        checkpoint=states.get(CHECKPOINT),
        search=states.get(PEP_CHECKPOINT),
        settings=settings,
        replace=(overwrite and not states) or empty_run,
        adopt=bool(states) and not has_record,
    )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``save_torch`` (atomic); with ``$SPARSEAPPS_TEST_SLOW_CHECKPOINT`` set, pauses that many seconds halfway
    through writing the temporary file (a test hook: a kill then lands inside the write)."""
    pause = os.environ.get(SLOW_CHECKPOINT_VARIABLE)
    if not pause:
        save_torch(path, state)
        return
    try:
        seconds = float(pause)
    except ValueError:
        raise ValueError(f"${SLOW_CHECKPOINT_VARIABLE} must be a number of seconds, got {pause!r}") from None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()

    def write_slowly(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data[: len(data) // 2])
            stream.flush()
            time.sleep(seconds)
            stream.write(data[len(data) // 2 :])

    write_atomic(path, write_slowly)


# ---------------------------------------------------------------------------------------------------------------
# Training


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters, fused (one kernel per tensor) where torch supports it.

    The fused kernel computes the same update as the default loop (to float32 rounding) and is faster here,
    most of all for masked tables: the default loop's vectorized ``sqrt`` is several times slower on the zeros
    that inactive entries keep in ``exp_avg_sq`` (measured: 2.3 ms vs 1.1 ms per MF step at density 0.2).
    """
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(model.parameters(), lr=lr)


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _seconds_summary(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def train(
    config: TrainConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split: InteractionSplit | None = None,
    stop_after: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Trains one model and returns its results (also written to ``out/results.json`` when ``out`` is given).

    Args:
        config: the run.
        out: output directory, or ``None`` to keep everything in memory.
        resume: continue the run in ``out`` from its checkpoint (a run of another configuration is refused); an
            empty or missing ``out`` simply starts.
        overwrite: replace whatever run ``out`` holds (another configuration, another tool's, foreign files):
            the files ``train`` writes there are removed first, other files are kept. With ``resume``, a run of
            the same configuration is continued and anything else replaced.
        progress: show a tqdm bar.
        split: an already loaded split of ``config``'s data (skips loading; must match ``config.seed``).
        stop_after: stop (as if interrupted) once this many epochs are done in total, leaving the checkpoint to
            resume from; the returned dict then has ``"finished": False``.
        threads: torch intra-op threads during the run (restored afterwards); ``None`` leaves them. The default
            is 1: the steps are many small ops, which lose far more to thread synchronization than they gain
            from a second thread, badly so on a busy machine (measured: 2 ms vs 120 ms per MF step).

    Returns:
        ``config``, ``valid`` and ``test`` metrics of the selected model, ``best_epoch``, ``parameters``,
        ``bytes`` (compact storage), ``dense_bytes``, ``seconds_per_epoch``, ``history`` and more.

    Raises:
        FileExistsError: ``out`` already holds a run and ``resume`` is False, or holds another tool's run or
            foreign files (:class:`~sparseapps.core.io.OutputConflictError`), and ``overwrite`` is False.
        ValueError: a run of another configuration in ``out`` (unless ``overwrite``), a damaged checkpoint, or a
            K above the number of items.
        DataNotFoundError: no local copy of the data and the download failed (a ``FileNotFoundError``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if threads is not None:
        _check_int("threads", threads, low=1)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            config,
            out,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            split=split,
            stop_after=stop_after,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    config: TrainConfig,
    out: str | os.PathLike[str] | None,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    split: InteractionSplit | None,
    stop_after: int | None,
) -> dict[str, Any]:
    out_dir = Path(out) if out is not None else None
    plan = _plan_output(out_dir, config, resume=resume, overwrite=overwrite) if out_dir is not None else None
    state = plan.checkpoint if plan is not None else None
    search_state = plan.search if plan is not None else None
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if split is None:
        split = load_split(config.data_config(), progress=progress)
    too_large = [k for k in config.ks if k > split.n_items]
    if too_large:
        raise ValueError(
            f"every K in ks must be at most the number of items ({split.n_items}), got {too_large}"
        )
    if plan is not None and out_dir is not None:
        plan.claim(out_dir)

    model = build_model(config.model_config(), split.n_users, split.n_items, split.train)
    sampler = BPRSampler(split, batch_size=config.batch_size, seed=config.seed)
    steps_per_epoch = len(sampler)
    total_steps = config.epochs * steps_per_epoch
    search = None
    if config.method == "pep":  # phase 1: the threshold search; its mask is the retrain's static mask

        def save_search(values: dict[str, Any]) -> None:
            assert out_dir is not None  # only passed with an output directory
            _save_checkpoint(
                out_dir / PEP_CHECKPOINT,
                {"version": CHECKPOINT_VERSION, "config": config.to_dict(), **values},
            )

        def evaluate_valid() -> dict[str, float]:
            model.eval()
            return evaluate_split(model.scorer(), split, "valid", ks=config.ks)

        search = search_masks(
            model,
            make_optimizer(model, config.lr),
            BPRSampler(split, batch_size=config.batch_size, seed=config.seed),
            config.pep_config(),
            lr=config.lr,
            reg_weight=config.reg_weight,
            planned_steps=total_steps,
            state=search_state,
            save=save_search if out_dir is not None else None,
            stop_after=stop_after,
            evaluate=evaluate_valid,
            progress=progress,
            description=f"{config.model} pep {config.density:g} search",
        )
        if not search.done:
            return {"config": config.to_dict(), "finished": False, "epoch": search.epochs, "history": []}
        if stop_after is not None:
            stop_after -= search.epochs
    optimizer = make_optimizer(model, config.lr)
    sparse = None
    if config.method != "dense":
        sparse = SparseEmbeddings(
            model,
            optimizer,
            config.dsl_config(),
            total_steps,
            user_popularity=split.user_activity(),
            item_popularity=split.item_popularity(),
            initial_masks=search.masks if search is not None else None,
        )
    settle_step = sparse.settle_step if sparse is not None else 0
    settle_epoch = math.ceil(settle_step / steps_per_epoch)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "score": -math.inf, "model": None}
    bad_evals, epoch, train_seconds, finished = 0, 0, [], False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if sparse is not None:
            sparse.load_state_dict(state["sparse"])
        sampler.load_state_dict(state["sampler"])
        history, best, bad_evals = state["history"], state["best"], state["bad_evals"]
        epoch, train_seconds, finished = state["epoch"], state["train_seconds"], state["finished"]

    bar = tqdm(
        total=total_steps,
        initial=epoch * steps_per_epoch,
        disable=not progress,
        desc=f"{config.model} {config.method}" + (f" {config.density:g}" if sparse is not None else ""),
        unit="step",
        dynamic_ncols=True,
    )
    metric = config.selection_metric
    while not finished and epoch < config.epochs:
        if stop_after is not None and epoch >= stop_after:
            break
        model.train()
        tick, losses = time.perf_counter(), []
        for users, positives, negatives in sampler.iter_epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(users, positives, negatives, reg_weight=config.reg_weight)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update()
        train_seconds.append(time.perf_counter() - tick)
        epoch += 1
        sampler.set_epoch(epoch)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": statistics.fmean(losses),
            "seconds": train_seconds[-1],
            "density": sparse.density if sparse is not None else 1.0,
        }
        last = epoch == config.epochs
        if epoch % config.eval_every == 0 or last:
            model.eval()
            valid = evaluate_split(model.scorer(), split, "valid", ks=config.ks)
            entry["valid"] = valid
            if epoch * steps_per_epoch >= settle_step:
                if valid[metric] > best["score"]:
                    best = {"epoch": epoch, "score": valid[metric], "model": _copy_state(model)}
                    bad_evals = 0
                else:
                    bad_evals += 1
            bar.set_postfix(loss=f"{entry['loss']:.4f}", **{f"valid_{metric}": f"{valid[metric]:.4f}"})
        history.append(entry)
        finished = last or bad_evals >= config.patience
        if out_dir is not None:
            _save_checkpoint(
                out_dir / CHECKPOINT,
                {
                    "version": CHECKPOINT_VERSION,
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparse": sparse.state_dict() if sparse is not None else None,
                    "sampler": sampler.state_dict(),
                    "history": history,
                    "best": best,
                    "bad_evals": bad_evals,
                    "train_seconds": train_seconds,
                    "finished": finished,
                },
            )
    bar.close()
    if not finished:
        return {"config": config.to_dict(), "finished": False, "epoch": epoch, "history": history}

    if best["model"] is not None:
        model.load_state_dict(best["model"])
    model.eval()
    valid = evaluate_split(model.scorer(), split, "valid", ks=config.ks)
    test = evaluate_split(model.scorer(), split, "test", ks=config.ks)
    compact = export_compact(model)
    serving = _serving_check(compact, model, split)
    if sparse is not None:
        user_sizes, item_sizes = sparse.row_sizes()
    else:
        user_sizes = torch.full((split.n_users,), config.dim)
        item_sizes = torch.full((split.n_items,), config.dim)
    dense_numel = (split.n_users + split.n_items) * config.dim
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "finished": True,
        "seed": config.seed,
        "data": split.summary(),
        "valid": valid,
        "test": test,
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "stopped_early": epoch < config.epochs,
        "selection": {"metric": metric, "settle_epoch": settle_epoch, "patience": config.patience},
        "parameters": compact.nnz if sparse is not None else dense_numel,
        "dense_parameters": dense_numel,
        "density": compact.nnz / dense_numel if sparse is not None else 1.0,
        "bytes": compact.nbytes if sparse is not None else 4 * dense_numel,
        "compact_bytes": compact.nbytes,
        "dense_bytes": 4 * dense_numel,
        "seconds_per_epoch": _seconds_summary(train_seconds),
        "step_ms": 1e3 * sum(train_seconds) / max(1, len(train_seconds) * steps_per_epoch),
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": sum(train_seconds),
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": _peak_rss_mb(),
        "topology_updates": len(sparse.engine.history) if sparse is not None else 0,
        "row_sizes": {
            "users": _size_summary(user_sizes),
            "items": _size_summary(item_sizes),
        },
        "serving": serving,
        "history": history,
    }
    if search is not None:
        results["pep"] = search.summary
    if out_dir is not None:
        write_json(out_dir / RESULTS, results)
        save_torch(out_dir / COMPACT, compact.to_dict())
        plot_recall_curve([results], out_dir / RECALL_PLOT, metric=metric)
        plot_row_sizes(
            user_sizes.numpy(),
            item_sizes.numpy(),
            split.user_activity(),
            split.item_popularity(),
            out_dir / SIZE_PLOT,
            title=_label(config),
        )
    return results


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _size_summary(sizes: torch.Tensor) -> dict[str, float]:
    sizes = sizes.to(torch.float64)
    return {
        "mean": float(sizes.mean()),
        "min": float(sizes.min()),
        "median": float(sizes.median()),
        "max": float(sizes.max()),
        "zero_rows": int((sizes == 0).sum()),
    }


def _serving_check(compact: Any, model: Any, split: InteractionSplit) -> dict[str, float]:
    """Scores of the compact scorer against the masked dense model on up to 256 users."""
    scorer = CompactScorer(compact, split.train if compact.model == "lightgcn" else None)
    users = torch.arange(min(256, split.n_users))
    with torch.no_grad():
        difference = (scorer(users) - model.scorer()(users)).abs().max()
    return {"users_checked": len(users), "max_abs_difference": float(difference)}


def _label(config: TrainConfig) -> str:
    if config.method == "dense":
        return f"{config.model} dense d={config.dim}"
    return f"{config.model} {config.method} {config.density:g}"


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    write_atomic(path, lambda temporary: fig.savefig(temporary, format="png", dpi=110))


def plot_recall_curve(
    runs: Iterable[dict[str, Any]], path: Path, *, metric: str = "recall@20", title: str | None = None
) -> None:
    """Validation ``metric`` against epoch, one line per run (dashed line: where the topology settles)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = [(h["epoch"], h["valid"][metric]) for h in run["history"] if "valid" in h]
        if not points:
            continue
        config = TrainConfig.from_dict(run["config"])
        (line,) = ax.plot(*zip(*points, strict=True), label=_label(config), linewidth=1.4)
        settle = run.get("selection", {}).get("settle_epoch", 0)
        if settle:
            ax.axvline(settle, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title or f"validation {metric} per epoch (dotted: topology frozen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_row_sizes(
    user_sizes: np.ndarray,
    item_sizes: np.ndarray,
    user_popularity: np.ndarray,
    item_popularity: np.ndarray,
    path: Path,
    *,
    title: str = "",
) -> None:
    """Per-row embedding size (active entries) against train popularity, users and items, with binned means."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, sizes, popularity, name in (
        (axes[0], user_sizes, user_popularity, "users"),
        (axes[1], item_sizes, item_popularity, "items"),
    ):
        x = np.asarray(popularity, dtype=np.float64) + 1.0
        y = np.asarray(sizes, dtype=np.float64)
        ax.scatter(x, y, s=4, alpha=0.35)
        edges = np.unique(np.geomspace(1.0, x.max() + 1.0, 16).round())
        which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        means = [
            (np.sqrt(edges[b] * edges[b + 1]), y[which == b].mean())
            for b in range(len(edges) - 1)
            if (which == b).any()
        ]
        if means:
            ax.plot(*zip(*means, strict=True), color="black", linewidth=1.6, label="mean per bin")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"train interactions + 1 ({name})")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: mean size {y.mean():.1f}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("embedding size (active entries in the row)")
    fig.suptitle(title or "embedding size vs popularity")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Demo


DEMO_DENSITIES = (0.5, 0.2, 0.1)
DEMO_MODELS = ("mf", "lightgcn")


def demo_configs(seed: int = 0) -> list[TrainConfig]:
    """The runs of ``make demo``: dense vs DSL at densities 0.5 / 0.2 / 0.1, for MF-BPR and LightGCN."""
    configs = []
    for model in DEMO_MODELS:
        base = TrainConfig.tuned(model, dataset="ml-100k", seed=seed)
        configs.append(base.replace(method="dense"))
        configs.extend(base.replace(method="dsl", density=d) for d in DEMO_DENSITIES)
    return configs


def format_table(rows: Sequence[dict[str, Any]], k: int = 20) -> str:
    """A plain-text table of runs: test Recall@K, NDCG@K, ratio to the dense run of the same model, parameters,
    bytes and time."""
    header = (
        f"{'model':<9} {'method':<7} {'density':>7} {f'Recall@{k}':>9} {f'NDCG@{k}':>8} {'vs dense':>8} "
        f"{'params':>8} {'bytes':>9} {'bytes/dense':>11} {'s/epoch':>7} {'seconds':>7}"
    )
    lines = [header, "-" * len(header)]
    dense_recall: dict[str, float] = {}
    for row in rows:
        config = row["config"]
        recall = row["test"][f"recall@{k}"]
        if config["method"] == "dense":
            dense_recall[config["model"]] = recall
        ratio = recall / dense_recall[config["model"]] if config["model"] in dense_recall else float("nan")
        density = f"{config['density']:g}" if config["method"] != "dense" else "1"
        lines.append(
            f"{config['model']:<9} {config['method']:<7} {density:>7} {recall:>9.4f} "
            f"{row['test'][f'ndcg@{k}']:>8.4f} {ratio:>8.3f} {row['parameters']:>8d} {row['bytes']:>9d} "
            f"{row['bytes'] / row['dense_bytes']:>11.3f} {row['seconds_per_epoch']:>7.2f} {row['total_seconds']:>7.1f}"
        )
    return "\n".join(lines)


def _demo_job(job: tuple[dict[str, Any], str, bool]) -> dict[str, Any]:
    config_dict, folder, overwrite = job
    try:
        return train(
            TrainConfig.from_dict(config_dict),
            folder,
            resume=True,
            overwrite=overwrite,
            progress=False,
            threads=1,
        )
    except ConfigMismatchError as error:  # a run left by other settings (an older version's defaults)
        raise ConfigMismatchError(
            f"{error}. The demo reuses the finished runs in {Path(folder).parent}; that directory holds a run "
            "made with other settings: move it away, pass another --out, or pass --overwrite to replace it "
            "(nothing was overwritten)"
        ) from error


def demo_run_name(config: TrainConfig) -> str:
    """The folder of one demo run, e.g. ``mf-dense`` or ``lightgcn-dsl-0.2``."""
    name = f"{config.model}-{config.method}"
    return name if config.method == "dense" else f"{name}-{config.density:g}"


def run_demo(out: Path, *, workers: int = 2, overwrite: bool = False) -> list[dict[str, Any]]:
    """``make demo``'s recsys job: ML-100K, dense vs DSL at 0.5 / 0.2 / 0.1 for MF-BPR and LightGCN.

    Prints a table of test Recall@20, NDCG@20, parameters, bytes and time; writes ``out/results.json``,
    ``out/table.txt``, ``out/recall_vs_epoch_<model>.png`` and, per run, ``out/<run>/`` with its own results,
    checkpoint and plots (embedding size vs popularity among them). ``out`` and each run's folder are claimed
    (:func:`~sparseapps.core.io.claim_output`): runs found there are resumed (finished ones reused), and a
    directory holding anything else is refused unless ``overwrite``.

    Args:
        out: output directory.
        workers: runs trained at once, each in its own process on one thread.
        overwrite: replace what ``out`` and the run folders hold that is not this demo's (its summary files are
            rewritten; runs of the demo's settings are still resumed, and any other run folder is replaced).

    Raises:
        FileExistsError: ``out`` holds another tool's files (:class:`~sparseapps.core.io.OutputConflictError`).
        ValueError: a run folder holds a run of other settings (:class:`ConfigMismatchError`).
    """
    _check_int("workers", workers, low=1)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    out = Path(out)
    configs = demo_configs()
    names = [demo_run_name(config) for config in configs]
    claim_output(
        out,
        tool="recsys demo",
        settings={"runs": names},
        outputs=[RESULTS, "table.txt", *(f"recall_vs_epoch_{model}.png" for model in DEMO_MODELS)],
        overwrite=overwrite,
    )
    jobs = [
        (config.to_dict(), str(out / name), overwrite) for config, name in zip(configs, names, strict=True)
    ]
    print(f"recsys demo: {len(jobs)} runs on ML-100K, {workers} at a time", flush=True)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        rows = []
        for row in pool.imap(_demo_job, jobs):
            rows.append(row)
            config = row["config"]
            print(
                f"  {_label(TrainConfig.from_dict(config))}: test recall@20 {row['test']['recall@20']:.4f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        pool.close()
        pool.join()
    table = format_table(rows)
    print(f"\nML-100K test split, model selected on validation Recall@20 (seed 0)\n{table}")
    write_json(out / RESULTS, {"rows": [{k: v for k, v in r.items() if k != "history"} for r in rows]})
    write_atomic(out / "table.txt", (table + "\n").encode())
    for model in DEMO_MODELS:
        plot_recall_curve(
            [r for r in rows if r["config"]["model"] == model],
            out / f"recall_vs_epoch_{model}.png",
            title=f"{model}: validation recall@20 per epoch (dotted: topology frozen)",
        )
    print(f"\nwrote {out / RESULTS}, {out / 'table.txt'} and plots under {out}")
    return rows
