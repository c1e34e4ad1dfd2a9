"""The engine's state: one typed structure, one ``state_dict`` format, and the checks a checkpoint must pass.

:class:`EngineState` holds what changes during training besides the masks (which live in the model as buffers
and are saved from there). :func:`state_dict` / :func:`load_state_dict` are the engine's methods of the same
names; the format is the same as before this module existed, so older checkpoints load. A checkpoint cannot
lie: masks of the wrong shape, more active entries than the budget allows, or another configuration are refused
with the file's differences named (:func:`check_masks`, :func:`check_budgets`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sparseapps.core.config import ConfigMismatchError, SparsityConfig
from sparseapps.core.kernels import library
from sparseapps.core.selection import SparseTensor

if TYPE_CHECKING:
    from sparseapps.core.engine import DynamicSparsity

STATE_VERSION = 1


@dataclass
class EngineState:
    """What a :class:`~sparseapps.core.DynamicSparsity` engine changes as it trains, besides the masks.

    Attributes:
        step: optimizer steps taken.
        history: one :meth:`UpdateRecord.to_dict <sparseapps.core.rules.UpdateRecord.to_dict>` per topology
            update or pruning step.
        ever_active: ``{fqn: [*S] bool}`` entries active at any time (dynamic runs: the ITOP rate).
        momentum: ``{fqn: [*S]}`` the dense-gradient momentum (momentum growth, SNFS redistribution).
        traces: ``{need: {fqn: [*S]}}`` per-step traces the criteria read (``scores.TRACES``: movement, squared
            gradients).
        growth_regions: ``{fqn: [*S] bool}`` where growth may happen (continual isolation's free capacity).
        dsr_threshold: DSR's adaptive global magnitude threshold.
        foresight_done: pruning at initialization has run (always true for other methods).
        lottery_round: lottery rounds done.
        lottery_snapshot: ``{name: tensor}`` the lottery ticket's rewind point.
    """

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ever_active: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    traces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    growth_regions: dict[str, torch.Tensor] = field(default_factory=dict)
    dsr_threshold: float | None = None
    foresight_done: bool = True
    lottery_round: int = 0
    lottery_snapshot: dict[str, torch.Tensor] | None = None


class StateField:
    """An engine attribute that reads and writes a field of its :class:`EngineState` (``engine.step`` ...)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        return self if engine is None else getattr(engine.state, self.name)

    def __set__(self, engine: Any, value: Any) -> None:
        setattr(engine.state, self.name, value)


def state_dict(engine: DynamicSparsity) -> dict[str, Any]:
    """Everything needed to resume bit for bit: masks, schedule position, RNG and method state."""
    return {
        "version": STATE_VERSION,
        "config": engine.config.to_dict(),
        "total_steps": engine.total_steps,
        "step": engine.step,
        "masks": {fqn: t.mask.detach().cpu().clone() for fqn, t in engine.tensors.items()},
        "budgets": {fqn: t.budget for fqn, t in engine.tensors.items()},
        "active_rows": {
            fqn: t.active_rows.cpu().clone() for fqn, t in engine.tensors.items() if t.active_rows is not None
        },
        "ever_active": {fqn: m.cpu().clone() for fqn, m in engine.ever_active.items()},
        "momentum": {fqn: m.cpu().clone() for fqn, m in engine.momentum.items()},
        "momentum_base": dict(engine.rows.momentum_base),
        "traces": {
            need: {fqn: m.cpu().clone() for fqn, m in per.items()} for need, per in engine.traces.items()
        },
        "growth_regions": {fqn: m.cpu().clone() for fqn, m in engine.growth_regions.items()},
        "generator": engine.generator.get_state(),
        "dsr_threshold": engine.dsr_threshold,
        "foresight_done": engine.foresight_done,
        "lottery_round": engine.lottery_round,
        "lottery_snapshot": engine.lottery_snapshot,
        "history": list(engine.history),
        "kernels": library.loaded_parameters(),  # None when no compiled kernel ran in this process
    }


def load_state_dict(engine: DynamicSparsity, state: Mapping[str, Any]) -> None:
    """Restores :meth:`state_dict`; refuses a checkpoint of another configuration or model."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"expected a DynamicSparsity state_dict of version {STATE_VERSION}, "
            f"got {type(state).__name__} with version {getattr(state, 'get', lambda _: None)('version')!r}"
        )
    saved = SparsityConfig.from_dict(state["config"])
    if saved != engine.config:
        diff = {
            k: (v, getattr(engine.config, k))
            for k, v in saved.to_dict().items()
            if engine.config.to_dict()[k] != v
        }
        raise ConfigMismatchError(
            f"checkpoint was made with another SparsityConfig; (saved, current) differ in {diff}"
        )
    if state["total_steps"] != engine.total_steps:
        raise ValueError(f"checkpoint has total_steps={state['total_steps']}, this run {engine.total_steps}")
    shapes = {fqn: t.mask.shape for fqn, t in engine.tensors.items()}
    check_budgets(engine, state, check_masks(state["masks"], shapes, "masks"))
    for fqn, t in engine.tensors.items():
        t.load_mask(state["masks"][fqn])
        if fqn in state["active_rows"]:
            t.active_rows = state["active_rows"][fqn].to(t.param.device).clone()
    device_of = {fqn: t.param.device for fqn, t in engine.tensors.items()}
    engine.ever_active = {fqn: m.to(device_of[fqn]).clone() for fqn, m in state["ever_active"].items()}
    if engine.config.dynamic:  # a checkpoint of a version that tracked it only for 'unfired': from now on
        for fqn, t in engine.tensors.items():
            if isinstance(t, SparseTensor):  # compact layers: only where a criterion reads it
                engine.ever_active.setdefault(fqn, t.mask.clone())
    engine.momentum = {
        fqn: m.to(device=device_of[fqn], dtype=engine.tensors[fqn].param.dtype).clone()
        for fqn, m in state["momentum"].items()
    }
    saved_traces = state.get("traces", {})  # checkpoints of earlier versions had none
    if set(saved_traces) != set(engine.traces):
        raise ValueError(
            f"the checkpoint holds the traces {sorted(saved_traces)}, this configuration reads {sorted(engine.traces)}"
        )
    engine.traces = {
        need: {fqn: m.to(device_of[fqn]).clone() for fqn, m in per.items()}
        for need, per in saved_traces.items()
    }
    engine.growth_regions = {fqn: m.to(device_of[fqn]).clone() for fqn, m in state["growth_regions"].items()}
    engine.rows.checked = int(state["step"]) > 0  # re-checked at the next update step
    saved_bases = state.get("momentum_base", {})
    for fqn in engine.rows.momentum_base:
        # Checkpoints written without row mode hold true averages: their base is their step.
        engine.rows.momentum_base[fqn] = int(saved_bases.get(fqn, state["step"]))
    engine.step = int(state["step"])
    engine.generator.set_state(state["generator"])
    engine.dsr_threshold = state["dsr_threshold"]
    engine.foresight_done = bool(state["foresight_done"])
    engine.lottery_round = int(state["lottery_round"])
    engine.lottery_snapshot = state["lottery_snapshot"]
    engine.history = list(state["history"])
    _warn_other_kernels(state.get("kernels"))


def _warn_other_kernels(saved: Any) -> None:
    """Compact layers resumed under other kernel parameters than they were checkpointed with compute the same
    values up to the last bits (the knobs set the summation order): the resume is then not bitwise identical."""
    current = library.loaded_parameters()
    if isinstance(saved, Mapping) and current is not None and dict(saved) != current:
        warnings.warn(
            f"the checkpoint was written with kernel parameters {dict(saved)}, this process runs {current}: "
            "compact layers' results differ in the last bits, so the resume is not bitwise identical to an "
            "uninterrupted run; sparseapps.core.kernels.library.configure_kernels(isa, gather_max_batch, "
            "tile_bytes) with the checkpoint's values (same CPU kind) makes it so",
            stacklevel=3,
        )


def check_budgets(engine: DynamicSparsity, state: Mapping[str, Any], nnz: Mapping[str, int]) -> None:
    """Refuses a checkpoint whose masks hold more entries than this configuration allows.

    Budgets are fixed when the engine is built (from the config's density and distribution, or the initial
    masks) and never change, so a saved budget must equal this engine's. Sparse-from-scratch methods keep
    the total nnz within the total budget (DSR/SNFS move entries between tensors, ablation may leave fewer);
    dense-to-sparse methods start dense and reach the budget only at the end of their schedule.
    """
    budgets = state.get("budgets")
    if not isinstance(budgets, Mapping) or set(budgets) != set(engine.tensors):
        raise ValueError(
            f"checkpoint budgets name {sorted(budgets or [])}, the sparse tensors {sorted(engine.tensors)}"
        )
    differ = {
        fqn: (int(budgets[fqn]), t.budget)
        for fqn, t in engine.tensors.items()
        if int(budgets[fqn]) != t.budget
    }
    if differ:
        raise ConfigMismatchError(
            f"checkpoint budgets (saved, this config's) differ in {differ}: it was made for another density "
            f"than {engine.config.density:g} or another model"
        )
    if engine.config.method in ("dst", "static"):
        total, budget = sum(nnz.values()), sum(t.budget for t in engine.tensors.values())
        if total > budget:
            over = {
                fqn: (n, engine.tensors[fqn].budget)
                for fqn, n in nnz.items()
                if n > engine.tensors[fqn].budget
            }
            raise ValueError(
                f"checkpoint masks hold {total} active entries, more than the budget of {budget} that density "
                f"{engine.config.density:g} allows (nnz, budget) per tensor over it: {over}; the file is damaged "
                "or was edited"
            )


def check_masks(
    masks: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], what: str
) -> dict[str, int]:
    if set(masks) != set(shapes):
        raise ValueError(f"{what} names {sorted(masks)}, but the sparse tensors are {sorted(shapes)}")
    budgets = {}
    for fqn, shape in shapes.items():
        mask = masks[fqn]
        if not isinstance(mask, torch.Tensor) or mask.shape != shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{what}[{fqn!r}] must have shape {tuple(shape)}, got {got}")
        budgets[fqn] = int(torch.count_nonzero(mask))
    return budgets
