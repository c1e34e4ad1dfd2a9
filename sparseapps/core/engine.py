"""`DynamicSparsity`: the one stateful object. It attaches sparse training to any torch model and optimizer.

The training loop does not change: hooks on the optimizer zero the gradients of inactive entries before each
``optimizer.step()``, re-apply the masks after it, and run topology updates (drop/grow, pruning) on schedule.
Layers made compact by ``to_compact`` (``storage="compact"``) need none of the per-step work; the updates treat
them like masked tensors and re-pack them (``sparseapps.core.compact.storage``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

import torch
from torch import nn

from sparseapps.core import (
    criteria,
    nm,
    pruning,
    redistribution,
    rules,
    schedules,
    scores,
    scoring,
    structured,
)
from sparseapps.core import state as state_module
from sparseapps.core.accounting import SparsityReport, TensorReport
from sparseapps.core.allocator import release_free_memory
from sparseapps.core.calibration import Calibration
from sparseapps.core.compact import storage as compact_storage
from sparseapps.core.compact import topology as compact_topology
from sparseapps.core.compact.storage import CompactTensor
from sparseapps.core.config import (
    CALIBRATED_METHODS,
    FORESIGHT_METHODS,
    LEARNED_METHODS,
    ONE_SHOT_METHODS,
    SparsityConfig,
)
from sparseapps.core.distributions import target_nnz
from sparseapps.core.embedding_rows import LookedUpRows
from sparseapps.core.finite import check_finite
from sparseapps.core.learned_masks import LearnedMasks
from sparseapps.core.masks import attach_mask, draw_mask
from sparseapps.core.selection import SparseTensor, select_tensors, tensor_shape
from sparseapps.core.state import EngineState, StateField

logger = logging.getLogger(__name__)
_MULTIPLIER_LIMIT = 1 << 24


class DynamicSparsity:
    """Sparse training attached to a model and its optimizer.

    Args:
        model: any ``nn.Module``; its Linear / Conv / Embedding(Bag) weights are selected by ``config``. With
            ``config.storage == "compact"`` its selected Linear layers must be compact (``to_compact``).
        optimizer: the optimizer that updates those weights (it must hold every one of them).
        config: a :class:`SparsityConfig`, e.g. ``SparsityConfig.preset("rigl", sparsity=0.9)``.
        total_steps: optimizer steps of the whole run (schedules are fractions of it).
        initial_masks: optional ``{fqn: bool tensor}`` to start from instead of random masks; each tensor's
            budget becomes its mask's nnz.
        check_finite: before each optimizer step, check every gradient it would apply for NaN/Inf and raise
            :class:`NonFiniteGradientError` naming the parameter (the step is not taken). One fused pass over
            the gradients; with ``embedding_rows="looked_up"``, only the looked-up rows of the large tables.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsity = DynamicSparsity(model, optimizer, SparsityConfig.preset("rigl", sparsity=0.9),
        ...                            total_steps=1000)
        >>> sorted(sparsity.masks)
        ['0.weight', '2.weight']
        >>> loss = model(torch.randn(8, 64)).sum(); loss.backward(); optimizer.step()  # masks kept
        >>> all(bool((p == 0)[~m].all()) for p, m in sparsity.masked_parameters())
        True
    """

    # The typed state (state.py), read and written as attributes: engine.step, engine.history, ...
    step = StateField()
    history = StateField()
    ever_active = StateField()
    momentum = StateField()
    traces = StateField()
    growth_regions = StateField()
    dsr_threshold = StateField()
    foresight_done = StateField()
    lottery_round = StateField()
    lottery_snapshot = StateField()

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        total_steps: int,
        *,
        initial_masks: Mapping[str, torch.Tensor] | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.model = model
        self.optimizer = optimizer
        self.check_finite = check_finite
        self.config = config
        self.total_steps = total_steps
        self.state = EngineState(foresight_done=config.method not in FORESIGHT_METHODS)
        self._multiplier_cache: list[torch.Tensor] | None = None
        # Called with the new masks before each commit; may rewrite them in place (distributed sync/checks).
        self.commit_hooks: list[Callable[[Mapping[str, torch.Tensor]], None]] = []

        selected = select_tensors(model, config)
        if not selected:
            raise ValueError(
                f"nothing to sparsify in {type(model).__name__}: no weight of module_types={config.module_types} "
                f"matches include={config.include} exclude={config.exclude}"
            )
        self._drop_criterion = scores.get("drop", config.drop)
        self._grow_criterion = scores.get("grow", config.grow) if config.grow != "none" else None
        self._needs = self._drop_criterion.needs | (
            self._grow_criterion.needs if self._grow_criterion is not None else frozenset()
        )
        if "activations" in self._needs:
            bad = [fqn for fqn, _, _, kind in selected if kind == "embedding"]
            if bad:
                raise ValueError(
                    f"grow={config.grow!r} reads layer activations, which needs Linear/Conv layers; embeddings "
                    f"selected: {bad}"
                )
        compact = compact_storage.compact_fqns(config, selected, self._needs)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [fqn for fqn, module, name, _ in selected if id(getattr(module, name)) not in owned]
        if missing:
            raise ValueError(f"the optimizer does not hold these parameters of the model: {missing}")

        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

        shapes = {fqn: tensor_shape(module, name) for fqn, module, name, _ in selected}
        if config.n_m is not None:  # names a tensor whose fan-in cannot hold N:M, or a non-N:M initial mask
            nm.check_tensors(shapes, config.n_m, initial_masks)
        if initial_masks is not None:
            budgets = state_module.check_masks(initial_masks, shapes, "initial_masks")
        else:
            budgets = target_nnz(shapes, config.density, config.distribution)
        empty = [fqn for fqn, n in budgets.items() if n == 0]
        if empty:
            raise ValueError(
                f"sparsity={config.sparsity} with distribution={config.distribution!r} leaves no weight in "
                f"{empty}; lower the sparsity, change the distribution or exclude those tensors"
            )

        kept_dense = [fqn for fqn, n in budgets.items() if n == math.prod(shapes[fqn])]
        if kept_dense and config.density < 1.0:
            logger.info("distribution %r keeps these tensors dense: %s", config.distribution, kept_dense)

        # topkast / cs / sr_ste learn their masks over dense weights (learned_masks.py): the first ones from them.
        self.learned: LearnedMasks | None = None
        learned_masks: dict[str, torch.Tensor] = {}
        if config.method in LEARNED_METHODS:
            if initial_masks is not None:
                raise ValueError(f"method {config.method!r} computes its own masks; got initial_masks")
            weights = {fqn: getattr(module, name) for fqn, module, name, _ in selected}
            self.learned = LearnedMasks(config, optimizer, weights, budgets, total_steps, self.generator)
            learned_masks = self.learned.initial_masks()
        starts_dense = config.method in ("gmp", "lottery", *ONE_SHOT_METHODS, *FORESIGHT_METHODS)
        self.tensors: dict[str, SparseTensor | CompactTensor] = {}
        for index, (fqn, module, name, kind) in enumerate(selected):
            if initial_masks is not None:
                mask = initial_masks[fqn].to(torch.bool)
            elif fqn in learned_masks:
                mask = learned_masks[fqn]
            elif starts_dense:
                mask = torch.ones(shapes[fqn], dtype=torch.bool)
            else:
                mask = draw_mask(shapes[fqn], budgets[fqn], config, self.generator)
            record: SparseTensor | CompactTensor
            if fqn in compact:  # the layer holds its topology; the draw above keeps the generator in step
                record = CompactTensor(fqn, module, kind, budgets[fqn])  # type: ignore[arg-type]
                if initial_masks is not None:
                    record.load_mask(mask)
            else:
                record = SparseTensor(fqn, module, name, kind, budgets[fqn], attach_mask(module, name, mask))
            if config.constant_fan_in:
                record.allow_ablation = index < len(selected) - 1  # the output layer is never ablated
                active = record.mask
                record.active_rows = active.reshape(active.shape[0], -1).any(1)
            self.tensors[fqn] = record
        # The per-step work (gradient masking, re-masking) is the masked tensors' only.
        self._masked = {fqn: t for fqn, t in self.tensors.items() if isinstance(t, SparseTensor)}
        self._compact = {fqn: t for fqn, t in self.tensors.items() if isinstance(t, CompactTensor)}
        for t in self._masked.values():
            t.clear_optimizer_state(optimizer)
        if config.rescale_initialization and not starts_dense:
            self._rescale_initialization()
        if self.learned is not None:
            self.learned.bind(self._masked)

        # Entries active at any time so far: the ITOP rate of every dynamic run (Liu et al. 2021; of compact
        # layers only where read, being dense), and what criteria that declare "ever_active" read.
        self.ever_active = {
            fqn: t.mask.clone()
            for fqn, t in self.tensors.items()
            if "ever_active" in self._needs or (config.dynamic and fqn in self._masked)
        }
        self.momentum = (
            {
                fqn: torch.zeros_like(t.param, memory_format=torch.preserve_format)
                for fqn, t in self.tensors.items()
            }
            if "momentum" in self._needs or config.redistribution == "momentum"
            else {}
        )
        self.traces = {
            need: {fqn: torch.zeros_like(t.param, dtype=torch.float32) for fqn, t in self.tensors.items()}
            for need in scores.TRACES
            if need in self._needs
        }
        # obs / sparsegpt: the statistics of the steps before the one-shot step, kept in the traces (checkpoints).
        self.calibration = (
            Calibration(config, self.tensors, total_steps) if config.method in CALIBRATED_METHODS else None
        )
        if self.calibration is not None:
            self.traces.update(self.calibration.initial_traces(self.tensors))
        if self._compact and config.dynamic:
            reason = compact_topology.dense_view_reason(self)
            logger.info(
                "compact topology updates run %s",
                "on the active entries" if reason is None else f"on dense views at update steps: {reason}",
            )
        if self.traces and config.embedding_rows == "looked_up":
            raise ValueError(
                f"drop={config.drop!r} / grow={config.grow!r} read {sorted(self.traces)}, a dense trace updated every "
                "step, which embedding_rows='looked_up' does not keep; use embedding_rows='all'"
            )
        if config.method == "lottery" and config.rewind_step == 0:
            self.lottery_snapshot = pruning.snapshot_weights(self.model)

        # embedding_rows="looked_up": per-step work on the rows the forward passes looked up (embedding_rows.py);
        # compact tables have no per-step work.
        self.rows = LookedUpRows(
            self._masked if config.embedding_rows == "looked_up" else {}, self.momentum, config.momentum
        )
        row_params = {id(self.tensors[fqn].param) for fqn in self.rows.fqns}
        names = {id(p): name for name, p in model.named_parameters()}
        # Every parameter the optimizer steps, by name, for the finite-gradient check of each step (row-mode
        # tables are checked on their looked-up rows instead of whole).
        self._checked_params: list[tuple[str, nn.Parameter]] = [
            (names.get(id(p), f"param_groups[{g}]['params'][{i}]"), p)
            for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"])
            if id(p) not in row_params
        ]

        self._dense_grads: dict[str, torch.Tensor] = {}
        self._activations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prepare_next_step()
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for record in self.tensors.values():
            self._handles.append(record.module.register_forward_hook(self._forward_hook(record)))
            if record.fqn in self.rows.fqns:
                self._handles.append(
                    record.module.register_forward_pre_hook(self.rows.lookup_hook(record), with_kwargs=True)
                )
        if self._compact:  # the checks' dense views of compact tensors are freed: hand their pages back
            release_free_memory()

    # ------------------------------------------------------------------ public views
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{fqn: bool mask}``; the tensors are the model's own buffers (updated in place)."""
        return {fqn: t.mask for fqn, t in self.tensors.items()}

    def masked_parameters(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, mask)`` pairs of the masked-dense tensors (compact layers have no mask to apply)."""
        for t in self._masked.values():
            yield t.param, t.mask

    @property
    def density(self) -> float:
        """Current global density over the sparse tensors."""
        return sum(int(torch.count_nonzero(t.mask)) for t in self.tensors.values()) / sum(
            t.numel for t in self.tensors.values()
        )

    def report(self) -> SparsityReport:
        """Per tensor: shape, nnz, density, forward FLOPs per sample dense vs sparse, and (dynamic runs) the ITOP
        rate, the fraction of entries ever active."""
        rows = [
            TensorReport.of(
                fqn,
                t.kind,
                tuple(t.mask.shape),
                int(torch.count_nonzero(t.mask)),
                t.positions,
                ever_active=int(torch.count_nonzero(self.ever_active[fqn]))
                if fqn in self.ever_active
                else None,
            )
            for fqn, t in self.tensors.items()
        ]
        return SparsityReport(rows)

    def apply_masks(self) -> None:
        """Zeroes every masked weight (the engine does this after each step; call it after editing weights).

        Compact layers hold no inactive weight: nothing to do for them.
        """
        self._apply_masks_except(frozenset())

    def _apply_masks_except(self, skipped: Set[str]) -> None:
        """:meth:`apply_masks` on every sparse tensor but ``skipped`` (row-mode tables that kept their zeros)."""
        pairs = [
            (t.param, multiplier)
            for (fqn, t), multiplier in zip(self._masked.items(), self._multipliers(), strict=True)
            if fqn not in skipped
        ]
        if pairs:
            with torch.no_grad():
                torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])

    def _multipliers(self) -> list[torch.Tensor]:
        """Masks in each parameter's dtype: multiplying by them is several times faster than by bool masks.

        Cached between topology updates; tables above ``_MULTIPLIER_LIMIT`` entries use the bool mask to
        spare the memory.
        """
        if self._multiplier_cache is None:
            self._multiplier_cache = [
                t.mask.to(t.param.dtype) if t.numel <= _MULTIPLIER_LIMIT else t.mask
                for t in self._masked.values()
            ]
        return self._multiplier_cache

    def set_growth_region(self, regions: Mapping[str, torch.Tensor]) -> None:
        """Restricts growth of each named tensor to the ``True`` entries of its region (e.g. free capacity)."""
        for fqn, region in regions.items():
            if fqn not in self.tensors:
                raise ValueError(f"unknown tensor {fqn!r}; expected one of {sorted(self.tensors)}")
            if region.shape != self.tensors[fqn].mask.shape:
                raise ValueError(
                    f"growth region for {fqn!r} must have shape {tuple(self.tensors[fqn].mask.shape)}, "
                    f"got {tuple(region.shape)}"
                )
            self.growth_regions[fqn] = region.to(device=self.tensors[fqn].mask.device, dtype=torch.bool)

    def finalize(self) -> None:
        """Ends training's mask learning: methods topkast / cs / sr_ste fix their masks (CS mid-search takes its
        ticket) and every weight becomes ``theta * mask``, later steps keep them; other methods re-apply the masks.
        Call it before ``condense`` or an export."""
        if self.learned is not None:
            self.learned.finalize()
        self.apply_masks()

    def remove(self) -> None:
        """Detaches the hooks; masks stay in the model as buffers and weights keep their zeros."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rescale_initialization(self) -> None:
        """Multiplies each row's surviving weights by ``sqrt(fan_in / row nnz)`` (Linear/Conv)."""
        with torch.no_grad():
            for t in self.tensors.values():
                if t.kind == "embedding":
                    continue
                mask = t.mask
                rows = mask.reshape(mask.shape[0], -1)
                t.scale_rows_((rows.shape[1] / rows.sum(1).clamp(min=1).float()).sqrt())

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, record: SparseTensor) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if record.positions == 1 and isinstance(output, torch.Tensor) and output.dim() > 2:
                channels = output.shape[-1] if record.kind == "linear" else output.shape[1]
                record.positions = max(1, output[0].numel() // channels) if record.kind != "embedding" else 1
            if self._capturing and isinstance(inputs[0], torch.Tensor):
                self._activations[record.fqn] = (inputs[0].detach(), output.detach())
            if self.calibration is not None and self.calibration.armed:
                self.calibration.record_inputs(self.traces, record, inputs[0])

        return hook

    def needs_dense_gradient(self) -> bool:
        """Whether the configured criteria read the dense gradient (captured at update steps only)."""
        return "grad" in self._needs

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.foresight_done:
            raise RuntimeError(
                f"method {self.config.method!r} prunes at initialization: call "
                "prune_at_initialization(inputs, targets, loss_fn) before the first optimizer step"
            )
        upcoming = self.step + 1
        if self.check_finite:
            check_finite([(n, p.grad) for n, p in self._checked_params if p.grad is not None], upcoming)
        if self.learned is not None:  # the gradients go straight through to the dense weights
            self.learned.before_step(self.step)
            return
        update = schedules.is_update_step(upcoming, self.config, self.total_steps)
        # Pruning steps (GMP, one-shot) score with the dense gradient too when their criterion reads it.
        pruning_step = schedules.is_pruning_step(upcoming, self.config, self.total_steps)
        capture = (update or pruning_step) and self.needs_dense_gradient()
        # The first step is a full one too: a table that is also read outside its module's forward is refused
        # there, before any masked entry could change.
        full_step = (
            update
            or schedules.is_pruning_step(upcoming, self.config, self.total_steps)
            or not self.rows.checked
        )
        self.rows.checked = True
        self.rows.stepped.clear()
        self.rows.checking = full_step
        if capture and self._compact:
            if update and compact_topology.applies(self):  # the growth scan reads the layers' captures itself
                compact_topology.check_captured(self, upcoming)
            else:
                self._dense_grads.update(compact_storage.take_dense_grads(self._compact.values(), upcoming))
        dense_grads, dense_masks = [], []
        for (fqn, t), multiplier in zip(self._masked.items(), self._multipliers(), strict=True):
            if fqn in self.rows.fqns and self.rows.before_step(
                t, self.momentum, upcoming, full_step, multiplier, self.check_finite
            ):
                continue
            grad = t.param.grad
            if grad is None:
                continue
            if self.calibration is not None:
                self.calibration.record_gradient(self.traces, fqn, upcoming, grad)
            if capture or self.momentum or self.traces:
                full = grad.to_dense() if grad.is_sparse else grad
                if capture:
                    if not bool(torch.isfinite(full).all()):
                        raise ValueError(f"non-finite gradient in {fqn!r} at update step {upcoming}")
                    self._dense_grads[fqn] = full.detach().clone()
                if self.momentum:
                    self.momentum[fqn].mul_(self.config.momentum).add_(full, alpha=1.0 - self.config.momentum)
                if self.traces:
                    self._update_traces(fqn, t.param.detach(), full)
            if grad.is_sparse:
                grad = grad.coalesce()
                rows = grad.indices()[0]
                values = grad.values() * t.mask[rows].reshape(-1, *grad.values().shape[1:])
                t.param.grad = torch.sparse_coo_tensor(
                    grad.indices(), values, grad.shape, is_coalesced=True, check_invariants=False
                )
            else:
                dense_grads.append(grad)
                dense_masks.append(multiplier if multiplier.dtype == grad.dtype else t.mask)
        if dense_grads:
            torch._foreach_mul_(dense_grads, dense_masks)

    def _update_traces(self, fqn: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """The per-step traces: movement ``S -= g * w`` (the weights before this step; the dense gradient is the
        straight-through one) and the average of ``g * g`` (decay ``config.momentum``)."""
        if "movement" in self.traces:
            criteria.accumulate_movement_(self.traces["movement"][fqn], weight, grad)
        if "last_magnitude" in self.traces:
            criteria.record_last_magnitude_(
                self.traces["last_magnitude"][fqn], weight, self.tensors[fqn].mask
            )
        if "magnitude_average" in self.traces:
            criteria.accumulate_magnitude_(
                self.traces["magnitude_average"][fqn], weight, self.config.momentum
            )
        if "grad_squared" in self.traces:
            criteria.accumulate_squared_gradient_(
                self.traces["grad_squared"][fqn], grad.float(), self.config.momentum
            )

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.learned is not None:  # the masks are recomputed from the dense weights
            self.learned.after_step(self.step)
            self._multiplier_cache = None
            return
        if self.rows.stepped:
            self._apply_masks_except(self.rows.stepped)
        else:
            if self.rows.checking:
                for fqn in self.rows.fqns:
                    self.rows.check_masked_zero(self.tensors[fqn], self.optimizer)
            self.apply_masks()
        config = self.config
        if schedules.is_update_step(self.step, config, self.total_steps):
            with compact_storage.caching_views(self._compact.values()):
                self._update_topology()
        elif schedules.is_pruning_step(self.step, config, self.total_steps):
            pruning.prune_by_schedule(self)
        if config.method == "lottery" and self.lottery_round == 0 and self.step == config.rewind_step:
            self.lottery_snapshot = pruning.snapshot_weights(self.model)
        self._prepare_next_step()

    def _prepare_next_step(self) -> None:
        """Arms, for the step before an update, the capture of what its criteria read beyond weights and masks."""
        update = schedules.is_update_step(self.step + 1, self.config, self.total_steps)
        self._capturing = "activations" in self._needs and update
        if self.calibration is not None:
            self.calibration.arm(self.step + 1)
        compact_storage.set_capture(self._compact.values(), self.needs_dense_gradient() and update)

    # ------------------------------------------------------------------ topology updates
    def _context(self, fqn: str, t: SparseTensor | CompactTensor) -> scores.ScoreContext:
        needs = self._needs
        return scores.ScoreContext(
            fqn=fqn,
            weight=t.dense_weight(),
            mask=t.mask,
            step=self.step,
            generator=self.generator,
            grad=self._gradient_of(fqn) if "grad" in needs else None,
            momentum=self.momentum.get(fqn),
            ever_active=self.ever_active.get(fqn),
            activations=self._activations.get(fqn),
            movement=self.traces.get("movement", {}).get(fqn),
            grad_squared=self.traces.get("grad_squared", {}).get(fqn),
            magnitude_average=self.traces.get("magnitude_average", {}).get(fqn),
            last_magnitude=self.traces.get("last_magnitude", {}).get(fqn),
        )

    def drop_scores(self) -> dict[str, torch.Tensor]:
        """The configured drop criterion's scores of every sparse tensor (random draws in tensor order)."""
        return {fqn: self._drop_scores(fqn, t) for fqn, t in self.tensors.items()}

    def grow_scores(self) -> dict[str, torch.Tensor]:
        """The configured grow criterion's scores of every sparse tensor (random draws in tensor order)."""
        return {fqn: self._grow_scores(fqn, t) for fqn, t in self.tensors.items()}

    def _grow_scores(self, fqn: str, t: SparseTensor | CompactTensor) -> torch.Tensor:
        if self._grow_criterion is None:
            raise ValueError(f"grow criterion {self.config.grow!r} cannot score")
        return scores.compute(self._grow_criterion, self._context(fqn, t), self.config.tie_noise)

    def _drop_scores(self, fqn: str, t: SparseTensor | CompactTensor) -> torch.Tensor:
        return scores.compute(self._drop_criterion, self._context(fqn, t), self.config.tie_noise)

    def _gradient_of(self, fqn: str) -> torch.Tensor:
        if fqn not in self._dense_grads:
            mask = self.tensors[fqn].mask  # no gradient this step (unused branch): every score ties at zero
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return self._dense_grads[fqn]

    def _grow_candidates(self, fqn: str, mask: torch.Tensor) -> torch.Tensor:
        region = self.growth_regions.get(fqn)
        return ~mask if region is None else ~mask & region

    def _explore(self) -> tuple[dict[str, torch.Tensor] | None, float]:
        """CTRE's exploration: uniform scores for a share ``random_grow_fraction`` of the grown entries."""
        fraction = self.config.random_grow_fraction if self.config.grow != "random" else 0.0
        if fraction <= 0:
            return None, 0.0
        return {
            fqn: scoring.uniform_like(t.mask, self.generator) for fqn, t in self.tensors.items()
        }, fraction

    def _update_topology(self) -> None:
        config = self.config
        fraction = schedules.drop_fraction(self.step, config, self.total_steps)
        if self._compact and compact_topology.applies(self):
            record = compact_topology.update(self, fraction)
            self._dense_grads.clear()
            self._activations.clear()
            self.history.append(record.to_dict())
            return
        new_masks: dict[str, torch.Tensor] = {}
        if config.n_m is not None:
            new_masks = self._nm_update(fraction)
        elif config.constant_fan_in:
            for fqn, t in self.tensors.items():
                assert t.active_rows is not None
                n_drop = math.ceil(fraction * int(torch.count_nonzero(t.mask)))
                new_mask, t.active_rows = structured.constant_fan_in_update(
                    t.mask,
                    self._drop_scores(fqn, t),
                    self._grow_scores(fqn, t),
                    n_drop,
                    t.budget,
                    t.active_rows,
                    config.ablation_threshold if t.allow_ablation else 0.0,
                    self.generator,
                )
                new_masks[fqn] = new_mask
        elif config.redistribution == "dsr":
            new_masks = self._dsr_update(fraction)
        else:
            masks = self.masks
            n_drop = rules.drop_counts(masks, fraction)
            drop_scores, grow_scores = self.drop_scores(), self.grow_scores()
            explore_scores, explore_fraction = self._explore()
            new_masks, _ = rules.update_masks(
                masks,
                drop_scores,
                grow_scores,
                n_drop,
                n_grow=(
                    (lambda after: self._momentum_shares(after, sum(n_drop.values())))
                    if config.redistribution == "momentum"
                    else None
                ),
                candidates=self.growth_regions,
                explore_scores=explore_scores,
                explore_fraction=explore_fraction,
            )
        self.commit(new_masks, fraction)

    def _nm_update(self, fraction: float) -> dict[str, torch.Tensor]:
        """N:M (``config.n_m``): drop tensor-wide, each group regrows what it lost (``nm.nm_update``)."""
        if self.growth_regions:
            raise ValueError(
                f"n_m={self.config.n_m} regrows inside each group, which growth regions (continual isolation) may "
                f"not allow; regions set for {sorted(self.growth_regions)}"
            )
        n, m = self.config.n_m  # type: ignore[misc]
        masks = self.masks
        n_drop = rules.drop_counts(masks, fraction)
        drop_scores, grow_scores = self.drop_scores(), self.grow_scores()
        update = nm.nm_swap_update if self.config.n_m_rule == "swap" else nm.nm_update
        return {
            fqn: update(mask, drop_scores[fqn], grow_scores[fqn], n_drop[fqn], n, m)
            for fqn, mask in masks.items()
        }

    def _capacity(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return {
            fqn: int(torch.count_nonzero(self._grow_candidates(fqn, mask))) for fqn, mask in masks.items()
        }

    def _momentum_shares(self, after_drop: Mapping[str, torch.Tensor], total: int) -> dict[str, int]:
        """SNFS: regrowth split across tensors by the mean momentum magnitude of their active weights."""
        weights = {
            fqn: float(self.momentum[fqn].abs()[mask].mean()) if bool(mask.any()) else 0.0
            for fqn, mask in after_drop.items()
        }
        return redistribution.momentum_shares(total, weights, self._capacity(after_drop))

    def _dsr_update(self, fraction: float) -> dict[str, torch.Tensor]:
        """DSR: prune below one global magnitude threshold (adapted toward the target count), regrow at random
        in proportion to each tensor's surviving nnz."""
        masks = self.masks
        total_nnz = sum(int(torch.count_nonzero(m)) for m in masks.values())
        target = math.ceil(fraction * total_nnz)
        magnitudes = {fqn: t.dense_weight().abs() for fqn, t in self.tensors.items()}
        if self.dsr_threshold is None:
            self.dsr_threshold = redistribution.dsr_initial_threshold(masks, magnitudes, target)
        after_drop = redistribution.dsr_drop(masks, magnitudes, self.dsr_threshold)
        n_pruned = total_nnz - sum(int(torch.count_nonzero(m)) for m in after_drop.values())
        self.dsr_threshold = redistribution.dsr_next_threshold(self.dsr_threshold, n_pruned, target)
        survivors = {fqn: int(torch.count_nonzero(m)) for fqn, m in after_drop.items()}
        shares = redistribution.proportional_shares(n_pruned, survivors, self._capacity(after_drop))
        uniform = {fqn: scoring.uniform_like(mask, self.generator) for fqn, mask in after_drop.items()}
        explore_scores, explore_fraction = self._explore()
        new_masks, _ = rules.update_masks(
            after_drop,
            uniform,
            uniform,
            {fqn: 0 for fqn in after_drop},
            n_grow=shares,
            candidates=self.growth_regions,
            explore_scores=explore_scores,
            explore_fraction=explore_fraction,
        )
        return new_masks

    def commit(self, new_masks: Mapping[str, torch.Tensor], fraction: float) -> None:
        """Writes new masks: zeroes dropped weights, initializes grown ones, fixes optimizer state."""
        for hook in self.commit_hooks:
            hook(new_masks)
        record = rules.UpdateRecord.between(self.masks, new_masks, step=self.step, drop_fraction=fraction)
        with torch.no_grad():
            for fqn, new_mask in new_masks.items():
                t = self.tensors[fqn]
                grown = t.write_mask(new_mask, self.optimizer)  # and the optimizer state of the entries
                self._multiplier_cache = None
                if self.config.grow_optimizer_state == "momentum" and self.momentum:
                    t.seed_first_moment(self.optimizer, self.momentum[fqn], grown)  # masked only (config)
                if self.config.grow_init_range > 0 and bool(grown.any()):
                    r = self.config.grow_init_range
                    noise = (scoring.uniform_like(grown, self.generator) * 2 - 1) * r
                    t.add_dense_(noise.to(t.param.dtype) * grown)
                if fqn in self.ever_active:
                    self.ever_active[fqn] |= new_mask
        self._dense_grads.clear()
        self._activations.clear()
        self.history.append(record.to_dict())

    # ------------------------------------------------------------------ dense-to-sparse pruning (pruning.py)
    def next_lottery_round(self) -> float:
        """Lottery ticket: prune by magnitude toward the target, rewind the survivors, reset the optimizer.

        Round ``r`` (1-based) leaves each tensor at ``final_density ** (r / lottery_rounds)`` of its entries.
        Call it after each training round; train once more after the last call.

        Returns:
            the global density after pruning.
        """
        return pruning.next_lottery_round(self)

    def prune_at_initialization(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """SNIP / GraSP / SynFlow: scores every weight before training and keeps the global top ``budget``.

        Args:
            inputs: a batch of model inputs ``[B, ...]`` (SynFlow uses only its shape).
            targets: labels for the loss (SNIP, GraSP).
            loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` (SNIP, GraSP).
        """
        pruning.prune_at_initialization(self, inputs, targets, loss_fn)

    # ------------------------------------------------------------------ checkpoints (state.py)
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit: masks, schedule position, RNG and method state."""
        state = state_module.state_dict(self)
        if self.learned is not None:  # the dense weights and gate scores (the model holds theta * mask)
            state["learned"] = self.learned.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; refuses a checkpoint of another configuration or model, or one whose masks
        hold more entries than the budget."""
        state_module.load_state_dict(self, state)
        if self.learned is not None:
            if "learned" not in state:
                raise ValueError(
                    f"method {self.config.method!r} resumes from its dense weights; the checkpoint has none"
                )
            self.learned.load_state_dict(state["learned"], self.step)
        self._multiplier_cache = None
        self._prepare_next_step()
        self.apply_masks()
