"""PEP: learned soft thresholds find a sparse mask for the embedding tables; the masked tables are then retrained.

PEP (Liu et al., "Learnable Embedding Sizes for Recommender Systems", ICLR 2021) re-parameterises each table
``V`` as ``Ṽ = sign(V) ⊙ ReLU(|V| - g(s))`` with ``g = sigmoid`` and ``s`` a learnable threshold, one per row
(``row``, the paper's "feature-wise", the default here), per dimension (``dimension``) or one for the table
(``global``). Training ``V`` and ``s`` together (the search) zeroes the entries whose magnitude falls below their
threshold, so the tables grow sparser as the thresholds rise. Then, as a lottery ticket, ``V`` is rewound to its
values at step 0, the mask the search found is fixed, and the masked tables are trained again (the retrain).

Here the search runs on the recommender's BPR loss with the run's Adam, learning rate and L2 penalty; the mask is
recorded at the first step at which the tables (users and items counted together) hold at most the target
number of nonzeros, as the official code saves the embedding the first time its parameter count falls to a
candidate size. The retrain is :mod:`~sparseapps.recsys.train`'s ordinary loop with that mask as a static mask of
the core engine, so a PEP run holds exactly the same number of parameters as the other methods at its density:

- a search step that overshoots the target keeps the best pruned entries by ``|V| - g(s)`` to fill the budget;
- a search that has not reached the target when its budget (``search_fraction`` of the planned steps) runs out
  prunes the excess by the smallest ``|Ṽ|``; the results record that it did (``reached_target: false``).

Defaults of the official code (github.com/ssui-liu/learnable-embed-sizes-for-RecSys, ``train_ml-1m.py`` and
``models/pep_embedding.py`` at commit 8f204e9): ``g = sigmoid``, ``threshold_init = -15`` (``-150`` for Criteo),
one Adam over ``V`` and ``s`` with ``weight_decay = 1e-5`` on every parameter, retraining from the saved initial
table (``re_init = False``). Here the thresholds keep that weight decay (it pulls ``s`` toward 0, i.e. ``g(s)``
toward 0.5) while ``V`` keeps the model's own L2 penalty; their Adam uses the run's learning rate. Its scripts use
per-entry thresholds (``feature_dim``); the paper finds feature-wise thresholds best, and those are the default
here. The initial threshold sets how fast and how far the search prunes: -6 had the best ML-100K validation
Recall@20 at density 0.2 of those tried (MF: -15, -10, -6, -5, -4, -3; LightGCN: -15, -6, -3), although only -3
reaches 0.2 by itself there (docs/recsys.md). Not reproduced: the field-wise and per-entry granularities and the CTR models (FM, DeepFM,
AutoInt) and data sets of the paper.

The tables are read by torchrec lookups (and by LightGCN's propagation) straight from their weights, so the
search keeps ``V`` aside, writes ``Ṽ`` into each table's weight after every step, and takes the chain rule through
the soft threshold by hand (:func:`threshold_gradients`), inside the optimizer's step hooks: the training loop
does not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from sparseapps.core.distributions import target_nnz
from sparseapps.core.rules import select_top
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.recsys.data import BPRSampler
from sparseapps.recsys.models import Recommender

Granularity = Literal["row", "dimension", "global"]
GRANULARITIES = ("row", "dimension", "global")
SEARCH_STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PEPConfig:
    """How PEP's threshold search runs.

    Example:
        >>> config = PEPConfig(density=0.2)
        >>> config.granularity, config.threshold_init
        ('row', -6.0)
        >>> PEPConfig(density=0.2, granularity="field")
        Traceback (most recent call last):
        ...
        ValueError: granularity must be one of 'row', 'dimension', 'global', got 'field'
    """

    density: float = field(default=0.2, metadata={"help": "target fraction of table entries kept, in (0, 1]"})
    granularity: Granularity = field(
        default="row",
        metadata={
            "help": "one threshold per row (feature-wise, as the paper's best), per dimension, or global"
        },
    )
    threshold_init: float = field(
        default=-6.0,
        metadata={
            "help": "initial s (g(s) = sigmoid(s) is the threshold); the official ML-1M script uses -15, -6 is "
            "best on ML-100K validation"
        },
    )
    threshold_weight_decay: float = field(
        default=1e-5,
        metadata={
            "help": "L2 weight decay of the thresholds' Adam (the official code's 1e-5 on every parameter); "
            "with s < 0 it pushes every threshold up"
        },
    )
    search_fraction: float = field(
        default=0.5,
        metadata={
            "help": "most steps the search may take, as a fraction of the planned steps; a target not reached "
            "by then is met by pruning the smallest |Ṽ|"
        },
    )

    def __post_init__(self) -> None:
        check_number("density", self.density, low=0.0, high=1.0, low_open=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_number("threshold_init", self.threshold_init)
        check_number("threshold_weight_decay", self.threshold_weight_decay, low=0.0)
        check_number("search_fraction", self.search_fraction, low=0.0, high=1.0, low_open=True)


def threshold_shape(granularity: str, rows: int, dim: int) -> tuple[int, int]:
    """The shape of a ``[rows, dim]`` table's thresholds ``s``: ``[R, 1]``, ``[1, D]`` or ``[1, 1]``.

    Example:
        >>> threshold_shape("row", 5, 8), threshold_shape("dimension", 5, 8), threshold_shape("global", 5, 8)
        ((5, 1), (1, 8), (1, 1))
    """
    check_choice("granularity", granularity, GRANULARITIES)
    return {"row": (rows, 1), "dimension": (1, dim), "global": (1, 1)}[granularity]


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``Ṽ = sign(V) ⊙ ReLU(|V| - sigmoid(s))``.

    Args:
        weight: ``V`` ``[R, D]``.
        threshold: ``s`` broadcastable to ``[R, D]`` (``[R, 1]``, ``[1, D]`` or ``[1, 1]``).

    Returns:
        ``[R, D]``: ``V`` shrunk toward zero by ``sigmoid(s)``, exactly zero where ``|V| <= sigmoid(s)``.

    Example:
        >>> soft_threshold(torch.tensor([[0.75, -0.25, -1.5]]), torch.tensor([[0.0]])).tolist()  # g(0) = 0.5
        [[0.25, -0.0, -1.0]]
    """
    return torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(threshold))


def threshold_gradients(
    weight: torch.Tensor, threshold: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain rule through :func:`soft_threshold`, by hand.

    With ``a = 1[|V| > g(s)]`` and ``G = dL/dṼ``: ``dL/dV = G ⊙ a`` and
    ``dL/ds = -Σ G ⊙ sign(V) ⊙ a ⊙ g'(s)``, the sum over the entries that share a threshold.

    Args:
        weight: ``V`` ``[R, D]``.
        threshold: ``s``, ``[R, 1]``, ``[1, D]`` or ``[1, 1]``.
        grad: ``dL/dṼ`` ``[R, D]``.

    Returns:
        ``(dL/dV [R, D], dL/ds)`` with ``dL/ds`` shaped like ``threshold``.

    Example:
        >>> grad_weight, grad_threshold = threshold_gradients(
        ...     torch.tensor([[0.9, -0.2, -0.7]]), torch.tensor([[0.0]]), torch.tensor([[1.0, 1.0, 2.0]]))
        >>> grad_weight, grad_threshold
        (tensor([[1., 0., 2.]]), tensor([[0.2500]]))
    """
    sigmoid = torch.sigmoid(threshold)
    active = (weight.abs() > sigmoid).to(grad.dtype)
    grad_weight = grad * active
    per_entry = -(grad_weight * torch.sign(weight)) * (sigmoid * (1.0 - sigmoid))
    reduce = [
        dim for dim in range(per_entry.dim()) if threshold.shape[dim] == 1 and per_entry.shape[dim] != 1
    ]
    grad_threshold = per_entry.sum(dim=reduce, keepdim=True) if reduce else per_entry
    return grad_weight, grad_threshold


def keep_largest_margins(
    weights: Mapping[str, torch.Tensor], thresholds: Mapping[str, torch.Tensor], nnz: int
) -> dict[str, torch.Tensor]:
    """Masks ``{name: [R, D] bool}`` that keep the ``nnz`` entries of largest ``|V| - g(s)`` over all tables.

    Entries with a positive margin are those ``Ṽ`` keeps, and their margin is ``|Ṽ|``: with at least ``nnz`` of
    them this keeps the ``nnz`` largest ``|Ṽ|``; with fewer it keeps all of them and the pruned entries nearest
    their thresholds.

    Example:
        >>> masks = keep_largest_margins({"t": torch.tensor([[0.9, -0.2], [0.1, 0.5]])}, {"t": torch.zeros(2, 1)}, 2)
        >>> masks["t"].tolist()
        [[True, False], [False, True]]
    """
    names = list(weights)
    margins = [(weights[name].abs() - torch.sigmoid(thresholds[name])).reshape(-1) for name in names]
    flat = torch.cat(margins)
    if not 0 <= nnz <= flat.numel():
        raise ValueError(f"nnz must be in [0, {flat.numel()}], got {nnz}")
    chosen = select_top(flat, torch.ones_like(flat, dtype=torch.bool), nnz)
    return {
        name: part.reshape(weights[name].shape)
        for name, part in zip(names, chosen.split([m.numel() for m in margins]), strict=True)
    }


class ThresholdSearch:
    """PEP's search on a recommender's tables: ``Ṽ`` in the weights, ``V`` and ``s`` trained through step hooks.

    Construct it after the model and its optimizer. Each ``optimizer.step()`` then updates ``V`` (with the
    optimizer's own rule and state) and ``s`` (with an Adam of its own), writes ``Ṽ`` back into the tables and,
    the first time the tables hold at most the target number of nonzeros, records :attr:`masks`.

    Args:
        model: an MF or LightGCN :class:`Recommender`, freshly initialized (its tables are ``V`` at step 0).
        optimizer: the optimizer of the model's parameters.
        config: a :class:`PEPConfig`.
        lr: the thresholds' Adam learning rate (the official code uses one for ``V`` and ``s``).
        max_steps: the search budget in optimizer steps.

    Example:
        >>> from sparseapps.recsys.models import MatrixFactorization, ModelConfig
        >>> model = MatrixFactorization(6, 10, ModelConfig(dim=8))
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> search = ThresholdSearch(model, optimizer, PEPConfig(density=0.5, threshold_init=-2.0), lr=0.1,
        ...                          max_steps=50)
        >>> search.target_nnz, search.density < 1.0  # sigmoid(-2) = 0.12 already zeroes small entries
        (64, True)
    """

    def __init__(
        self,
        model: Recommender,
        optimizer: torch.optim.Optimizer,
        config: PEPConfig,
        *,
        lr: float,
        max_steps: int,
    ) -> None:
        if not isinstance(model, Recommender):
            raise TypeError(f"model must be a sparseapps.recsys Recommender, got {type(model).__name__}")
        if not isinstance(config, PEPConfig):
            raise TypeError(f"config must be a PEPConfig, got {type(config).__name__}")
        check_number("lr", lr, low=0.0, low_open=True)
        check_int("max_steps", max_steps, low=1)
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.max_steps = max_steps
        self.modules = model.tables.table_modules
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, module in self.modules.items() if id(module.weight) not in owned]
        if missing:
            raise ValueError(f"the optimizer does not hold the weights of these tables: {missing}")
        with torch.no_grad():
            self.initial = {name: module.weight.detach().clone() for name, module in self.modules.items()}
            self.raw = {name: weight.clone() for name, weight in self.initial.items()}
            self.thresholds = {
                name: torch.full(
                    threshold_shape(config.granularity, *weight.shape), float(config.threshold_init)
                ).requires_grad_(True)
                for name, weight in self.initial.items()
            }
        shapes = {name: tuple(weight.shape) for name, weight in self.initial.items()}
        self.target_nnz = sum(target_nnz(shapes, config.density, "uniform").values())
        self.threshold_optimizer = torch.optim.Adam(
            list(self.thresholds.values()), lr=lr, weight_decay=config.threshold_weight_decay
        )
        self.step = 0
        self.masks: dict[str, torch.Tensor] | None = None
        self.outcome: dict[str, Any] = {}
        self._write_thresholded()
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------------ views
    @property
    def numel(self) -> int:
        """Entries of the tables."""
        return sum(weight.numel() for weight in self.raw.values())

    @property
    def nnz(self) -> int:
        """Nonzeros of ``Ṽ`` over the tables."""
        return sum(int(torch.count_nonzero(module.weight)) for module in self.modules.values())

    @property
    def density(self) -> float:
        """Current fraction of nonzeros in ``Ṽ``."""
        return self.nnz / self.numel

    @property
    def done(self) -> bool:
        """Whether the mask is recorded (target reached or budget spent)."""
        return self.masks is not None

    def mean_threshold(self) -> float:
        """Mean of ``g(s)`` over the thresholds of all tables."""
        values = torch.cat([torch.sigmoid(s.detach()).reshape(-1) for s in self.thresholds.values()])
        return float(values.mean())

    # ------------------------------------------------------------------ the reparameterization
    def _write_thresholded(self) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(soft_threshold(self.raw[name], self.thresholds[name]))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Turns the tables' ``dL/dṼ`` into ``dL/dV`` and ``dL/ds``, steps ``s`` and puts ``V`` in the weights."""
        with torch.no_grad():
            for name, module in self.modules.items():
                weight = module.weight
                grad = weight.grad
                if grad is None:
                    grad = torch.zeros_like(weight)
                elif grad.is_sparse:
                    grad = grad.to_dense()
                grad_weight, grad_threshold = threshold_gradients(self.raw[name], self.thresholds[name], grad)
                self.thresholds[name].grad = grad_threshold
                weight.grad = grad_weight
                weight.copy_(self.raw[name])
        self.threshold_optimizer.step()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                self.raw[name].copy_(module.weight)
        self._write_thresholded()
        self.step += 1
        if self.masks is None:
            nnz = self.nnz
            if nnz <= self.target_nnz or self.step >= self.max_steps:
                self._record(nnz)

    def _record(self, nnz: int) -> None:
        thresholds = {name: s.detach() for name, s in self.thresholds.items()}
        self.masks = keep_largest_margins(self.raw, thresholds, self.target_nnz)
        self.outcome = {
            "reached_target": nnz <= self.target_nnz,
            "search_steps": self.step,
            "nnz_found": nnz,
            "refilled": max(self.target_nnz - nnz, 0),
            "pruned_by_magnitude": max(nnz - self.target_nnz, 0),
            "mean_threshold": self.mean_threshold(),
        }

    def detach(self) -> None:
        """Removes the step hooks (the tables keep ``Ṽ``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rewind(self) -> None:
        """Detaches the hooks and puts ``V`` at step 0 back into the tables (the retrain starts from there)."""
        self.detach()
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(self.initial[name])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``V``, ``s``, the thresholds' optimizer, ``V`` at step 0, the step and the recorded mask."""
        return {
            "version": SEARCH_STATE_VERSION,
            "target_nnz": self.target_nnz,
            "max_steps": self.max_steps,
            "step": self.step,
            "raw": {name: weight.clone() for name, weight in self.raw.items()},
            "initial": {name: weight.clone() for name, weight in self.initial.items()},
            "thresholds": {name: s.detach().clone() for name, s in self.thresholds.items()},
            "threshold_optimizer": self.threshold_optimizer.state_dict(),
            "masks": None if self.masks is None else {name: m.clone() for name, m in self.masks.items()},
            "outcome": dict(self.outcome),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; refuses one of another target, budget or table shape."""
        if not isinstance(state, Mapping) or state.get("version") != SEARCH_STATE_VERSION:
            raise ValueError(
                f"expected a ThresholdSearch state of version {SEARCH_STATE_VERSION}, got {state!r:.80}"
            )
        for key, mine in (("target_nnz", self.target_nnz), ("max_steps", self.max_steps)):
            if state[key] != mine:
                raise ValueError(f"the search state has {key}={state[key]}, this search {mine}")
        for name, weight in self.raw.items():
            saved = state["raw"].get(name)
            if saved is None or saved.shape != weight.shape:
                raise ValueError(f"the search state has no table {name!r} of shape {tuple(weight.shape)}")
        with torch.no_grad():
            for name in self.raw:
                self.raw[name].copy_(state["raw"][name])
                self.initial[name].copy_(state["initial"][name])
                self.thresholds[name].copy_(state["thresholds"][name])
        self.threshold_optimizer.load_state_dict(state["threshold_optimizer"])
        self.step = int(state["step"])
        self.masks = None if state["masks"] is None else {k: v.clone() for k, v in state["masks"].items()}
        self.outcome = dict(state["outcome"])
        self._write_thresholded()


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchResult:
    """What :func:`search_masks` returns.

    Attributes:
        done: whether the search has recorded its mask (``False``: stopped by ``stop_after``).
        epochs: search epochs run (the last one may be partial).
        masks: ``{table weight fqn: [R, D] bool}`` for the retrain's static mask (``None`` until done).
        summary: the outcome, the search's per-epoch history and its seconds, for results.json.
    """

    done: bool
    epochs: int
    masks: dict[str, torch.Tensor] | None
    summary: dict[str, Any]


def search_masks(
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    sampler: BPRSampler,
    config: PEPConfig,
    *,
    lr: float,
    reg_weight: float,
    planned_steps: int,
    state: Mapping[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    progress: bool = False,
    description: str = "pep search",
) -> SearchResult:
    """PEP's search: BPR epochs with learned thresholds until the target density, then ``V`` rewound to step 0.

    Args:
        model: a freshly initialized recommender (its tables are rewound to these values at the end).
        optimizer: a fresh optimizer of the model's parameters (used for the search only).
        sampler: the BPR batches.
        config: a :class:`PEPConfig`.
        lr: the thresholds' learning rate.
        reg_weight: the L2 weight of :meth:`Recommender.loss`.
        planned_steps: the run's planned optimizer steps; the search may take ``search_fraction`` of them.
        state: a state written by ``save`` to resume from.
        save: called with the full state after every search epoch and once the mask is recorded.
        stop_after: stop (as if interrupted) once this many search epochs are done.
        evaluate: called once the mask is recorded, with the tables at ``Ṽ`` under that mask (the searched
            model at the target density, before any retraining); its metrics go to the summary as
            ``valid_at_mask``.
        progress: show a tqdm bar.
        description: the bar's label.

    Returns:
        a :class:`SearchResult`; once done the model's tables hold ``V`` at step 0 and no hook is left.
    """
    max_steps = max(1, round(config.search_fraction * planned_steps))
    search = ThresholdSearch(model, optimizer, config, lr=lr, max_steps=max_steps)
    epoch, history, seconds = 0, [], 0.0
    if state is not None:
        search.load_state_dict(state["search"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        epoch, history, seconds = int(state["epoch"]), list(state["history"]), float(state["seconds"])
    fqns = model.tables.table_fqns("tables")

    def full_state() -> dict[str, Any]:
        return {
            "search": search.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "epoch": epoch,
            "history": history,
            "seconds": seconds,
        }

    bar = tqdm(
        total=max_steps,
        initial=search.step,
        disable=not progress,
        desc=description,
        unit="step",
        dynamic_ncols=True,
    )
    while not search.done and (stop_after is None or epoch < stop_after):
        model.train()
        tick, losses = time.perf_counter(), []
        for users, positives, negatives in sampler.iter_epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(users, positives, negatives, reg_weight=reg_weight)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update()
            if search.done:
                break
        seconds += time.perf_counter() - tick
        epoch += 1
        sampler.set_epoch(epoch)
        history.append(
            {
                "epoch": epoch,
                "steps": search.step,
                "loss": sum(losses) / len(losses),
                "density": search.density,
                "mean_threshold": search.mean_threshold(),
            }
        )
        bar.set_postfix(density=f"{search.density:.3f}")
        if save is not None:
            save(full_state())
    bar.close()
    search.detach()
    masks, at_mask = None, {}
    if search.masks is not None:
        masks = {fqns[name]: mask.clone() for name, mask in search.masks.items()}
        if evaluate is not None:
            with torch.no_grad():
                for name, module in search.modules.items():
                    module.weight.mul_(search.masks[name])
            at_mask = {"valid_at_mask": evaluate()}
        search.rewind()
    summary = {
        **{item.name: getattr(config, item.name) for item in fields(config) if item.name != "density"},
        "target_nnz": search.target_nnz,
        "max_search_steps": max_steps,
        **search.outcome,
        "search_epochs": epoch,
        "search_seconds": seconds,
        "search_history": history,
        **at_mask,
    }
    return SearchResult(done=search.done, epochs=epoch, masks=masks, summary=summary)
