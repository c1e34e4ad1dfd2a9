"""The compact storage inside the engine: what `DynamicSparsity` does for compact modules.

A compact module is one of :data:`COMPACT_MODULES` (`CompactLinear`, `CompactEmbedding`); each offers the same
interface (``values``, ``nnz``, ``weight_shape``, ``row_ptr``, ``positions()``, ``mask()``, ``to_dense_weight()``,
``set_mask() -> Repack`` and the dense-gradient capture ``capture_dense_grad`` / ``dense_grad``), which is all
:class:`CompactTensor` reads.

The updater never sees a storage (``rules.update_masks`` works on masks and scores), so a compact tensor only has
to show the engine the dense views a masked one shows, and only at topology updates:

- per step: nothing. Gradients exist for the active entries only, so there is no mask to apply to gradients or
  weights, and no optimizer state of inactive entries to keep at zero;
- in the step before a growth-by-gradient update, the layer's backward keeps that step's dense gradient ``dy^T x``
  (as its factors where they are smaller: ``capture_dense_grad``);
- at an update, for the built-in criteria (magnitude, random or SET drop; gradient or random growth) nothing dense
  is built: ``compact.topology`` scores the active entries, scans the growth candidates block by block and
  re-packs by positions (``write_positions``). Otherwise ``mask`` and ``dense_weight()`` are materialized for the
  scores and ``write_mask`` re-packs. Either way kept entries keep their values and their per-entry optimizer
  state (Adam's moments, SGD's momentum, ...), grown ones start at zero, dropped ones are removed, and the
  ``values`` Parameter stays the object the optimizer holds.

Criteria that read a dense state every step (``"momentum"``) are refused, and the ITOP rate (entries ever active,
a dense mask per layer) is tracked only where a criterion reads it: their cost is the one compact storage avoids.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass

import torch
from torch import nn

from sparseapps.core import scores
from sparseapps.core.compact.embedding import CompactEmbedding
from sparseapps.core.compact.layer import CompactLinear, Repack
from sparseapps.core.config import SparsityConfig
from sparseapps.core.kernels.reference import row_of_entries

__all__ = [
    "COMPACT_MODULES",
    "CompactTensor",
    "caching_views",
    "check_captured_finite",
    "compact_fqns",
    "set_capture",
    "take_dense_grads",
]

#: The module types whose selected weight is held compact (values + indices); the engine re-packs them at updates.
COMPACT_MODULES: tuple[type[nn.Module], ...] = (CompactLinear, CompactEmbedding)


@dataclass
class CompactTensor:
    """One compact module as the engine sees a sparse tensor (the counterpart of ``selection.SparseTensor``)."""

    fqn: str
    module: CompactLinear | CompactEmbedding
    kind: str
    budget: int
    allow_ablation: bool = True
    active_rows: torch.Tensor | None = None
    positions: int = 1
    param_name: str = "values"

    def __post_init__(self) -> None:
        if self.module.nnz > self.budget:
            raise ValueError(
                f"{self.fqn!r} holds {self.module.nnz} active weights, more than its budget of {self.budget}: "
                "build the compact model with the same config (sparseapps.core.to_compact for Linear layers)"
            )

    @property
    def param(self) -> nn.Parameter:
        return self.module.values

    @property
    def mask(self) -> torch.Tensor:
        """``[out, in]`` bool, materialized from the layer's structure once per topology (shared: read only)."""
        return self.module.shared_mask()

    @property
    def numel(self) -> int:
        return math.prod(self.module.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """``[out, in]`` the weight with zeros at the inactive entries (shared until the weights change: read only)."""
        return self.module.shared_dense_weight()

    def write_mask(self, new_mask: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Re-packs the layer, its gradient and its optimizer state to ``new_mask``; returns the grown entries."""
        grown = new_mask & ~self.module.shared_mask()
        old_shape = self.param.shape
        self._repack_state(self.module.set_mask(new_mask), old_shape, optimizer)
        return grown

    def write_positions(
        self, kept: torch.Tensor, grown: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> None:
        """:meth:`write_mask` given as the kept entries (indices into ``values``) and the grown positions."""
        old_shape = self.param.shape
        self._repack_state(self.module.set_positions(kept, grown), old_shape, optimizer)

    def _repack_state(self, repack: Repack, old_shape: torch.Size, optimizer: torch.optim.Optimizer) -> None:
        """Moves every per-entry optimizer state of the values (Adam's moments, SGD's momentum, ...) by ``repack``."""
        state = optimizer.state.get(self.param, {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old_shape:
                state[key] = repack.apply(value)

    def add_dense_(self, delta: torch.Tensor) -> None:
        """Adds the active entries of ``delta [out, in]`` to the values."""
        self.param.add_(delta.reshape(-1)[self.module.positions()])

    def scale_rows_(self, scale: torch.Tensor) -> None:
        """Multiplies the weights of output ``r`` by ``scale[r]``."""
        self.param.mul_(scale.to(self.param.dtype)[row_of_entries(self.module.row_ptr)])

    def load_mask(self, mask: torch.Tensor) -> None:
        """Checks that a checkpoint's mask is the layer's topology (which the model's state_dict carries)."""
        if not torch.equal(self.module.shared_mask(), mask.to(self.module.row_ptr.device)):
            raise ValueError(
                f"the mask of {self.fqn!r} differs from the topology of its {type(self.module).__name__}: load the "
                "model's state_dict (which holds a compact module's topology) before the engine's"
            )


def compact_fqns(
    config: SparsityConfig, selected: Sequence[tuple[str, nn.Module, str, str]], needs: Set[str]
) -> set[str]:
    """The selected tensors held by compact layers; refuses a model whose layers do not match ``config.storage``.

    Args:
        config: the engine's configuration.
        selected: ``select_tensors(model, config)``.
        needs: what the configured criteria read (``scores.NEEDS``).

    Raises:
        ValueError: compact layers under ``storage='masked'``, ``nn.Linear`` layers left under
            ``storage='compact'``, or compact layers with a criterion that reads a dense state every step.
    """
    compact = {fqn for fqn, module, _, _ in selected if isinstance(module, COMPACT_MODULES)}
    if config.storage == "masked" and compact:
        raise ValueError(
            f"the model holds compact modules {sorted(compact)}; use a config with storage='compact'"
        )
    linear = [fqn for fqn, _, _, kind in selected if kind == "linear" and fqn not in compact]
    if config.storage == "compact" and linear:
        raise ValueError(
            f"storage='compact' expects the selected Linear layers as CompactLinear, got nn.Linear at {linear}: "
            "call sparseapps.core.to_compact(model, config) before building the optimizer and the engine"
        )
    every_step = sorted(needs & scores.EVERY_STEP)
    if compact and every_step:
        what = "a gradient momentum" if every_step == ["momentum"] else f"{every_step}, dense traces"
        raise ValueError(
            f"drop={config.drop!r} / grow={config.grow!r} read {what} tracked every step, which compact layers do "
            "not keep; use storage='masked'"
        )
    return compact


@contextlib.contextmanager
def caching_views(tensors: Iterable[CompactTensor]) -> Iterator[None]:
    """Within this block each layer builds its dense views (mask, positions, weight) once: a topology update."""
    with contextlib.ExitStack() as stack:
        for t in tensors:
            stack.enter_context(t.module.caching_views())
        yield


def set_capture(tensors: Iterable[CompactTensor], capture: bool) -> None:
    """Whether the layers' next backward passes add up their dense gradient ``dy^T x`` (cleared either way)."""
    for t in tensors:
        t.module.capture_dense_grad = capture
        t.module.dense_grad = None


def take_dense_grads(tensors: Iterable[CompactTensor], step: int) -> dict[str, torch.Tensor]:
    """``{fqn: [out, in]}`` the dense gradients captured for the update at ``step`` (layers not run: none).

    Raises:
        ValueError: a captured gradient holds NaN or Inf (the update would rank garbage).
    """
    grads = {}
    for t in tensors:
        grad, t.module.dense_grad = t.module.dense_grad, None
        if grad is None:
            continue
        check_captured_finite(t.fqn, grad, step)
        grads[t.fqn] = grad
    return grads


def check_captured_finite(fqn: str, captured: torch.Tensor, step: int) -> None:
    """Raises ``ValueError`` naming ``fqn`` if a captured gradient (or one of its factors) holds NaN or Inf: the
    update would rank garbage. One reduction first; the exact check only when the sum is not finite."""
    if not bool(torch.isfinite(captured.sum())) and not bool(torch.isfinite(captured).all()):
        raise ValueError(f"non-finite gradient in {fqn!r} at update step {step}")
