"""``embedding_rows="looked_up"``: per-step work on the rows a step looked up, not on whole embedding tables.

A large table (recsys: millions of rows) is read a few hundred rows per step. Masking its whole gradient, and
averaging its whole momentum, every step would cost a pass over the table per step; here a forward pre-hook flags
the rows each forward looks up, and a step masks and averages those rows only:

- masked weights stay zero without re-masking: their gradient is masked on the looked-up rows (elsewhere it is
  zero) and their optimizer state is zero (cleared at every commit), so an elementwise optimizer (SGD, Adam,
  AdamW, RMSprop, Adagrad, ...) leaves them at zero; every full step checks that it did;
- a row-mode momentum is kept scaled between full steps: the true average is ``momentum * beta ** (step - base)``,
  so a step only adds to its rows; full steps (topology updates, pruning steps, the first step) bring it up to
  date and process the table whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparseapps.core.finite import raise_if_non_finite

if TYPE_CHECKING:
    from sparseapps.core.selection import SparseTensor

# Row mode applies to tables of MIN_ROWS rows or more (below that a whole-table pass costs microseconds, less than
# recording the lookups), and to steps that looked up at most 1/SHARE of a table's rows (index work costs several
# times a streaming pass per entry: worth it for a few rows only).
MIN_ROWS = 1 << 14
SHARE = 4


class LookedUpRows:
    """The row-mode bookkeeping of one engine: which rows were looked up, which tables kept their zeros.

    Args:
        tensors: the engine's sparse tensors; embedding tables of ``MIN_ROWS`` rows or more are handled.
        momentum: the engine's momentum averages (tables in it get a scaled momentum with a base step).
        beta: the momentum decay.
    """

    def __init__(
        self, tensors: Mapping[str, SparseTensor], momentum: Mapping[str, torch.Tensor], beta: float
    ) -> None:
        self.fqns: tuple[str, ...] = tuple(
            fqn for fqn, t in tensors.items() if t.kind == "embedding" and t.mask.shape[0] >= MIN_ROWS
        )
        self.beta = beta
        self.looked_up: dict[str, torch.Tensor] = {}  # per table: bool flags of the rows looked up
        self.stepped: set[str] = set()  # tables that need no re-masking after this step
        self.checking = False  # this step is a full one: check the tables after it
        self.checked = False  # the first step (always a full one) is done
        self.momentum_base: dict[str, int] = {fqn: 0 for fqn in self.fqns if fqn in momentum}

    def lookup_hook(self, record: SparseTensor) -> Callable[..., None]:
        """A forward pre-hook that flags the rows a forward looks up (``input`` of Embedding / EmbeddingBag)."""
        fqn = record.fqn

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not torch.is_grad_enabled():
                return
            index = args[0] if args else kwargs.get("input")
            if not isinstance(index, torch.Tensor):
                raise TypeError(
                    f"embedding_rows='looked_up' could not find the indices of {fqn!r}'s forward call"
                )
            flags = self.looked_up.get(fqn)
            if flags is None:
                flags = torch.zeros(record.mask.shape[0], dtype=torch.bool, device=record.mask.device)
                self.looked_up[fqn] = flags
            flags[index.detach().reshape(-1).to(device=flags.device, dtype=torch.long)] = True

        return hook

    def take_rows(self, fqn: str) -> torch.Tensor | None:
        """The distinct rows looked up since the last step, ascending (``None`` when nothing was looked up)."""
        flags = self.looked_up.pop(fqn, None)
        return None if flags is None else flags.nonzero().squeeze(1)

    def catch_up(self, momentum: Mapping[str, torch.Tensor], fqn: str, upto: int) -> None:
        """Turns a table's scaled momentum into the true average as of step ``upto``."""
        if fqn not in self.momentum_base or upto == self.momentum_base[fqn]:
            return
        momentum[fqn].mul_(self.beta ** (upto - self.momentum_base[fqn]))
        self.momentum_base[fqn] = upto

    def before_step(
        self,
        t: SparseTensor,
        momentum: Mapping[str, torch.Tensor],
        step: int,
        full_step: bool,
        multiplier: torch.Tensor,
        check_finite: bool,
    ) -> bool:
        """The row-mode part of a step for table ``t``; ``True`` when the step is done for it (rows only)."""
        fqn, grad = t.fqn, t.param.grad
        rows = self.take_rows(fqn)
        if grad is not None and not grad.is_sparse:
            if not full_step and rows is not None and rows.numel() * SHARE <= t.mask.shape[0]:
                self._row_step(t, grad, rows, step, multiplier, momentum, check_finite)
                self.stepped.add(fqn)
                return True
            if full_step:
                if check_finite:
                    raise_if_non_finite(fqn, grad, step)
                self.check_looked_up(fqn, grad, rows)
            else:
                self.stepped.add(fqn)  # masked whole by the engine; keeps its zeros as in _row_step
        # Whole-table step: bring the scaled momentum up to date; the engine averages it whole.
        self.catch_up(momentum, fqn, step - 1)
        if fqn in self.momentum_base and grad is not None:
            self.momentum_base[fqn] = step
        return False

    def _row_step(
        self,
        t: SparseTensor,
        grad: torch.Tensor,
        rows: torch.Tensor,
        step: int,
        multiplier: torch.Tensor,
        momentum: Mapping[str, torch.Tensor],
        check_finite: bool,
    ) -> None:
        """Momentum average and gradient masking of one step, on the looked-up ``rows`` only."""
        fqn = t.fqn
        rows_grad = grad.index_select(0, rows)
        if check_finite:
            raise_if_non_finite(fqn, rows_grad, step)
        if fqn in self.momentum_base:
            beta = self.beta
            if beta == 0.0:  # the average is the last gradient
                momentum[fqn].zero_().index_copy_(0, rows, rows_grad)
                self.momentum_base[fqn] = step
            else:
                decay = beta ** (step - self.momentum_base[fqn])
                if decay < 1e-20:  # keep the scaled values in range
                    self.catch_up(momentum, fqn, step - 1)
                    decay = beta
                scale = (1.0 - beta) / decay
                average = momentum[fqn]  # rows are distinct: select, add, copy beats index_add_ here
                average.index_copy_(0, rows, average.index_select(0, rows).add_(rows_grad, alpha=scale))
        keep = multiplier if multiplier.dtype == grad.dtype else t.mask  # float x float multiplies faster
        grad.index_copy_(0, rows, rows_grad.mul_(keep.index_select(0, rows)))

    @staticmethod
    def check_masked_zero(t: SparseTensor, optimizer: torch.optim.Optimizer) -> None:
        """At full steps: the optimizer left every masked weight of table ``t`` at zero."""
        outside = (t.param.detach() != 0).logical_and_(~t.mask)
        if bool(outside.any()):
            leaked = int(torch.count_nonzero(outside))
            raise RuntimeError(
                f"{type(optimizer).__name__} changed {leaked} masked entries of {t.fqn!r} that had zero gradient "
                "and zero state; embedding_rows='looked_up' needs an elementwise optimizer (SGD, Adam, AdamW, "
                "RMSprop, Adagrad, ...): use embedding_rows='all' with this one"
            )

    @staticmethod
    def check_looked_up(fqn: str, grad: torch.Tensor, rows: torch.Tensor | None) -> None:
        """At full steps: no row outside the lookups may have a gradient."""
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
