"""Masks learned through the straight-through estimator over dense weights: Top-KAST, CS, SR-STE, soft movement.

These methods keep every weight ``theta`` dense and learn which ones the forward pass uses. They run on the one
engine: ``DynamicSparsity(model, optimizer, SparsityConfig.preset("topkast", sparsity=0.9), total_steps)`` in the
same training loop as every other method; the engine hands its optimizer hooks to :class:`LearnedMasks`.

- **Top-KAST** (Jayakumar et al., NeurIPS 2020): the forward set ``A`` is the top ``D`` (density) of ``|theta|`` per
  tensor, the backward set ``B`` the top ``D + M``; the loss's gradient at ``theta * A`` reaches ``theta`` on ``B``
  only (the others are not updated at all), plus the exploration penalty's, the gradient of
  ``penalty / 2 * (sum_A theta^2 + sum_{B \\ A} theta^2 / D)``. Both sets are recomputed from ``|theta|`` every
  ``update_interval`` steps.
- **SR-STE** (Zhou et al., ICLR 2021): an N:M mask (``n_m``) recomputed from ``|theta|``; the gradient at the
  masked weights is passed straight through to ``theta``, plus the sparse-refined term
  ``refine_decay * (1 - mask) * theta``.
- **Continuous sparsification** (Savarese et al., NeurIPS 2020): ``W = theta * sigmoid(beta * s) / sigmoid(s_0)``
  with a learned score ``s`` per weight (``s_0 = gate_init``; the factor makes the first forward the dense one, as
  the official code does) and the L1 penalty ``gate_penalty * sum(sigmoid(beta * s))``. ``total_steps`` is split
  into ``gate_rounds`` search rounds and one ticket round of equal length (the last takes the remainder); within a
  round ``beta`` grows exponentially from 1 to ``gate_temperature``; between search rounds ``s <- min(beta * s,
  s_0)``. After the last search round the ticket is the top of ``s`` to the configured sparsity per tensor (the
  paper's ``s > 0`` reaches a sparsity set by ``gate_penalty`` and ``s_0`` instead; its density is kept in
  :attr:`LearnedMasks.natural_density`), the weights are rewound to step ``rewind_step`` and the ticket trains
  with the hard mask.

- **Soft movement pruning** (Sanh et al., NeurIPS 2020): a score ``S`` per weight, starting at 0 and trained by the
  optimizer (a group without weight decay) with the straight-through gradient ``dL/dS = dL/dW * theta`` plus the
  L1 penalty ``score_penalty * sigmoid(S)`` (per tensor its mean, averaged over tensors); only active weights are
  trained. The mask is one threshold on ``S`` over all tensors (each tensor's sparsity is learned), set every
  ``update_interval`` steps to keep the density of GMP's cubic schedule between ``start_fraction`` and
  ``end_fraction`` (the paper tunes the penalty to reach a sparsity; here the configured one is reached exactly).
  Masked weights keep their values and come back when their scores rise above the threshold again.

- **Edge-popup** (Ramanujan et al., CVPR 2020): the weights are drawn once as signed constants ``±sqrt(2 / fan_in)``
  and never trained; a score per weight (Kaiming-uniform initialization, as the official code) is trained by the
  optimizer with the straight-through gradient ``dL/dW * theta * sign(s)``, and the mask is the top ``density`` of ``|scores|``
  per tensor, every ``update_interval`` steps. Other parameters (biases, norms) train as usual; the standalone
  :mod:`sparseapps.core.supermask` freezes the whole model and adds WANN's shared-weight evaluation.

How it runs: between optimizer steps a sparse weight holds what the forward pass uses (``theta * mask``; the soft
gates during CS's search) and :class:`LearnedMasks` holds ``theta``. Before each ``optimizer.step()`` the weight's
gradient (the loss's gradient at the weight the forward pass used) is turned into ``theta``'s (the functions below)
and the weight is set to ``theta``, so the optimizer steps ``theta``; after it ``theta`` is read back, the masks are
recomputed and the weight is set to the forward weight again. So ``model.state_dict()`` keys do not change, every
reader of the weight (a forward hook, a propagation that reads the table, ``condense``, the accounting) sees the
masked weight, and ``theta`` and the gate scores travel in the engine's ``state_dict``. CS's gate scores are
trained by the user's optimizer, in a parameter group the engine adds (no weight decay). ``finalize()`` ends the
learning: the masks stay fixed and the weights are ``theta * mask`` (CS mid-search takes its ticket there).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseapps.core import DynamicSparsity, SparsityConfig
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> engine = DynamicSparsity(model, optimizer, SparsityConfig.preset("topkast", sparsity=0.75, seed=0),
    ...                          total_steps=10)
    >>> model(torch.randn(5, 8)).sum().backward(); optimizer.step()
    >>> [int(m.sum()) for m in engine.masks.values()]          # a quarter of 8 * 16 and of 16 * 4
    [32, 16]
    >>> bool((model[0].weight[~engine.masks["0.weight"]] == 0).all())   # the weight holds theta * mask
    True
    >>> engine.finalize()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparseapps.core import nm, rules, schedules
from sparseapps.core.config import LEARNED_METHODS, SparsityConfig
from sparseapps.core.selection import SparseTensor

__all__ = [
    "LearnedMasks",
    "exploration_loss",
    "gate",
    "gate_gradients",
    "gate_loss",
    "global_top",
    "signed_constant",
    "soft_movement_gradients",
    "sr_ste_gradient",
    "temperature",
    "top_magnitude",
    "topkast_gradient",
]


# ---------------------------------------------------------------------------------------------- pure functions
def top_magnitude(theta: torch.Tensor, n: int) -> torch.Tensor:
    """``[*S] -> [*S]`` bool mask of the ``n`` largest ``|theta|`` (ties to the lower flat position).

    Example:
        >>> top_magnitude(torch.tensor([0.5, -2.0, 0.1, 1.0]), 2)
        tensor([False,  True, False,  True])
    """
    everywhere = torch.ones_like(theta, dtype=torch.bool)
    return rules.select_top(theta.detach().abs(), everywhere, n, available=theta.numel())


def topkast_gradient(
    grad: torch.Tensor,
    theta: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    penalty: float,
    density: float,
) -> torch.Tensor:
    """Top-KAST's gradient of ``theta`` from ``grad``, the loss's gradient at ``theta * forward``.

    ``grad * backward`` (straight through, on the backward set only) plus the gradient of :func:`exploration_loss`:
    ``penalty * theta`` on ``forward``, ``penalty * theta / density`` on ``backward & ~forward``. All ``[*S]``.

    Example:
        >>> theta = torch.tensor([3.0, -2.0, 1.0, 0.5])
        >>> forward, backward = torch.tensor([1, 0, 0, 0]).bool(), torch.tensor([1, 1, 0, 0]).bool()
        >>> topkast_gradient(torch.ones(4), theta, forward, backward, penalty=0.1, density=0.25)
        tensor([1.3000, 0.2000, 0.0000, 0.0000])
    """
    scale = forward.to(theta.dtype) + (backward & ~forward).to(theta.dtype) / density
    return grad * backward.to(grad.dtype) + penalty * scale * theta


def exploration_loss(
    theta: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, penalty: float, density: float
) -> torch.Tensor:
    """Top-KAST's exploration penalty ``penalty / 2 * (sum_A theta^2 + sum_{B \\ A} theta^2 / density)``, a scalar.

    Example:
        >>> theta = torch.tensor([3.0, -2.0, 1.0])
        >>> round(float(exploration_loss(theta, torch.tensor([1, 0, 0]).bool(), torch.tensor([1, 1, 0]).bool(), 0.1, 0.5)), 6)
        0.85
    """
    scale = forward.to(theta.dtype) + (backward & ~forward).to(theta.dtype) / density
    return 0.5 * penalty * (scale * theta.square()).sum()


def sr_ste_gradient(
    grad: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor, decay: float
) -> torch.Tensor:
    """SR-STE's gradient of ``theta``: ``grad`` (at ``theta * mask``, straight through) ``+ decay * (1 - mask) * theta``.

    Example:
        >>> sr_ste_gradient(torch.ones(4), torch.tensor([4.0, -2.0, 1.0, 3.0]), torch.tensor([1, 0, 0, 1]).bool(), 0.5)
        tensor([1.0000, 0.0000, 1.5000, 1.0000])
    """
    return grad + decay * (~mask).to(theta.dtype) * theta


def gate(scores: torch.Tensor, beta: float, init: float) -> torch.Tensor:
    """Continuous sparsification's soft mask ``sigmoid(beta * s) / sigmoid(init)`` (1 where ``s = init``, ``beta = 1``).

    Example:
        >>> gate(torch.tensor([0.0, 1.0, -1.0]), beta=1.0, init=0.0)
        tensor([1.0000, 1.4621, 0.5379])
    """
    return torch.sigmoid(beta * scores) / _sigmoid(init)


def gate_loss(scores: torch.Tensor, beta: float, penalty: float) -> torch.Tensor:
    """Continuous sparsification's L1 penalty ``penalty * sum(sigmoid(beta * s))`` (the gates are positive), a scalar.

    Example:
        >>> float(gate_loss(torch.zeros(4), beta=1.0, penalty=0.5))
        1.0
    """
    return penalty * torch.sigmoid(beta * scores).sum()


def gate_gradients(
    grad: torch.Tensor, theta: torch.Tensor, scores: torch.Tensor, beta: float, init: float, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``theta`` and ``s`` from ``grad``, the loss's gradient at ``W = theta * gate(s)``, with
    :func:`gate_loss`'s added: ``(grad * gate, (grad * theta / sigmoid(init) + penalty) * beta * sigma * (1 - sigma))``
    with ``sigma = sigmoid(beta * s)``. All ``[*S]``.

    Example:
        >>> g_theta, g_s = gate_gradients(torch.ones(2), torch.tensor([2.0, -1.0]), torch.zeros(2), 1.0, 0.0, 0.0)
        >>> g_theta, g_s
        (tensor([1., 1.]), tensor([ 1.0000, -0.5000]))
    """
    sigma = torch.sigmoid(beta * scores)
    grad_theta = grad * sigma / _sigmoid(init)
    grad_scores = (grad * theta / _sigmoid(init) + penalty) * beta * sigma * (1.0 - sigma)
    return grad_theta, grad_scores


def soft_movement_gradients(
    grad: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft movement pruning's gradients from ``grad``, the loss's gradient at ``W = theta * mask``: ``theta`` gets
    ``grad * mask`` (masked weights are not trained), the scores the straight-through ``grad * theta`` plus the
    penalty's ``penalty * sigma * (1 - sigma)``, ``sigma = sigmoid(scores)`` (the gradient of ``penalty *
    sum(sigmoid(scores))``). All ``[*S]``.

    Example:
        >>> g_theta, g_s = soft_movement_gradients(torch.ones(2), torch.tensor([2.0, -1.0]),
        ...                                        torch.tensor([True, False]), torch.zeros(2), 4.0)
        >>> g_theta, g_s
        (tensor([1., 0.]), tensor([3., 0.]))
    """
    sigma = torch.sigmoid(scores)
    return grad * mask, grad * theta + penalty * sigma * (1.0 - sigma)


def signed_constant(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Edge-popup's frozen weights: ``±sqrt(2 / fan_in)`` with random signs (Ramanujan et al.'s best init).

    Example:
        >>> w = signed_constant(torch.empty(3, 8), torch.Generator().manual_seed(0))
        >>> sorted(set(w.abs().reshape(-1).tolist())) == [0.5]
        True
    """
    fan_in = weight[0].numel()
    signs = torch.randint(0, 2, weight.shape, generator=generator).to(weight.dtype) * 2 - 1
    return (signs * math.sqrt(2.0 / fan_in)).to(weight.device)


def global_top(scores: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Bool masks of the ``n`` highest scores over all tensors together (one threshold; ties to the earlier tensor
    and lower position).

    Example:
        >>> masks = global_top({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0, 2.0, -1.0])}, 3)
        >>> {k: v.tolist() for k, v in masks.items()}
        {'a': [True, False], 'b': [True, True, False]}
    """
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])
    chosen = rules.select_top(flat, torch.ones_like(flat, dtype=torch.bool), n)
    masks, offset = {}, 0
    for fqn, s in scores.items():
        masks[fqn] = chosen[offset : offset + s.numel()].view_as(s).to(s.device)
        offset += s.numel()
    return masks


def temperature(step_in_round: int, round_steps: int, final: float) -> float:
    """``beta`` of the ``step_in_round``-th step (0-based) of a round of ``round_steps``: ``final ** (t / (L - 1))``,
    1 at the first step and ``final`` at the last (exponential, as the paper's per-epoch schedule).

    Example:
        >>> [temperature(t, 3, 100.0) for t in range(3)]
        [1.0, 10.0, 100.0]
    """
    if round_steps <= 1:
        return float(final)
    return float(final) ** (min(step_in_round, round_steps - 1) / (round_steps - 1))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- the engine's delegate
class LearnedMasks:
    """The per-step work of ``method`` ``topkast``, ``cs`` and ``sr_ste`` for a :class:`~sparseapps.core.DynamicSparsity`.

    The engine builds it before its masks (it reads the initial weights), takes :meth:`initial_masks`, calls
    :meth:`bind` with its records, then :meth:`before_step` / :meth:`after_step` from its optimizer hooks. Not meant to
    be built by users; see the module docstring for the methods and an example.

    Args:
        config: the engine's config (``config.method`` in ``LEARNED_METHODS``).
        optimizer: the engine's optimizer (CS adds its gate scores to it as a parameter group).
        weights: ``{fqn: parameter}`` the selected weights, in selection order.
        budgets: ``{fqn: nnz}`` each tensor's forward budget.
        total_steps: the engine's.

    Attributes:
        theta: ``{fqn: [*S]}`` the dense weights.
        backward: ``{fqn: [*S] bool}`` Top-KAST's backward sets.
        scores: ``{fqn: [*S]}`` CS's gate scores (parameters of the optimizer's last group).
        natural_density: CS: the density of ``s > 0`` when the ticket was taken (``None`` before).
        finalized: the masks are fixed (:meth:`finalize`, or CS's ticket round).
    """

    def __init__(
        self,
        config: SparsityConfig,
        optimizer: torch.optim.Optimizer,
        weights: Mapping[str, nn.Parameter],
        budgets: Mapping[str, int],
        total_steps: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if config.method not in LEARNED_METHODS:
            raise ValueError(f"expected a method among {LEARNED_METHODS}, got {config.method!r}")
        self.config = config
        self.method = config.method
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.budgets = dict(budgets)
        self.theta = {fqn: p.detach().clone() for fqn, p in weights.items()}
        self.backward: dict[str, torch.Tensor] = {}
        self.scores: dict[str, nn.Parameter] = {}
        self.rewind: dict[str, torch.Tensor] | None = None
        self.natural_density: float | None = None
        self.finalized = False
        self._records: dict[str, SparseTensor] = {}
        for fqn, p in weights.items():
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"method {self.method!r} needs dense gradients; {fqn!r} has a sparse one")
        if self.method == "edge_popup":
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            self.theta = {fqn: signed_constant(p.detach(), generator) for fqn, p in weights.items()}
        if self.method in ("cs", "soft_movement", "edge_popup"):  # scores trained by the user's optimizer
            init = config.gate_init if self.method == "cs" else 0.0
            self.scores = {fqn: nn.Parameter(torch.full_like(p.detach(), init)) for fqn, p in weights.items()}
            if self.method == "edge_popup":  # the official code's score initialization
                for score in self.scores.values():
                    nn.init.kaiming_uniform_(score, a=math.sqrt(5), generator=generator)
            group: dict[str, Any] = {"params": list(self.scores.values())}
            if "weight_decay" in optimizer.defaults:
                group["weight_decay"] = 0.0
            optimizer.add_param_group(group)
        if self.method == "soft_movement":
            # Sanh et al.'s penalty: the mean of sigmoid(S) per tensor, averaged over the tensors.
            self.penalty = {
                fqn: config.score_penalty / (p.numel() * len(weights)) for fqn, p in weights.items()
            }
            self.total_budget = sum(self.budgets.values())
        if self.method == "cs":
            self.round_steps = total_steps // (config.gate_rounds + 1)
            if self.round_steps < 1:
                raise ValueError(
                    f"method 'cs' splits total_steps into gate_rounds + 1 = {config.gate_rounds + 1} rounds, got "
                    f"total_steps={total_steps}"
                )
            if config.rewind_step >= self.round_steps:
                raise ValueError(
                    f"method 'cs' rewinds to a step of its first round (0 .. {self.round_steps - 1}), got "
                    f"rewind_step={config.rewind_step}"
                )
            if config.rewind_step == 0:
                self.rewind = {fqn: t.clone() for fqn, t in self.theta.items()}

    # ------------------------------------------------------------------ setup
    def initial_masks(self) -> dict[str, torch.Tensor]:
        """The forward masks before the first step: from ``|theta|`` (Top-KAST, SR-STE), all ones (CS's search)."""
        masks = {}
        for fqn, theta in self.theta.items():
            if self.method in ("cs", "soft_movement"):  # dense until the search / the schedule starts
                masks[fqn] = torch.ones_like(theta, dtype=torch.bool)
            else:
                masks[fqn] = self._masks_of(fqn, theta)
        return masks

    def bind(self, records: Mapping[str, SparseTensor]) -> None:
        """Takes the engine's records (whose mask buffers hold :meth:`initial_masks`) and writes the forward weights."""
        self._records = dict(records)
        self._write_weights(0)

    def _masks_of(self, fqn: str, theta: torch.Tensor) -> torch.Tensor:
        """The forward mask of ``theta`` (and, Top-KAST, its backward set into :attr:`backward`)."""
        if self.method == "edge_popup":  # the top of |scores|; theta is frozen
            return top_magnitude(self.scores[fqn].detach(), self.budgets[fqn])
        if self.method == "sr_ste":
            n, m = self.config.n_m  # type: ignore[misc]
            return nm.top_n_of_m(theta.abs(), n, m)
        budget = self.budgets[fqn]
        extra = round(self.config.backward_extra_density * theta.numel())
        self.backward[fqn] = top_magnitude(theta, min(theta.numel(), budget + extra))
        return top_magnitude(theta, budget)

    # ------------------------------------------------------------------ CS's rounds
    def _searching(self, step: int) -> bool:
        """Whether CS's step ``step + 1`` (``step`` steps done) is a search step."""
        return (
            self.method == "cs" and not self.finalized and step < self.config.gate_rounds * self.round_steps
        )

    def beta(self, step: int) -> float:
        """CS's temperature for the forward passes after ``step`` steps."""
        return temperature(step % self.round_steps, self.round_steps, self.config.gate_temperature)

    # ------------------------------------------------------------------ the hooks
    def before_step(self, step: int) -> None:
        """Turns each weight's gradient into ``theta``'s and puts ``theta`` in the weight (``step`` steps done)."""
        config = self.config
        searching = self._searching(step)
        beta = self.beta(step) if searching else 1.0
        with torch.no_grad():
            for fqn, t in self._records.items():
                param, theta, grad = t.param, self.theta[fqn], t.param.grad
                if grad is not None and grad.is_sparse:
                    raise ValueError(
                        f"method {self.method!r} needs dense gradients; {fqn!r} has a sparse one"
                    )
                if self.finalized or (self.method == "cs" and not searching):
                    if grad is not None:
                        grad.mul_(t.mask)
                    continue
                if grad is not None:
                    if self.method == "topkast":
                        new = topkast_gradient(
                            grad,
                            theta,
                            t.mask,
                            self.backward[fqn],
                            config.exploration_penalty,
                            self._density(fqn),
                        )
                    elif self.method == "sr_ste":
                        new = sr_ste_gradient(grad, theta, t.mask, config.refine_decay)
                    elif self.method == "edge_popup":
                        scores = self.scores[fqn]
                        # straight through the top-k of |scores| (the official code ranks scores.abs())
                        scores.grad = grad * theta * torch.sign(scores.detach())
                        new = torch.zeros_like(grad)  # the weights stay as drawn
                    elif self.method == "soft_movement":
                        scores = self.scores[fqn]
                        new, scores.grad = soft_movement_gradients(
                            grad, theta, t.mask, scores.detach(), self.penalty[fqn]
                        )
                    else:
                        scores = self.scores[fqn]
                        new, scores_grad = gate_gradients(
                            grad, theta, scores.detach(), beta, config.gate_init, config.gate_penalty
                        )
                        scores.grad = scores_grad
                    grad.copy_(new)
                param.copy_(theta)

    def after_step(self, step: int) -> None:
        """Reads ``theta`` back from the weights, recomputes the masks (or CS's rounds) and writes the forward
        weights (``step`` steps done, this one included)."""
        config = self.config
        with torch.no_grad():
            for fqn, t in self._records.items():
                theta, param = self.theta[fqn], t.param.detach()
                if self.finalized or (self.method == "cs" and step > config.gate_rounds * self.round_steps):
                    param.mul_(t.mask)
                    theta.copy_(param)
                elif self.method == "topkast":  # entries outside the backward set are not updated
                    theta.copy_(torch.where(self.backward[fqn], param, theta))
                elif self.method == "edge_popup":  # frozen: no optimizer or weight decay moves them
                    pass
                elif self.method == "soft_movement":  # masked weights are kept as they are
                    theta.copy_(torch.where(t.mask, param, theta))
                else:
                    theta.copy_(param)
            if self.method == "cs":
                self._after_cs_step(step)
            elif self.method == "soft_movement":
                if not self.finalized and self._is_mask_update(step):
                    self._soft_movement_masks(step)
            elif not self.finalized and self._is_mask_update(step):
                for fqn, t in self._records.items():
                    t.mask.copy_(self._masks_of(fqn, self.theta[fqn]))
        self._write_weights(step)

    def _soft_movement_masks(self, step: int) -> None:
        """One threshold on the scores of all tensors, keeping the density of GMP's cubic schedule at ``step``."""
        total = sum(t.numel() for t in self.theta.values())
        sparsity = schedules.gmp_sparsity(
            step, 1.0 - self.total_budget / total, self.config, self.total_steps
        )
        keep = max(self.total_budget, round((1.0 - sparsity) * total))
        for fqn, mask in global_top(self.scores, keep).items():
            self._records[fqn].mask.copy_(mask)

    def _is_mask_update(self, step: int) -> bool:
        start = math.floor(self.config.start_fraction * self.total_steps)
        end = math.floor(self.config.end_fraction * self.total_steps)
        return start <= step <= end and step % self.config.update_interval == 0

    def _after_cs_step(self, step: int) -> None:
        config = self.config
        if self.rewind is None and step == config.rewind_step:
            self.rewind = {fqn: t.clone() for fqn, t in self.theta.items()}
        if self.finalized or step % self.round_steps or step > config.gate_rounds * self.round_steps:
            return
        if step < config.gate_rounds * self.round_steps:  # end of a search round
            beta = self.beta(step - 1)
            for scores in self.scores.values():
                scores.clamp_(max=config.gate_init / beta).mul_(beta)  # s <- min(beta * s, s_0)
            return
        self._take_ticket()  # the end of the search: hard masks, weights rewound
        assert self.rewind is not None
        for fqn, t in self._records.items():
            self.theta[fqn].copy_(self.rewind[fqn])
            for value in self.optimizer.state.get(t.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == t.param.shape:
                    value.zero_()

    def _take_ticket(self) -> None:
        """CS: each tensor's mask becomes the top of its scores to its budget; records ``s > 0``'s density."""
        positive = sum(int(torch.count_nonzero(s > 0)) for s in self.scores.values())
        self.natural_density = positive / sum(s.numel() for s in self.scores.values())
        for fqn, t in self._records.items():
            everywhere = torch.ones_like(t.mask)
            t.mask.copy_(rules.select_top(self.scores[fqn].detach(), everywhere, self.budgets[fqn]))

    def _density(self, fqn: str) -> float:
        return self.budgets[fqn] / self.theta[fqn].numel()

    def _write_weights(self, step: int) -> None:
        """The forward weights: ``theta * mask``, or ``theta * gate(s)`` during CS's search."""
        searching = self._searching(step)
        with torch.no_grad():
            for fqn, t in self._records.items():
                theta = self.theta[fqn]
                if searching:
                    soft = gate(self.scores[fqn].detach(), self.beta(step), self.config.gate_init)
                    t.param.copy_(theta * soft.to(theta.dtype))
                else:
                    t.param.copy_(theta * t.mask)

    def finalize(self) -> None:
        """Fixes the masks (CS mid-search takes its ticket now, without rewinding) and sets every weight to
        ``theta * mask``; later steps train the masked weights as a fixed mask does."""
        if self.method == "cs" and not self.finalized and self.natural_density is None:
            self._take_ticket()
        self.finalized = True
        self._write_weights(0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``theta``, the backward sets, the gate scores, the rewind point and the phase (the masks are the engine's)."""
        return {
            "method": self.method,
            "theta": {fqn: t.cpu().clone() for fqn, t in self.theta.items()},
            "backward": {fqn: m.cpu().clone() for fqn, m in self.backward.items()},
            "scores": {fqn: s.detach().cpu().clone() for fqn, s in self.scores.items()},
            "rewind": None
            if self.rewind is None
            else {fqn: t.cpu().clone() for fqn, t in self.rewind.items()},
            "natural_density": self.natural_density,
            "finalized": self.finalized,
        }

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        """Restores :meth:`state_dict` (after the engine restored its masks and ``step``) and rewrites the weights."""
        if not isinstance(state, Mapping) or state.get("method") != self.method:
            got = state.get("method") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected the learned-mask state of method {self.method!r}, got {got!r}")
        if set(state["theta"]) != set(self.theta):
            raise ValueError(
                f"checkpoint theta names {sorted(state['theta'])}, the sparse tensors {sorted(self.theta)}"
            )
        with torch.no_grad():
            for fqn, theta in self.theta.items():
                theta.copy_(state["theta"][fqn])
            self.backward = {
                fqn: m.to(self.theta[fqn].device).clone() for fqn, m in state["backward"].items()
            }
            for fqn, scores in self.scores.items():
                scores.copy_(state["scores"][fqn])
        rewind = state["rewind"]
        self.rewind = (
            None
            if rewind is None
            else {fqn: t.to(self.theta[fqn].device).clone() for fqn, t in rewind.items()}
        )
        self.natural_density = state["natural_density"]
        self.finalized = bool(state["finalized"])
        self._write_weights(step)
