"""`DynamicSparsity`: the one stateful object. It attaches sparse training to any torch model and optimizer.

The training loop does not change: hooks on the optimizer zero the gradients of inactive entries before each
``optimizer.step()``, re-apply the masks after it, and run topology updates (drop/grow, pruning) on schedule.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseapps.core import rules, schedules, scores, scoring, structured
from sparseapps.core.accounting import SparsityReport, TensorReport
from sparseapps.core.config import FORESIGHT_METHODS, ConfigMismatchError, SparsityConfig
from sparseapps.core.distributions import target_nnz
from sparseapps.core.masks import attach_mask

STATE_VERSION = 1
logger = logging.getLogger(__name__)
_FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg")
_MULTIPLIER_LIMIT = 1 << 24


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds NaN or Inf at an optimizer step; the step was not taken (a ``ValueError`` too)."""


# embedding_rows="looked_up" works on rows when at most 1/_ROW_MODE_SHARE of a table's rows were looked up, and
# only for tables of _ROW_MODE_MIN_ROWS rows or more (below that a whole-table pass costs microseconds, less than
# recording the lookups).
_ROW_MODE_SHARE = 4
_ROW_MODE_MIN_ROWS = 1 << 14


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"embedding"`` or ``None`` for modules whose weight is never sparsified."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    return None


@dataclass
class SparseTensor:
    """One sparsified parameter and its bookkeeping (internal to the engine)."""

    fqn: str
    module: nn.Module
    param_name: str
    kind: str
    budget: int
    mask: torch.Tensor
    allow_ablation: bool = True
    active_rows: torch.Tensor | None = None
    positions: int = 1

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def numel(self) -> int:
        return self.mask.numel()


def select_tensors(model: nn.Module, config: SparsityConfig) -> list[tuple[str, nn.Module, str, str]]:
    """The ``(fqn, module, param_name, kind)`` of every weight ``config`` sparsifies, in registration order."""
    chosen: list[tuple[str, nn.Module, str, str]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        kind = module_kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or kind not in config.module_types or not isinstance(weight, nn.Parameter):
            continue
        fqn = f"{name}.weight" if name else "weight"
        if config.include and not any(fnmatch.fnmatchcase(fqn, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(fqn, p) for p in config.exclude):
            continue
        if id(weight) in seen:  # tied weights are sparsified once, under their first name
            continue
        seen.add(id(weight))
        chosen.append((fqn, module, "weight", kind))
    if config.dense_first_layer and chosen:
        chosen = chosen[1:]
    if config.dense_last_layer and chosen:
        chosen = chosen[:-1]
    return chosen


class DynamicSparsity:
    """Sparse training attached to a model and its optimizer.

    Args:
        model: any ``nn.Module``; its Linear / Conv / Embedding(Bag) weights are selected by ``config``.
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
        self.step = 0
        self.history: list[dict[str, Any]] = []
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
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [fqn for fqn, module, name, _ in selected if id(getattr(module, name)) not in owned]
        if missing:
            raise ValueError(f"the optimizer does not hold these parameters of the model: {missing}")

        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

        shapes = {fqn: getattr(module, name).shape for fqn, module, name, _ in selected}
        if initial_masks is not None:
            budgets = self._check_masks(initial_masks, shapes, "initial_masks")
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

        starts_dense = config.method in ("gmp", "one_shot", "lottery", *FORESIGHT_METHODS)
        self.tensors: dict[str, SparseTensor] = {}
        for index, (fqn, module, name, kind) in enumerate(selected):
            param = getattr(module, name)
            if initial_masks is not None:
                mask = initial_masks[fqn].to(torch.bool)
            elif starts_dense:
                mask = torch.ones(param.shape, dtype=torch.bool)
            elif config.constant_fan_in:
                mask = structured.constant_fan_in_mask(param.shape, budgets[fqn], self.generator)
            else:
                initial = torch.rand(param.shape, generator=self.generator)
                mask = rules.select_top(initial, torch.ones(param.shape, dtype=torch.bool), budgets[fqn])
            buffer = attach_mask(module, name, mask)
            record = SparseTensor(fqn, module, name, kind, budgets[fqn], buffer)
            if config.constant_fan_in:
                record.allow_ablation = index < len(selected) - 1  # the output layer is never ablated
                record.active_rows = buffer.reshape(buffer.shape[0], -1).any(1)
            self.tensors[fqn] = record
        self._clear_optimizer_state({fqn: t.mask for fqn, t in self.tensors.items()})
        if config.rescale_initialization and not starts_dense:
            self._rescale_initialization()

        # Entries active at any time so far: the ITOP rate of every dynamic run (Liu et al. 2021), and what
        # criteria that declare "ever_active" read.
        self.ever_active = (
            {fqn: t.mask.clone() for fqn, t in self.tensors.items()}
            if config.dynamic or "ever_active" in self._needs
            else {}
        )
        self.momentum = (
            {
                fqn: torch.zeros_like(t.param, memory_format=torch.preserve_format)
                for fqn, t in self.tensors.items()
            }
            if "momentum" in self._needs or config.redistribution == "momentum"
            else {}
        )
        self.growth_regions: dict[str, torch.Tensor] = {}
        self.dsr_threshold: float | None = None
        self.foresight_done = config.method not in FORESIGHT_METHODS
        self.lottery_round = 0
        self.lottery_snapshot: dict[str, torch.Tensor] | None = None
        if config.method == "lottery" and config.rewind_step == 0:
            self.lottery_snapshot = self._snapshot_weights()

        # embedding_rows="looked_up": per-step work on the rows the forward passes looked up, not whole tables.
        self._row_tensors: tuple[str, ...] = (
            tuple(
                fqn
                for fqn, t in self.tensors.items()
                if t.kind == "embedding" and t.mask.shape[0] >= _ROW_MODE_MIN_ROWS
            )
            if config.embedding_rows == "looked_up"
            else ()
        )
        row_params = {id(self.tensors[fqn].param) for fqn in self._row_tensors}
        names = {id(p): name for name, p in model.named_parameters()}
        # Every parameter the optimizer steps, by name, for the finite-gradient check of each step (row-mode
        # tables are checked on their looked-up rows in _row_step instead of whole).
        self._checked_params: list[tuple[str, nn.Parameter]] = [
            (names.get(id(p), f"param_groups[{g}]['params'][{i}]"), p)
            for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"])
            if id(p) not in row_params
        ]
        self._looked_up: dict[str, torch.Tensor] = {}  # per row-mode table: bool flags of the rows looked up
        self._row_stepped: set[str] = set()  # row-mode tables that need no re-masking after this step
        self._checking_rows = False
        self._rows_checked = False
        # Row-mode momenta are kept scaled between full steps: the true average is
        # momentum * beta ** (step - base), so a step only adds to the looked-up rows.
        self.momentum_base: dict[str, int] = {fqn: 0 for fqn in self._row_tensors if fqn in self.momentum}

        self._dense_grads: dict[str, torch.Tensor] = {}
        self._activations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._capturing = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for record in self.tensors.values():
            self._handles.append(record.module.register_forward_hook(self._forward_hook(record)))
            if record.fqn in self._row_tensors:
                self._handles.append(
                    record.module.register_forward_pre_hook(self._lookup_hook(record), with_kwargs=True)
                )

    # ------------------------------------------------------------------ public views
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{fqn: bool mask}``; the tensors are the model's own buffers (updated in place)."""
        return {fqn: t.mask for fqn, t in self.tensors.items()}

    def masked_parameters(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, mask)`` pairs."""
        for t in self.tensors.values():
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
        """Zeroes every masked weight (the engine does this after each step; call it after editing weights)."""
        self._apply_masks_except(frozenset())

    def _apply_masks_except(self, skipped: Set[str]) -> None:
        """:meth:`apply_masks` on every sparse tensor but ``skipped`` (row-mode tables that kept their zeros)."""
        pairs = [
            (t.param, multiplier)
            for (fqn, t), multiplier in zip(self.tensors.items(), self._multipliers(), strict=True)
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
                for t in self.tensors.values()
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
                rows = t.mask.reshape(t.mask.shape[0], -1)
                scale = (rows.shape[1] / rows.sum(1).clamp(min=1).float()).sqrt()
                t.param.mul_(scale.reshape(-1, *([1] * (t.param.dim() - 1))).to(t.param.dtype))

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, record: SparseTensor) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if record.positions == 1 and isinstance(output, torch.Tensor) and output.dim() > 2:
                channels = output.shape[-1] if record.kind == "linear" else output.shape[1]
                record.positions = max(1, output[0].numel() // channels) if record.kind != "embedding" else 1
            if self._capturing and isinstance(inputs[0], torch.Tensor):
                self._activations[record.fqn] = (inputs[0].detach(), output.detach())

        return hook

    def _lookup_hook(self, record: SparseTensor) -> Callable[..., None]:
        """Flags the rows an embedding forward looks up (``input`` of nn.Embedding / nn.EmbeddingBag)."""
        fqn = record.fqn

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not torch.is_grad_enabled():
                return
            index = args[0] if args else kwargs.get("input")
            if not isinstance(index, torch.Tensor):
                raise TypeError(
                    f"embedding_rows='looked_up' could not find the indices of {fqn!r}'s forward call"
                )
            flags = self._looked_up.get(fqn)
            if flags is None:
                flags = torch.zeros(record.mask.shape[0], dtype=torch.bool, device=record.mask.device)
                self._looked_up[fqn] = flags
            flags[index.detach().reshape(-1).to(device=flags.device, dtype=torch.long)] = True

        return hook

    def _take_rows(self, fqn: str) -> torch.Tensor | None:
        """The distinct rows looked up since the last step, ascending (``None`` when nothing was looked up)."""
        flags = self._looked_up.pop(fqn, None)
        return None if flags is None else flags.nonzero().squeeze(1)

    def _catch_up_momentum(self, fqn: str, upto: int) -> None:
        """Turns a row-mode table's scaled momentum into the true average as of step ``upto``."""
        if fqn not in self.momentum_base or upto == self.momentum_base[fqn]:
            return
        self.momentum[fqn].mul_(self.config.momentum ** (upto - self.momentum_base[fqn]))
        self.momentum_base[fqn] = upto

    def _row_step(
        self,
        fqn: str,
        t: SparseTensor,
        grad: torch.Tensor,
        rows: torch.Tensor,
        step: int,
        multiplier: torch.Tensor,
    ) -> None:
        """Momentum average and gradient masking of one step, on the looked-up ``rows`` only.

        Masked weights stay zero without re-masking: their gradient is masked here (or was zero: the row was not
        looked up) and their optimizer state is zero (cleared at every commit), so an elementwise optimizer
        (SGD, Adam, AdamW, RMSprop, Adagrad, ...) leaves them at zero; every full step checks that it did.
        """
        rows_grad = grad.index_select(0, rows)
        if self.check_finite:
            self._raise_if_non_finite(fqn, rows_grad, step)
        if fqn in self.momentum_base:
            beta = self.config.momentum
            if beta == 0.0:  # the average is the last gradient
                self.momentum[fqn].zero_().index_copy_(0, rows, rows_grad)
                self.momentum_base[fqn] = step
            else:
                decay = beta ** (step - self.momentum_base[fqn])
                if decay < 1e-20:  # keep the scaled values in range
                    self._catch_up_momentum(fqn, step - 1)
                    decay = beta
                scale = (1.0 - beta) / decay
                momentum = self.momentum[fqn]  # rows are distinct: select, add, copy beats index_add_ here
                momentum.index_copy_(0, rows, momentum.index_select(0, rows).add_(rows_grad, alpha=scale))
        keep = multiplier if multiplier.dtype == grad.dtype else t.mask  # float x float multiplies faster
        grad.index_copy_(0, rows, rows_grad.mul_(keep.index_select(0, rows)))

    def _check_masked_zero(self, fqn: str, t: SparseTensor) -> None:
        """At full steps of a row-mode table: the optimizer left every masked weight at zero."""
        outside = (t.param.detach() != 0).logical_and_(~t.mask)
        if bool(outside.any()):
            leaked = int(torch.count_nonzero(outside))
            raise RuntimeError(
                f"{type(self.optimizer).__name__} changed {leaked} masked entries of {fqn!r} that had zero gradient "
                "and zero state; embedding_rows='looked_up' needs an elementwise optimizer (SGD, Adam, AdamW, "
                "RMSprop, Adagrad, ...): use embedding_rows='all' with this one"
            )

    def _check_looked_up(self, fqn: str, grad: torch.Tensor, rows: torch.Tensor | None) -> None:
        """At full steps: with ``embedding_rows='looked_up'``, no row outside the lookups may have a gradient."""
        outside = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
        if rows is not None:
            outside[rows] = False
        bad = int(torch.count_nonzero(outside & (grad.reshape(grad.shape[0], -1) != 0).any(1)))
        if bad:
            raise ValueError(
                f"embedding_rows='looked_up' but {fqn!r} has gradient in {bad} rows its module's "
                "forward never looked up (the table is read directly, e.g. by a graph propagation); use "
                "embedding_rows='all' for it"
            )

    def _check_finite_gradients(self, step: int) -> None:
        """Raises :class:`NonFiniteGradientError` naming the first parameter whose gradient holds NaN or Inf.

        A float32 sum per gradient is non-finite whenever the gradient is (NaN and Inf propagate; an overflow of
        finite values only triggers the exact check below, which then finds nothing): measured at 0.6% of an MLP
        step (784-1024-1024-10, batch 256), against 19% for a max-abs ``_foreach_norm``. One synchronization per
        step; the exact per-entry check runs only when something is wrong.
        """
        named = [(name, p.grad) for name, p in self._checked_params if p.grad is not None]
        grads = [g.coalesce().values() if g.is_sparse else g for _, g in named]
        if not grads:
            return
        sums = torch.stack(
            [(torch.view_as_real(g) if g.is_complex() else g).sum(dtype=torch.float32) for g in grads]
        )
        if bool(torch.isfinite(sums).all()):
            return
        for (name, _), grad in zip(named, grads, strict=True):
            self._raise_if_non_finite(name, grad, step)

    def _raise_if_non_finite(self, name: str, grad: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(grad)
        if bool(finite.all()):
            return
        n_nan = int(torch.isnan(grad).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise NonFiniteGradientError(
            f"the gradient of {name!r} holds {n_nan} NaN and {n_inf} Inf entries at step {step}; the optimizer "
            "step was not taken, so the weights are still finite. Check the loss and the inputs for NaN/Inf, "
            "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_); "
            "DynamicSparsity(..., check_finite=False) turns this check off"
        )

    def _needs_dense_gradient(self) -> bool:
        return "grad" in self._needs

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.foresight_done:
            raise RuntimeError(
                f"method {self.config.method!r} prunes at initialization: call "
                "prune_at_initialization(inputs, targets, loss_fn) before the first optimizer step"
            )
        upcoming = self.step + 1
        if self.check_finite:
            self._check_finite_gradients(upcoming)
        update = schedules.is_update_step(upcoming, self.config, self.total_steps)
        capture = update and self._needs_dense_gradient()
        # The first step is a full one too: a table that is also read outside its module's forward is refused
        # there, before any masked entry could change.
        full_step = (
            update
            or schedules.is_pruning_step(upcoming, self.config, self.total_steps)
            or not self._rows_checked
        )
        self._rows_checked = True
        self._row_stepped.clear()
        self._checking_rows = full_step
        dense_grads, dense_masks = [], []
        for (fqn, t), multiplier in zip(self.tensors.items(), self._multipliers(), strict=True):
            grad = t.param.grad
            if fqn in self._row_tensors:
                rows = self._take_rows(fqn)
                dense_grad = grad is not None and not grad.is_sparse
                # Index work costs several times a streaming pass per entry: worth it for a few rows only.
                few = rows is not None and rows.numel() * _ROW_MODE_SHARE <= t.mask.shape[0]
                if dense_grad and not full_step and few:
                    self._row_step(fqn, t, grad, rows, upcoming, multiplier)
                    self._row_stepped.add(fqn)
                    continue
                if dense_grad and full_step:
                    if self.check_finite:
                        self._raise_if_non_finite(fqn, grad, upcoming)
                    self._check_looked_up(fqn, grad, rows)
                elif dense_grad:
                    self._row_stepped.add(fqn)  # masked whole below; keeps its zeros as in _row_step
                # Whole-table step: bring the scaled momentum up to date; it is averaged whole below.
                self._catch_up_momentum(fqn, upcoming - 1)
                if fqn in self.momentum_base and grad is not None:
                    self.momentum_base[fqn] = upcoming
            if grad is None:
                continue
            if capture or self.momentum:
                full = grad.to_dense() if grad.is_sparse else grad
                if capture:
                    if not bool(torch.isfinite(full).all()):
                        raise ValueError(f"non-finite gradient in {fqn!r} at update step {upcoming}")
                    self._dense_grads[fqn] = full.detach().clone()
                if self.momentum:
                    self.momentum[fqn].mul_(self.config.momentum).add_(full, alpha=1.0 - self.config.momentum)
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

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._row_stepped:
            self._apply_masks_except(self._row_stepped)
        else:
            if self._checking_rows:
                for fqn in self._row_tensors:
                    self._check_masked_zero(fqn, self.tensors[fqn])
            self.apply_masks()
        config = self.config
        if schedules.is_update_step(self.step, config, self.total_steps):
            self._update_topology()
        elif schedules.is_pruning_step(self.step, config, self.total_steps):
            self._prune_by_schedule()
        if config.method == "lottery" and self.lottery_round == 0 and self.step == config.rewind_step:
            self.lottery_snapshot = self._snapshot_weights()
        self._capturing = "activations" in self._needs and schedules.is_update_step(
            self.step + 1, config, self.total_steps
        )

    # ------------------------------------------------------------------ topology updates
    def _context(self, fqn: str, t: SparseTensor) -> scores.ScoreContext:
        needs = self._needs
        return scores.ScoreContext(
            fqn=fqn,
            weight=t.param.detach(),
            mask=t.mask,
            step=self.step,
            generator=self.generator,
            grad=self._gradient_of(fqn) if "grad" in needs else None,
            momentum=self.momentum.get(fqn),
            ever_active=self.ever_active.get(fqn),
            activations=self._activations.get(fqn),
        )

    def _grow_scores(self, fqn: str, t: SparseTensor) -> torch.Tensor:
        if self._grow_criterion is None:
            raise ValueError(f"grow criterion {self.config.grow!r} cannot score")
        return scores.compute(self._grow_criterion, self._context(fqn, t), self.config.tie_noise)

    def _drop_scores(self, fqn: str, t: SparseTensor) -> torch.Tensor:
        return scores.compute(self._drop_criterion, self._context(fqn, t), self.config.tie_noise)

    def _gradient_of(self, fqn: str) -> torch.Tensor:
        if fqn not in self._dense_grads:
            # The parameter got no gradient this step (unused branch): every score ties at zero.
            return torch.zeros_like(self.tensors[fqn].param, dtype=torch.float32)
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
        new_masks: dict[str, torch.Tensor] = {}
        if config.constant_fan_in:
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
            drop_scores = {fqn: self._drop_scores(fqn, t) for fqn, t in self.tensors.items()}
            grow_scores = {fqn: self._grow_scores(fqn, t) for fqn, t in self.tensors.items()}
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
        self._commit(new_masks, fraction)

    def _momentum_shares(self, after_drop: Mapping[str, torch.Tensor], total: int) -> dict[str, int]:
        """SNFS: regrowth split across tensors by the mean momentum magnitude of their active weights."""
        capacity = {
            fqn: int(torch.count_nonzero(self._grow_candidates(fqn, mask)))
            for fqn, mask in after_drop.items()
        }
        weight = {
            fqn: float(self.momentum[fqn].abs()[mask].mean()) if bool(mask.any()) else 0.0
            for fqn, mask in after_drop.items()
        }
        shares = {fqn: 0 for fqn in after_drop}
        remaining, open_fqns = total, {fqn for fqn in after_drop if capacity[fqn] > 0}
        while remaining > 0 and open_fqns:
            mass = sum(weight[f] for f in open_fqns) or float(len(open_fqns))
            ideal = {f: remaining * ((weight[f] / mass) if mass else 1.0 / len(open_fqns)) for f in open_fqns}
            if sum(weight[f] for f in open_fqns) == 0:
                ideal = {f: remaining / len(open_fqns) for f in open_fqns}
            placed = 0
            for fqn in sorted(open_fqns, key=lambda f: -(ideal[f] % 1)):
                amount = min(capacity[fqn] - shares[fqn], math.floor(ideal[fqn]))
                shares[fqn] += amount
                placed += amount
            leftover = remaining - placed
            for fqn in sorted(open_fqns, key=lambda f: -(ideal[f] % 1)):
                if leftover == 0:
                    break
                if shares[fqn] < capacity[fqn]:
                    shares[fqn] += 1
                    leftover -= 1
            remaining = leftover
            open_fqns = {f for f in open_fqns if shares[f] < capacity[f]}
        return shares

    def _dsr_update(self, fraction: float) -> dict[str, torch.Tensor]:
        """DSR: prune below one global magnitude threshold (adapted toward the target count), regrow at random
        in proportion to each tensor's surviving nnz."""
        total_nnz = sum(int(torch.count_nonzero(t.mask)) for t in self.tensors.values())
        target = math.ceil(fraction * total_nnz)
        magnitudes = {fqn: t.param.detach().abs() for fqn, t in self.tensors.items()}
        if self.dsr_threshold is None:
            active = torch.cat([magnitudes[fqn][t.mask].float().cpu() for fqn, t in self.tensors.items()])
            self.dsr_threshold = float(torch.kthvalue(active, max(target, 1)).values) if target else 0.0
        threshold = self.dsr_threshold
        after_drop = {}
        for fqn, t in self.tensors.items():
            pruned = t.mask & (magnitudes[fqn] <= threshold)
            if not bool((t.mask & ~pruned).any()):  # never empty a tensor: keep its largest weight
                keep = rules.select_top(magnitudes[fqn].float(), t.mask, 1)
                pruned &= ~keep
            after_drop[fqn] = t.mask & ~pruned
        n_pruned = total_nnz - sum(int(torch.count_nonzero(m)) for m in after_drop.values())
        # adapt the threshold for the next update (DSR's rule, 10% tolerance)
        if n_pruned < 0.9 * target:
            self.dsr_threshold = threshold * 2.0 if threshold > 0 else 1e-8
        elif n_pruned > 1.1 * target:
            self.dsr_threshold = threshold / 2.0
        survivors = {fqn: int(torch.count_nonzero(m)) for fqn, m in after_drop.items()}
        capacity = {
            fqn: int(torch.count_nonzero(self._grow_candidates(fqn, m))) for fqn, m in after_drop.items()
        }
        total_survivors = sum(survivors.values())
        ideal = {fqn: n_pruned * survivors[fqn] / total_survivors for fqn in survivors}
        shares = {fqn: min(capacity[fqn], math.floor(v)) for fqn, v in ideal.items()}
        leftover = n_pruned - sum(shares.values())
        for fqn in sorted(ideal, key=lambda f: -(ideal[f] % 1)) * 2:
            while leftover > 0 and shares[fqn] < capacity[fqn]:
                shares[fqn] += 1
                leftover -= 1
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

    def _commit(self, new_masks: Mapping[str, torch.Tensor], fraction: float) -> None:
        """Writes new masks: zeroes dropped weights, initializes grown ones, fixes optimizer state."""
        for hook in self.commit_hooks:
            hook(new_masks)
        record = rules.UpdateRecord.between(self.masks, new_masks, step=self.step, drop_fraction=fraction)
        grown_masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for fqn, new_mask in new_masks.items():
                t = self.tensors[fqn]
                old = t.mask
                grown = new_mask & ~old
                grown_masks[fqn] = grown
                old.copy_(new_mask)
                t.param.mul_(old)
                self._multiplier_cache = None
                if self.config.grow_init_range > 0 and bool(grown.any()):
                    r = self.config.grow_init_range
                    noise = (scoring.uniform_like(t.param, self.generator) * 2 - 1) * r
                    t.param.add_(noise.to(t.param.dtype) * grown)
                if fqn in self.ever_active:
                    self.ever_active[fqn] |= new_mask
        self._clear_optimizer_state({fqn: t.mask for fqn, t in self.tensors.items() if fqn in new_masks})
        if self.config.grow_optimizer_state == "momentum" and self.momentum:
            self._seed_first_moment(grown_masks)
        self._dense_grads.clear()
        self._activations.clear()
        self.history.append(record.to_dict())

    def _clear_optimizer_state(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Zeroes every optimizer state tensor of a parameter outside its mask."""
        for fqn, mask in masks.items():
            state = self.optimizer.state.get(self.tensors[fqn].param)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.mul_(mask)

    def _seed_first_moment(self, grown: Mapping[str, torch.Tensor]) -> None:
        for fqn, mask in grown.items():
            state = self.optimizer.state.get(self.tensors[fqn].param, {})
            for key in _FIRST_MOMENT_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.add_(self.momentum[fqn].to(value.dtype) * mask)

    # ------------------------------------------------------------------ dense-to-sparse pruning
    def _prune_to(self, targets: Mapping[str, int], keep_scores: Mapping[str, torch.Tensor]) -> None:
        new_masks = {}
        for fqn, t in self.tensors.items():
            nnz = int(torch.count_nonzero(t.mask))
            n_drop = max(nnz - targets[fqn], 0)
            new_masks[fqn] = rules.drop(t.mask, keep_scores[fqn], n_drop) if n_drop else t.mask.clone()
        self._commit(new_masks, 0.0)

    def _prune_by_schedule(self) -> None:
        targets = {}
        for fqn, t in self.tensors.items():
            final_sparsity = 1.0 - t.budget / t.numel
            if self.config.method == "one_shot":
                targets[fqn] = t.budget
            else:
                sparsity = schedules.gmp_sparsity(self.step, final_sparsity, self.config, self.total_steps)
                targets[fqn] = max(t.budget, round((1.0 - sparsity) * t.numel))
        self._prune_to(targets, {fqn: self._drop_scores(fqn, t) for fqn, t in self.tensors.items()})

    def next_lottery_round(self) -> float:
        """Lottery ticket: prune by magnitude toward the target, rewind the survivors, reset the optimizer.

        Round ``r`` (1-based) leaves each tensor at ``final_density ** (r / lottery_rounds)`` of its entries.
        Call it after each training round; train once more after the last call.

        Returns:
            the global density after pruning.
        """
        if self.config.method != "lottery":
            raise RuntimeError(f"next_lottery_round needs method 'lottery', got {self.config.method!r}")
        if self.lottery_round >= self.config.lottery_rounds:
            raise RuntimeError(f"all {self.config.lottery_rounds} lottery rounds are done")
        if self.lottery_snapshot is None:
            raise RuntimeError(
                f"no weights to rewind to: training stopped before rewind_step={self.config.rewind_step}"
            )
        self.lottery_round += 1
        progress = self.lottery_round / self.config.lottery_rounds
        targets = {
            fqn: max(t.budget, round(t.numel * (t.budget / t.numel) ** progress))
            for fqn, t in self.tensors.items()
        }
        self._prune_to(targets, {fqn: scoring.magnitude(t.param) for fqn, t in self.tensors.items()})
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.lottery_snapshot:
                    param.copy_(self.lottery_snapshot[name])
        self.apply_masks()
        self.optimizer.state.clear()
        self.step = 0
        return self.density

    def _snapshot_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    # ------------------------------------------------------------------ pruning at initialization
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
        method = self.config.method
        if method not in FORESIGHT_METHODS:
            raise RuntimeError(f"prune_at_initialization needs one of {FORESIGHT_METHODS}, got {method!r}")
        if method in ("snip", "grasp") and (targets is None or loss_fn is None):
            raise ValueError(
                f"{method} needs targets and loss_fn, got targets={targets!r}, loss_fn={loss_fn!r}"
            )
        budget = sum(t.budget for t in self.tensors.values())
        params = [t.param for t in self.tensors.values()]
        was_training = self.model.training
        if method == "snip":
            grads = torch.autograd.grad(loss_fn(self.model(inputs), targets), params)  # type: ignore[misc]
            keep = {
                fqn: scoring.weight_gradient(t.param, g)
                for (fqn, t), g in zip(self.tensors.items(), grads, strict=True)
            }
            self._keep_global_top(keep, budget)
        elif method == "grasp":
            loss = loss_fn(self.model(inputs), targets)  # type: ignore[misc]
            detached = torch.autograd.grad(loss, params)
            loss = loss_fn(self.model(inputs), targets)  # type: ignore[misc]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            z = sum((g * d).sum() for g, d in zip(grads, detached, strict=True))
            hessian_grad = torch.autograd.grad(z, params)
            # GraSP removes the largest -w * Hg; keeping the largest w * Hg is the same choice.
            keep = {
                fqn: (t.param.detach() * hg).float()
                for (fqn, t), hg in zip(self.tensors.items(), hessian_grad, strict=True)
            }
            self._keep_global_top(keep, budget)
        else:
            self._synflow(inputs, budget)
        self.model.train(was_training)
        self.foresight_done = True

    def _keep_global_top(self, keep_scores: Mapping[str, torch.Tensor], budget: int) -> None:
        flat = torch.cat([s.reshape(-1).cpu() for s in keep_scores.values()])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("non-finite scores at initialization (check the loss and the inputs)")
        flat = scoring.add_tie_noise(flat, self.config.tie_noise, self.generator)
        chosen = rules.select_top(flat, torch.ones_like(flat, dtype=torch.bool), budget)
        new_masks, offset = {}, 0
        for fqn, t in self.tensors.items():
            new_masks[fqn] = chosen[offset : offset + t.numel].reshape(t.mask.shape).to(t.mask.device)
            offset += t.numel
        collapsed = [fqn for fqn, m in new_masks.items() if not bool(m.any())]
        if collapsed:
            warnings.warn(
                f"{self.config.method}: layers left empty (layer collapse): {collapsed}", stacklevel=3
            )
        self._commit(new_masks, 0.0)

    def _synflow(self, inputs: torch.Tensor, budget: int) -> None:
        self.model.eval()
        signs = {}
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                if p.is_floating_point():
                    signs[name] = torch.sign(p)
                    p.abs_()
        ones = torch.ones(
            (1, *inputs.shape[1:]),
            dtype=inputs.dtype if inputs.is_floating_point() else torch.float32,
            device=inputs.device,
        )
        total = sum(t.numel for t in self.tensors.values())
        n = self.config.foresight_iterations
        for iteration in range(1, n + 1):
            params = [t.param for t in self.tensors.values()]
            score = torch.autograd.grad(self.model(ones).sum(), params)
            keep = {
                fqn: scoring.weight_gradient(t.param, g).masked_fill(~t.mask, -1.0)
                for (fqn, t), g in zip(self.tensors.items(), score, strict=True)
            }
            step_budget = round(total * (budget / total) ** (iteration / n))
            self._keep_global_top(keep, max(step_budget, budget))
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                if name in signs:
                    p.mul_(signs[name])
        self.apply_masks()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit: masks, schedule position, RNG and method state."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "total_steps": self.total_steps,
            "step": self.step,
            "masks": {fqn: t.mask.detach().cpu().clone() for fqn, t in self.tensors.items()},
            "budgets": {fqn: t.budget for fqn, t in self.tensors.items()},
            "active_rows": {
                fqn: t.active_rows.cpu().clone()
                for fqn, t in self.tensors.items()
                if t.active_rows is not None
            },
            "ever_active": {fqn: m.cpu().clone() for fqn, m in self.ever_active.items()},
            "momentum": {fqn: m.cpu().clone() for fqn, m in self.momentum.items()},
            "momentum_base": dict(self.momentum_base),
            "growth_regions": {fqn: m.cpu().clone() for fqn, m in self.growth_regions.items()},
            "generator": self.generator.get_state(),
            "dsr_threshold": self.dsr_threshold,
            "foresight_done": self.foresight_done,
            "lottery_round": self.lottery_round,
            "lottery_snapshot": self.lottery_snapshot,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; refuses a checkpoint of another configuration or model."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"expected a DynamicSparsity state_dict of version {STATE_VERSION}, "
                f"got {type(state).__name__} with version {getattr(state, 'get', lambda _: None)('version')!r}"
            )
        saved = SparsityConfig.from_dict(state["config"])
        if saved != self.config:
            diff = {
                k: (v, getattr(self.config, k))
                for k, v in saved.to_dict().items()
                if self.config.to_dict()[k] != v
            }
            raise ConfigMismatchError(
                f"checkpoint was made with another SparsityConfig; (saved, current) differ in {diff}"
            )
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"checkpoint has total_steps={state['total_steps']}, this run {self.total_steps}"
            )
        shapes = {fqn: t.mask.shape for fqn, t in self.tensors.items()}
        self._check_budgets(state, self._check_masks(state["masks"], shapes, "masks"))
        for fqn, t in self.tensors.items():
            t.mask.copy_(state["masks"][fqn].to(t.mask.device))
            if fqn in state["active_rows"]:
                t.active_rows = state["active_rows"][fqn].to(t.mask.device).clone()
        device_of = {fqn: t.mask.device for fqn, t in self.tensors.items()}
        self.ever_active = {fqn: m.to(device_of[fqn]).clone() for fqn, m in state["ever_active"].items()}
        if self.config.dynamic:  # a checkpoint of a version that tracked it only for 'unfired': from now on
            for fqn, t in self.tensors.items():
                self.ever_active.setdefault(fqn, t.mask.clone())
        self.momentum = {
            fqn: m.to(device=device_of[fqn], dtype=self.tensors[fqn].param.dtype).clone()
            for fqn, m in state["momentum"].items()
        }
        self.growth_regions = {
            fqn: m.to(device_of[fqn]).clone() for fqn, m in state["growth_regions"].items()
        }
        self._rows_checked = int(state["step"]) > 0  # re-checked at the next update step
        saved_bases = state.get("momentum_base", {})
        for fqn in self.momentum_base:
            # Checkpoints written without row mode hold true averages: their base is their step.
            self.momentum_base[fqn] = int(saved_bases.get(fqn, state["step"]))
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.dsr_threshold = state["dsr_threshold"]
        self.foresight_done = bool(state["foresight_done"])
        self.lottery_round = int(state["lottery_round"])
        self.lottery_snapshot = state["lottery_snapshot"]
        self.history = list(state["history"])
        self._multiplier_cache = None
        self._capturing = "activations" in self._needs and schedules.is_update_step(
            self.step + 1, self.config, self.total_steps
        )
        self.apply_masks()

    def _check_budgets(self, state: Mapping[str, Any], nnz: Mapping[str, int]) -> None:
        """Refuses a checkpoint whose masks hold more entries than this configuration allows.

        Budgets are fixed when the engine is built (from the config's density and distribution, or the initial
        masks) and never change, so a saved budget must equal this engine's. Sparse-from-scratch methods keep
        the total nnz within the total budget (DSR/SNFS move entries between tensors, ablation may leave fewer);
        dense-to-sparse methods start dense and reach the budget only at the end of their schedule.
        """
        budgets = state.get("budgets")
        if not isinstance(budgets, Mapping) or set(budgets) != set(self.tensors):
            raise ValueError(
                f"checkpoint budgets name {sorted(budgets or [])}, the sparse tensors {sorted(self.tensors)}"
            )
        differ = {
            fqn: (int(budgets[fqn]), t.budget)
            for fqn, t in self.tensors.items()
            if int(budgets[fqn]) != t.budget
        }
        if differ:
            raise ConfigMismatchError(
                f"checkpoint budgets (saved, this config's) differ in {differ}: it was made for another density "
                f"than {self.config.density:g} or another model"
            )
        if self.config.method in ("dst", "static"):
            total, budget = sum(nnz.values()), sum(t.budget for t in self.tensors.values())
            if total > budget:
                over = {
                    fqn: (n, self.tensors[fqn].budget)
                    for fqn, n in nnz.items()
                    if n > self.tensors[fqn].budget
                }
                raise ValueError(
                    f"checkpoint masks hold {total} active entries, more than the budget of {budget} that density "
                    f"{self.config.density:g} allows (nnz, budget) per tensor over it: {over}; the file is damaged "
                    "or was edited"
                )

    @staticmethod
    def _check_masks(
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
