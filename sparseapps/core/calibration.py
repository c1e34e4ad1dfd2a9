"""One-shot pruning with second-order reconstruction as engine presets: OBS (WoodFisher) and SparseGPT.

Both prune once, at the ``one_shot`` step (``start_fraction`` of training), from statistics of the training steps
right before it, so they run in the ordinary training loop with no extra data or call:

- ``obs`` (preset ``obs``): Optimal Brain Surgeon with a block-diagonal empirical Fisher (WoodFisher, Singh &
  Alistarh 2020) built from the mini-batch gradients of the last ``calibration_steps`` steps, as WoodFisher's
  implementation builds it from mini-batch gradients (the per-example variant is :func:`sparseapps.core.obs.prune`,
  which needs a batch and a loss). Saliency ``w**2 / (2 [F^-1]_qq)``; the survivors take the OBS update. The Fisher's
  scale does not change the choice or the update (only its ratio to the dampening). Memory while collecting:
  ``calibration_steps`` dense gradients of every sparse tensor.
- ``sparsegpt`` (preset ``sparsegpt``): SparseGPT (Frantar & Alistarh 2023) on every sparse Linear and Conv layer
  (a convolution is the Linear of its unfolded input patches), with ``H = 2 X X^T`` of the layer's inputs over the
  last ``calibration_steps`` training forwards. The layers are pruned from the dense model's inputs at once (the
  paper's sequential pass re-feeds each layer the pruned layers' outputs; that needs the data again). Memory while
  collecting: one ``[fan_in, fan_in]`` float64 matrix per layer.

The statistics live in the engine's ``traces`` (``obs_gradients``, ``input_hessian``, ``input_count``), so a
checkpoint taken inside the window resumes bit for bit; they are released after the pruning step.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseapps.core import DynamicSparsity, SparsityConfig
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> config = SparsityConfig.preset("sparsegpt", sparsity=0.75, calibration_steps=4)
    >>> engine = DynamicSparsity(model, optimizer, config, total_steps=20)
    >>> for _ in range(20):
    ...     optimizer.zero_grad(); model(torch.randn(32, 8)).pow(2).mean().backward(); optimizer.step()
    >>> round(engine.density, 2), [record["step"] for record in engine.history]
    (0.25, [10])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparseapps.core import obs, schedules, sparsegpt
from sparseapps.core.config import CALIBRATED_METHODS, SparsityConfig

if TYPE_CHECKING:
    from sparseapps.core.engine import DynamicSparsity
    from sparseapps.core.selection import SparseTensor

__all__ = ["Calibration"]

GRADIENTS, HESSIAN, COUNT = "obs_gradients", "input_hessian", "input_count"


class Calibration:
    """Collects what ``obs`` / ``sparsegpt`` read in the steps before the one-shot step, and prunes at it.

    Args:
        config: the engine's configuration (method ``obs`` or ``sparsegpt``).
        tensors: the engine's sparse tensors (masked storage).
        total_steps: the run's optimizer steps.
    """

    def __init__(self, config: SparsityConfig, tensors: Mapping[str, SparseTensor], total_steps: int) -> None:
        if config.method not in CALIBRATED_METHODS:
            raise ValueError(f"expected a method among {CALIBRATED_METHODS}, got {config.method!r}")
        for fqn, t in tensors.items():
            if t.kind == "embedding":
                raise ValueError(
                    f"method {config.method!r} prunes Linear and Conv weights; {fqn!r} is an embedding table "
                    "(module_types=('linear', 'conv') keeps tables dense)"
                )
            if config.method == "sparsegpt":
                _check_layer(fqn, t.module)
        self.config = config
        start, _ = schedules.update_window(config, total_steps)
        self.prune_step = max(start, 1)
        self.first_step = max(1, self.prune_step - config.calibration_steps + 1)
        self.armed = False

    def initial_traces(self, tensors: Mapping[str, SparseTensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The engine's traces this method fills: zeros of their final shapes (released after the pruning step)."""
        steps = self.prune_step - self.first_step + 1
        if self.config.method == "obs":
            return {
                GRADIENTS: {
                    fqn: torch.zeros(steps, t.numel, device=t.param.device) for fqn, t in tensors.items()
                }
            }
        hessians, counts = {}, {}
        for fqn, t in tensors.items():
            fan_in = t.numel // t.param.shape[0]
            hessians[fqn] = torch.zeros(fan_in, fan_in, dtype=torch.float64, device=t.param.device)
            counts[fqn] = torch.zeros((), dtype=torch.float64, device=t.param.device)
        return {HESSIAN: hessians, COUNT: counts}

    def collects(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is in the window before the one-shot step."""
        return self.first_step <= step <= self.prune_step

    def arm(self, upcoming: int) -> None:
        """Sets whether the forwards of the coming step are recorded (``sparsegpt``)."""
        self.armed = self.config.method == "sparsegpt" and self.collects(upcoming)

    def record_gradient(
        self, traces: dict[str, dict[str, torch.Tensor]], fqn: str, step: int, grad: torch.Tensor
    ) -> None:
        """``obs``: stores step ``step``'s dense gradient of ``fqn``."""
        if self.config.method == "obs" and self.collects(step):
            if not bool(torch.isfinite(grad).all()):
                raise ValueError(f"non-finite gradient in {fqn!r} at step {step}, collected for OBS's Fisher")
            traces[GRADIENTS][fqn][step - self.first_step].copy_(grad.reshape(-1))

    def record_inputs(
        self, traces: dict[str, dict[str, torch.Tensor]], record: SparseTensor, inputs: torch.Tensor
    ) -> None:
        """``sparsegpt``: adds a training forward's ``X^T X`` to the layer's sum."""
        if not (self.armed and record.module.training):
            return
        rows = sparsegpt.layer_inputs(record.module, inputs.detach()).double()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"non-finite inputs to {record.fqn!r}, collected for SparseGPT's Hessian")
        traces[HESSIAN][record.fqn].addmm_(rows.T, rows)
        traces[COUNT][record.fqn] += rows.shape[0]

    def prune(self, engine: DynamicSparsity) -> None:
        """The one-shot step: every sparse tensor to its budget, survivors updated; the statistics released."""
        traces = engine.traces
        if self.config.method == "obs":
            steps = self.prune_step - self.first_step + 1
            grads = {fqn: traces[GRADIENTS][fqn][:steps] for fqn in engine.tensors}
            obs.prune_from_gradients(engine, grads)
        else:
            new_masks = {}
            with torch.no_grad():
                for fqn, t in engine.tensors.items():
                    count = float(traces[COUNT][fqn])
                    if count == 0:
                        raise RuntimeError(
                            f"no training forward reached {fqn!r} in the {self.config.calibration_steps} steps before "
                            f"the pruning step {self.prune_step}: SparseGPT has no inputs to reconstruct"
                        )
                    weight = t.param.detach().reshape(t.param.shape[0], -1)
                    hessian = traces[HESSIAN][fqn] * (2.0 / count)
                    new_weight, mask = sparsegpt.prune_layer(
                        weight, hessian, sparsity=1.0 - t.budget / t.numel
                    )
                    if int(mask.sum()) != t.budget:
                        raise RuntimeError(
                            f"SparseGPT kept {int(mask.sum())} weights of {fqn!r}, budget {t.budget}"
                        )
                    t.param.copy_(new_weight.view_as(t.param))
                    new_masks[fqn] = mask.view_as(t.mask)
            engine.commit(new_masks, 0.0)
            engine.apply_masks()
        for name in (GRADIENTS, HESSIAN, COUNT):
            per = traces.get(name, {})
            for fqn, value in per.items():
                per[fqn] = value.new_zeros((0,) * value.dim())


def _check_layer(fqn: str, module: nn.Module) -> None:
    """Raises ``ValueError`` naming ``fqn`` unless :func:`sparsegpt.layer_inputs` can unfold ``module``'s inputs."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups == 1 and isinstance(module.padding, tuple):
            return
        reason = (
            f"groups={module.groups}, padding={module.padding!r} (groups=1 and numeric padding are unfolded)"
        )
    else:
        reason = "SparseGPT reconstructs Linear and Conv1d/Conv2d layers"
    raise ValueError(
        f"method 'sparsegpt' cannot prune {fqn!r} ({type(module).__name__}): {reason}; exclude it"
    )
