"""Diagnostics of adaptation: dormant neurons (ReDo), mask turnover, and recovery of returns after a shift.

* Dormant neurons follow Sokar et al. 2023 ("The Dormant Neuron Phenomenon in Deep Reinforcement Learning") as
  implemented in their official code (``dopamine/labs/redo/weight_recyclers.py``): the score of neuron ``i`` of a
  layer is its mean ``|activation|`` over a batch (and over spatial positions for convolutions) divided by the
  mean of that quantity over the layer's neurons (plus ``1e-9``); the neuron is dormant when its score is
  ``<= tau``. Activations are the outputs of the activation modules, so output layers are not counted.
* Mask turnover compares two ``{fqn: bool mask}`` snapshots.
* :func:`shift_recovery` segments a sequence of episode returns by drift phase
  (see :mod:`sparseapps.rl.drift`) and measures how fast the moving average of returns comes back.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparseapps.core.validation import check_int, check_number

DORMANT_TAU = 0.025
# ReDo's code adds this to the layer mean before dividing, so a layer of all-zero activations scores 0.
SCORE_EPSILON = 1e-9

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)


def _check_tau(tau: object) -> float:
    return check_number("tau", tau, low=0.0)


def neuron_scores(activations: torch.Tensor) -> torch.Tensor:
    """ReDo's score of every neuron of one layer from a batch of its activations.

    Args:
        activations: ``[B, N]`` (linear layers) or ``[B, N, *S]`` (convolutions: ``N`` channels, spatial ``S``);
            neurons are along dim 1, PyTorch's channel convention.

    Returns:
        ``[N]`` float scores: mean ``|a|`` per neuron over the batch (and ``S``), divided by the layer's mean of
        those means (plus :data:`SCORE_EPSILON`). The scores average to 1 unless the layer is all zero.

    Example:
        >>> neuron_scores(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]]))
        tensor([1.5000, 0.0000, 1.5000])
    """
    if not isinstance(activations, torch.Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    if activations.dim() < 2:
        raise ValueError(f"activations must be [B, N] or [B, N, *S], got shape {tuple(activations.shape)}")
    if activations.shape[0] == 0 or activations.shape[1] == 0:
        raise ValueError(
            f"activations need at least one sample and one neuron, got shape {tuple(activations.shape)}"
        )
    values = activations.detach()
    values = values.abs() if values.is_floating_point() else values.abs().double()
    reduce = [0, *range(2, values.dim())]
    per_neuron = values.mean(dim=reduce, dtype=torch.float64)
    return (per_neuron / (per_neuron.mean() + SCORE_EPSILON)).to(torch.float32)


def dormant_mask(activations: torch.Tensor, tau: float = DORMANT_TAU) -> torch.Tensor:
    """``[B, N, *S] -> [N]`` bool, True where a neuron is tau-dormant (score ``<= tau``)."""
    return neuron_scores(activations) <= _check_tau(tau)


@dataclass(frozen=True)
class DormantNeurons:
    """Dormant neurons of a network on one batch.

    Attributes:
        tau: the threshold used.
        masks: per layer (the fqn of its activation module, ``fqn[i]`` for the ``i``-th call of a module
            called several times in one forward), ``[N]`` bool, True where dormant.
    """

    tau: float
    masks: dict[str, torch.Tensor]

    @property
    def per_layer(self) -> dict[str, float]:
        """Fraction of dormant neurons in each layer."""
        return {name: float(mask.float().mean()) for name, mask in self.masks.items()}

    @property
    def n_neurons(self) -> int:
        """Neurons over all layers."""
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def n_dormant(self) -> int:
        """Dormant neurons over all layers."""
        return sum(int(mask.sum()) for mask in self.masks.values())

    @property
    def fraction(self) -> float:
        """Dormant neurons over all layers divided by all neurons (ReDo's reported percentage, as a fraction)."""
        return self.n_dormant / self.n_neurons


def find_dormant_neurons(
    module: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    tau: float = DORMANT_TAU,
    layer_types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES,
) -> DormantNeurons:
    """Runs ``module(*inputs)`` once and scores the output of every submodule of ``layer_types``.

    The forward runs in eval mode under ``torch.no_grad()`` with the global RNG state forked (a stochastic
    policy's sampling does not disturb training's random stream); training flags are restored and every hook is
    removed afterwards, also on error.

    Args:
        module: any torch module, e.g. an SB3 ``policy``, ``actor``, ``critic`` or ``q_net``.
        inputs: a batch of observations ``[B, obs_dim]``, or a sequence of positional inputs such as
            ``(observations, actions)`` for an SB3 continuous critic. Moved to the module's device.
        tau: dormancy threshold (ReDo's figures use 0 and 0.025; its recycling configs use up to 0.1).
        layer_types: which submodules' outputs are neurons. The default (activation modules) measures hidden
            neurons after their nonlinearity, as ReDo does; ``(nn.Linear,)`` scores pre-activations and
            includes output layers.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = find_dormant_neurons(net, torch.randn(32, 4))
        >>> list(report.masks), report.n_neurons
        (['1'], 8)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    tau = _check_tau(tau)
    if (
        not isinstance(layer_types, tuple)
        or not layer_types
        or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types)
    ):
        raise TypeError(f"layer_types must be a non-empty tuple of nn.Module subclasses, got {layer_types!r}")
    args = (
        (inputs,)
        if isinstance(inputs, torch.Tensor)
        else tuple(inputs)
        if isinstance(inputs, Sequence)
        else None
    )
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(
            f"inputs must be a tensor or a non-empty sequence of tensors, got {type(inputs).__name__}"
        )
    if args[0].dim() == 0 or args[0].shape[0] == 0:
        raise ValueError(f"inputs must be a batch [B, ...] with B >= 1, got shape {tuple(args[0].shape)}")
    watched = [(fqn, sub) for fqn, sub in module.named_modules() if isinstance(sub, layer_types)]
    if not watched:
        names = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(
            f"{type(module).__name__} has no submodule of types ({names}); pass layer_types=(nn.Linear,) for "
            "networks that apply their nonlinearity functionally"
        )
    parameter = next(module.parameters(), None)
    if parameter is not None:
        args = tuple(a.to(parameter.device) for a in args)

    outputs: dict[str, list[torch.Tensor]] = {fqn: [] for fqn, _ in watched}

    def recorder(fqn: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(sub: nn.Module, hook_inputs: tuple[object, ...], output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"{fqn or type(sub).__name__} returned {type(output).__name__}, expected a tensor"
                )
            outputs[fqn].append(output.detach())

        return hook

    training = {sub: sub.training for sub in module.modules()}
    handles = [sub.register_forward_hook(recorder(fqn)) for fqn, sub in watched]
    devices = [parameter.device] if parameter is not None and parameter.device.type == "cuda" else []
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            module(*args)
    finally:
        for handle in handles:
            handle.remove()
        for sub, flag in training.items():
            sub.training = flag

    masks: dict[str, torch.Tensor] = {}
    for fqn, calls in outputs.items():
        label = fqn or type(module).__name__
        for index, output in enumerate(calls):
            key = label if len(calls) == 1 else f"{label}[{index}]"
            masks[key] = dormant_mask(output, tau)
    if not masks:
        raise ValueError(
            f"no submodule of the requested types ran during {type(module).__name__}'s forward; "
            "check that inputs reach the hidden layers"
        )
    return DormantNeurons(tau=tau, masks=masks)


@dataclass(frozen=True)
class MaskTurnover:
    """How much a sparse topology changed between two snapshots.

    Attributes:
        per_tensor: per fqn, changed entries ``|before xor after|`` over ``nnz(before) + nnz(after)``; with nnz
            preserved (every DST update) this is the fraction of active entries that were replaced.
        n_dropped: entries active before and inactive after, over all tensors.
        n_grown: entries inactive before and active after, over all tensors.
        n_active_before: nnz over all tensors before.
        n_active_after: nnz over all tensors after.
    """

    per_tensor: dict[str, float]
    n_dropped: int
    n_grown: int
    n_active_before: int
    n_active_after: int

    @property
    def total(self) -> float:
        """Turnover over all tensors (0 when nothing was active in either snapshot)."""
        active = self.n_active_before + self.n_active_after
        return (self.n_dropped + self.n_grown) / active if active else 0.0


def mask_turnover(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> MaskTurnover:
    """Compares two ``{fqn: bool mask}`` dicts with the same keys and shapes.

    ``DynamicSparsity.masks`` holds the model's own buffers, which an update overwrites in place: clone them
    before the update (``{k: m.clone() for k, m in engine.masks.items()}``).

    Example:
        >>> before = {"fc.weight": torch.tensor([True, True, False, False])}
        >>> after = {"fc.weight": torch.tensor([True, False, True, False])}
        >>> mask_turnover(before, after).total
        0.5
    """
    for name, masks in (("before", before), ("after", after)):
        if not isinstance(masks, Mapping):
            raise TypeError(f"{name} must be a mapping {{fqn: bool tensor}}, got {type(masks).__name__}")
    if not before:
        raise ValueError("expected at least one mask, got empty dicts")
    if set(before) != set(after):
        missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        raise ValueError(
            f"expected the same fqns before and after, got missing after {missing}, new after {extra}"
        )
    per_tensor: dict[str, float] = {}
    n_dropped = n_grown = n_before = n_after = 0
    for fqn, old in before.items():
        new = after[fqn]
        for name, mask in (("before", old), ("after", new)):
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"{name}[{fqn!r}] must be a torch.bool tensor, got {kind}")
        if old.shape != new.shape:
            raise ValueError(
                f"mask {fqn!r} changed shape: expected {tuple(old.shape)}, got {tuple(new.shape)}"
            )
        new = new.to(old.device)
        dropped, grown = int((old & ~new).sum()), int((new & ~old).sum())
        active_before, active_after = int(old.sum()), int(new.sum())
        denominator = active_before + active_after
        per_tensor[fqn] = (dropped + grown) / denominator if denominator else 0.0
        n_dropped += dropped
        n_grown += grown
        n_before += active_before
        n_after += active_after
    return MaskTurnover(
        per_tensor=per_tensor,
        n_dropped=n_dropped,
        n_grown=n_grown,
        n_active_before=n_before,
        n_active_after=n_after,
    )


@dataclass(frozen=True)
class ShiftRecovery:
    """Returns around one shift between consecutive phases present in the data.

    Attributes:
        phase_before: the phase before the shift.
        phase_after: the phase after it.
        shift_step: env step at which ``phase_after`` began.
        mean_before: mean return of the episodes of ``phase_before``.
        mean_after: mean return of the episodes of ``phase_after``.
        level_before: mean return of the last ``window`` episodes of ``phase_before`` (the pre-shift level).
        target: the moving average that counts as recovered.
        recovery_step: env step (an episode's end) at which the moving average of ``phase_after``'s returns
            first reached ``target``; None if it never did within that phase.
        n_episodes_before: episodes in ``phase_before``.
        n_episodes_after: episodes in ``phase_after``.
    """

    phase_before: int
    phase_after: int
    shift_step: int
    mean_before: float
    mean_after: float
    level_before: float
    target: float
    recovery_step: int | None
    n_episodes_before: int
    n_episodes_after: int

    @property
    def steps_to_recover(self) -> int | None:
        """``recovery_step - shift_step``, or None if the returns never recovered."""
        return None if self.recovery_step is None else self.recovery_step - self.shift_step


def _as_ints(name: str, values: Sequence[int]) -> list[int]:
    out = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}[{index}] must be an integer >= 0, got {value!r}")
        if out and value < out[-1]:
            raise ValueError(
                f"{name} must be non-decreasing, got {value} at {name}[{index}] after {out[-1]}; with several "
                "environment copies, analyse each copy's episodes separately"
            )
        out.append(int(value))
    return out


def shift_recovery(
    returns: Sequence[float],
    steps: Sequence[int],
    phases: Sequence[int],
    *,
    window: int = 10,
    fraction: float = 0.9,
    baseline: float = 0.0,
    shift_steps: Mapping[int, int] | None = None,
) -> list[ShiftRecovery]:
    """Mean return before and after each shift, and the env steps the returns needed to come back.

    The pre-shift level is the mean of the last ``window`` returns of the old phase. After the shift, the moving
    average is the mean of the last ``window`` returns of the new phase (fewer while fewer exist). The returns
    have recovered at the first episode of the new phase whose moving average is at least
    ``target = level_before - (1 - fraction) * |level_before - baseline|``: ``fraction * level_before`` for
    positive returns and ``baseline = 0``; for negative returns (Pendulum) "within ``1 - fraction`` of
    ``|level_before|``"; with ``baseline`` set to a random policy's return, "``fraction`` of the gap closed".

    Args:
        returns: episode returns in the order the episodes ended, ``[E]``.
        steps: the environment's step count at each episode's end (``info["drift_env_step"]``), ``[E]``.
        phases: the drift phase of each episode (``info["drift_phase"]`` at its last step), ``[E]``.
        window: episodes in the moving averages.
        fraction: the share of the pre-shift level that counts as recovered, in ``(0, 1]``.
        baseline: a reference return below good performance (see above).
        shift_steps: ``{phase: env step it began}`` (e.g. from ``DriftSchedule.shift_step``) for every phase
            that follows a shift. By default the end step of the old phase's last episode, which is exact when
            shifts apply at episode boundaries.

    Returns:
        One :class:`ShiftRecovery` per change of phase in ``phases``.

    Example:
        >>> returns = [100, 100, 20, 60, 100, 100]  # moving averages after the shift: 20, 40, 80, 100
        >>> steps = [100, 200, 300, 400, 500, 600]
        >>> result = shift_recovery(returns, steps, [0, 0, 1, 1, 1, 1], window=2)
        >>> result[0].target, result[0].recovery_step, result[0].steps_to_recover
        (90.0, 600, 400)
    """
    if not (len(returns) == len(steps) == len(phases)):
        raise ValueError(
            f"returns, steps and phases must have one entry per episode, got lengths "
            f"{len(returns)}, {len(steps)}, {len(phases)}"
        )
    check_int("window", window, low=1)
    check_number("fraction", fraction, low=0.0, high=1.0, low_open=True)
    check_number("baseline", baseline)
    values = []
    for index, value in enumerate(returns):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"returns[{index}] must be a finite number, got {value!r}")
        values.append(float(value))
    step_list = _as_ints("steps", steps)
    phase_list = _as_ints("phases", phases)

    # Contiguous runs of one phase: (phase, first index, end index).
    segments: list[tuple[int, int, int]] = []
    for index, phase in enumerate(phase_list):
        if segments and segments[-1][0] == phase:
            segments[-1] = (phase, segments[-1][1], index + 1)
        else:
            segments.append((phase, index, index + 1))

    results = []
    for (old_phase, old_start, old_end), (new_phase, new_start, new_end) in itertools.pairwise(segments):
        old_returns, new_returns = values[old_start:old_end], values[new_start:new_end]
        if shift_steps is None:
            shift_step = step_list[old_end - 1]
        else:
            if new_phase not in shift_steps:
                raise ValueError(
                    f"shift_steps has no entry for phase {new_phase}; got phases {sorted(shift_steps)}"
                )
            shift_step = shift_steps[new_phase]
            check_int(f"shift_steps[{new_phase}]", shift_step)
            if shift_step > step_list[new_start]:
                raise ValueError(
                    f"shift_steps[{new_phase}] = {shift_step} is after the end of that phase's first episode "
                    f"(step {step_list[new_start]}); expected a step at or before it"
                )
        tail = old_returns[-window:]
        level = sum(tail) / len(tail)
        target = level - (1.0 - fraction) * abs(level - baseline)
        recovery_step = None
        for offset in range(len(new_returns)):
            recent = new_returns[max(0, offset + 1 - window) : offset + 1]
            if sum(recent) / len(recent) >= target:
                recovery_step = step_list[new_start + offset]
                break
        results.append(
            ShiftRecovery(
                phase_before=old_phase,
                phase_after=new_phase,
                shift_step=int(shift_step),
                mean_before=sum(old_returns) / len(old_returns),
                mean_after=sum(new_returns) / len(new_returns),
                level_before=level,
                target=target,
                recovery_step=recovery_step,
                n_episodes_before=len(old_returns),
                n_episodes_after=len(new_returns),
            )
        )
    return results
