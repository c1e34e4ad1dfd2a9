"""The score registry: every drop and grow criterion of the package, by name, built in or registered by a user.

A criterion is a function of a :class:`ScoreContext` that returns one float score per entry of the tensor
(``[*S]``, the weight's shape); higher means more worth keeping (drop) or adding (grow). The engine drops the
lowest-scoring active entries and grows the highest-scoring inactive ones (``rules.update_masks``). The names
registered here are the only names :class:`~sparseapps.core.SparsityConfig` accepts for ``drop`` and ``grow``, and
every domain (core engine, RL callback, continual isolation, DSL embeddings) looks criteria up here.

Example:
    >>> import torch
    >>> from sparseapps.core import SparsityConfig, scores
    >>> @scores.register_grow("example_gradient_times_two", needs=("grad",))
    ... def _example(ctx: scores.ScoreContext) -> torch.Tensor:
    ...     return 2 * ctx.grad.abs()
    >>> SparsityConfig.preset("rigl", sparsity=0.9, grow="example_gradient_times_two").grow
    'example_gradient_times_two'
    >>> "example_gradient_times_two" in scores.grow_names()
    True
    >>> scores.unregister("grow", "example_gradient_times_two")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from sparseapps.core import scoring

__all__ = [
    "NEEDS",
    "Criterion",
    "EntryContext",
    "ScoreContext",
    "compute",
    "compute_on_entries",
    "drop_names",
    "get",
    "grow_names",
    "register_drop",
    "register_grow",
    "unregister",
]

Kind = Literal["drop", "grow"]
# What a criterion may read beyond the weight and the mask; the engine collects only what the configured
# criteria declare: "grad" (the dense gradient of the update step, captured only then), "momentum" (an
# exponential average of dense gradients, tracked every step), "ever_active" (entries active at any time so far),
# "activations" (a Linear/Conv layer's inputs and outputs of the step before the update), and the traces
# "movement" (-sum over steps of g * w, movement pruning) and "grad_squared" (an exponential average of g * g, the
# diagonal empirical Fisher of OBD), "magnitude_average" (an exponential average of |w|, momentum-based
# pruning) and "last_magnitude" (|w| of each entry when it was last active: magnitude-based regrowth), each updated
# every step (the first two from the dense gradient).
NEEDS = frozenset(
    {
        "grad",
        "momentum",
        "ever_active",
        "activations",
        "movement",
        "grad_squared",
        "magnitude_average",
        "last_magnitude",
    }
)
# Needs that are dense per-entry state updated every step (so masked storage only, and not in row mode).
EVERY_STEP = frozenset({"momentum", "movement", "grad_squared", "magnitude_average", "last_magnitude"})
TRACES = ("movement", "grad_squared", "magnitude_average", "last_magnitude")


@dataclass(frozen=True, kw_only=True)
class ScoreContext:
    """What a criterion sees of one tensor at a topology update.

    Attributes:
        fqn: the parameter's fully qualified name, e.g. ``"0.weight"``.
        weight: ``[*S]`` the parameter (detached; do not modify).
        mask: ``[*S]`` bool, the active entries before the update.
        step: the optimizer step of the update.
        generator: the engine's CPU generator (draw from it for randomness, so runs are reproducible).
        grad: ``[*S]`` the dense gradient of this step, masked entries included (``"grad"`` in needs).
        momentum: ``[*S]`` the exponential average of dense gradients (``"momentum"`` in needs).
        ever_active: ``[*S]`` bool, entries active at any time so far (``"ever_active"`` in needs).
        activations: ``([B, in, ...], [B, out, ...])`` the layer's inputs and outputs (``"activations"``).
        movement: ``[*S]`` ``-sum_t g_t * w_t`` over the steps so far (``"movement"`` in needs).
        grad_squared: ``[*S]`` the exponential average of ``g * g`` (``"grad_squared"`` in needs).
        magnitude_average: ``[*S]`` the exponential average of ``|w|`` (``"magnitude_average"`` in needs).
        last_magnitude: ``[*S]`` ``|w|`` of each entry at the last step it was active, 0 if never
            (``"last_magnitude"`` in needs).
    """

    fqn: str
    weight: torch.Tensor
    mask: torch.Tensor
    step: int
    generator: torch.Generator
    grad: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    ever_active: torch.Tensor | None = None
    activations: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    movement: torch.Tensor | None = None
    grad_squared: torch.Tensor | None = None
    magnitude_average: torch.Tensor | None = None
    last_magnitude: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class EntryContext:
    """What a criterion's entry form sees of a compact tensor: its active entries only.

    Attributes:
        values: ``[nnz]`` the active weights (detached; do not modify), in ascending position.
        positions: ``[nnz]`` int64 their row-major positions in the dense shape.
        numel: the dense tensor's number of entries.
        generator: the engine's CPU generator.
    """

    values: torch.Tensor
    positions: torch.Tensor
    numel: int
    generator: torch.Generator


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its function, what it reads, and whether ties are broken by noise.

    Built-in criteria also carry the forms a compact tensor's update uses without dense tensors: ``on_entries``
    (drop) returns the function's scores at the active entries (the inactive ones must score 0 or be ignored by
    the tie-noise scale, as ``|w|``), and ``fused`` (grow) names the compiled growth scan that computes the
    function's scores of the inactive entries on the fly (``"gradient"``: ``|g|``; ``"random"``: a uniform draw).
    A criterion registered by a user has neither, and compact tensors then take the dense-view path.
    """

    name: str
    kind: Kind
    function: Callable[[ScoreContext], torch.Tensor]
    needs: frozenset[str]
    tie_noise: bool
    on_entries: Callable[[EntryContext], torch.Tensor] | None = None
    fused: Literal["gradient", "random"] | None = None


_REGISTRY: dict[Kind, dict[str, Criterion]] = {"drop": {}, "grow": {}}


def _register(
    kind: Kind, name: str, needs: Iterable[str], tie_noise: bool, replace: bool
) -> Callable[[Callable[[ScoreContext], torch.Tensor]], Callable[[ScoreContext], torch.Tensor]]:
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"a criterion name must be a non-empty string other than 'none', got {name!r}")
    needs = frozenset(needs)
    unknown = sorted(needs - NEEDS)
    if unknown:
        raise ValueError(f"needs must be a subset of {sorted(NEEDS)}, got unknown {unknown}")
    if name in _REGISTRY[kind] and not replace:
        raise ValueError(
            f"a {kind} criterion named {name!r} is already registered; pass replace=True to replace it"
        )

    def decorate(function: Callable[[ScoreContext], torch.Tensor]) -> Callable[[ScoreContext], torch.Tensor]:
        if not callable(function):
            raise TypeError(f"expected a function of a ScoreContext, got {type(function).__name__}")
        _REGISTRY[kind][name] = Criterion(name, kind, function, needs, tie_noise)
        return function

    return decorate


def register_drop(
    name: str, *, needs: Iterable[str] = ("grad",), tie_noise: bool = True, replace: bool = False
) -> Callable[[Callable[[ScoreContext], torch.Tensor]], Callable[[ScoreContext], torch.Tensor]]:
    """Registers a drop criterion (a decorator): the lowest-scoring active entries are dropped.

    Args:
        name: the name used in ``SparsityConfig(drop=name)``.
        needs: what the function reads besides weight and mask (a subset of :data:`NEEDS`); the engine collects
            only what is declared, so a criterion that reads ``ctx.grad`` must keep ``"grad"``.
        tie_noise: add the config's ``tie_noise`` to the scores so that ties break at random.
        replace: allow replacing a registered criterion of the same name.
    """
    return _register("drop", name, needs, tie_noise, replace)


def register_grow(
    name: str, *, needs: Iterable[str] = ("grad",), tie_noise: bool = True, replace: bool = False
) -> Callable[[Callable[[ScoreContext], torch.Tensor]], Callable[[ScoreContext], torch.Tensor]]:
    """Registers a grow criterion (a decorator): the highest-scoring inactive entries are grown.

    Arguments as :func:`register_drop`.
    """
    return _register("grow", name, needs, tie_noise, replace)


def unregister(kind: Kind, name: str) -> None:
    """Removes a user-registered criterion (built-in ones cannot be removed)."""
    if name in _BUILT_IN[kind]:
        raise ValueError(f"{name!r} is a built-in {kind} criterion and cannot be removed")
    _REGISTRY[kind].pop(name, None)


def get(kind: Kind, name: str) -> Criterion:
    """The registered criterion ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be 'drop' or 'grow', got {kind!r}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} criterion {name!r}; registered: {', '.join(sorted(_REGISTRY[kind]))} "
            f"(add one with scores.register_{kind})"
        ) from None


def drop_names() -> tuple[str, ...]:
    """Every registered drop criterion, in registration order (built-ins first)."""
    return tuple(_REGISTRY["drop"])


def grow_names() -> tuple[str, ...]:
    """Every registered grow criterion, in registration order (built-ins first)."""
    return tuple(_REGISTRY["grow"])


def compute(criterion: Criterion, context: ScoreContext, tie_noise: float) -> torch.Tensor:
    """The criterion's scores for ``context`` (float, the mask's shape), with tie noise if it takes it.

    Raises:
        ValueError: the function returned another shape, a non-tensor, or NaN scores (named with the tensor).
    """
    scores = criterion.function(context)
    if not isinstance(scores, torch.Tensor) or scores.shape != context.mask.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"{criterion.kind} criterion {criterion.name!r} must return a tensor of shape "
            f"{tuple(context.mask.shape)} for {context.fqn!r}, got {got}"
        )
    # A sum is one fast reduction and NaN whenever a score is; only then (or with infinities) look closer.
    if not bool(torch.isfinite(scores.sum())) and bool(torch.isnan(scores).any()):
        raise ValueError(
            f"{criterion.kind} criterion {criterion.name!r} returned NaN scores for {context.fqn!r}"
        )
    if not criterion.tie_noise:
        return scores
    # Noise goes in place into a criterion's fresh result; a result that is one of the context's tensors (or a
    # view of one) is copied first.
    held = (
        context.weight,
        context.mask,
        context.grad,
        context.momentum,
        context.ever_active,
        context.movement,
        context.grad_squared,
        context.magnitude_average,
        context.last_magnitude,
        *(context.activations or ()),
    )
    storage = scores.untyped_storage().data_ptr()
    fresh = scores.dtype == torch.float32 and all(
        t is None or t.untyped_storage().data_ptr() != storage for t in held
    )
    return scoring.add_tie_noise(scores, tie_noise, context.generator, in_place=fresh)


def compute_on_entries(criterion: Criterion, context: EntryContext, tie_noise: float) -> torch.Tensor:
    """``[nnz]``: what :func:`compute` returns at the active entries, from them alone (``criterion.on_entries``).

    The tie noise is the dense path's: one draw, ``u(seed, position) * scale * max|score|``, where the inactive
    entries' zero scores count in the maximum.

    Raises:
        ValueError: the criterion has no entry form, or the scores are NaN or of the wrong shape.
    """
    if criterion.on_entries is None:
        raise ValueError(f"{criterion.kind} criterion {criterion.name!r} has no form on active entries")
    scores = criterion.on_entries(context)
    if scores.shape != context.values.shape:
        raise ValueError(
            f"{criterion.kind} criterion {criterion.name!r} returned shape {tuple(scores.shape)} on "
            f"{tuple(context.values.shape)} active entries"
        )
    if not bool(torch.isfinite(scores.sum())) and bool(torch.isnan(scores).any()):
        raise ValueError(f"{criterion.kind} criterion {criterion.name!r} returned NaN scores")
    if not criterion.tie_noise or tie_noise <= 0:
        return scores
    return scoring.add_tie_noise_at(
        scores.float().clone(),
        context.positions,
        tie_noise,
        context.generator,
        any_inactive=(context.values.numel() < context.numel),
    )


def _needs_value(context: ScoreContext, name: str) -> torch.Tensor:
    value = getattr(context, name)
    if value is None:
        raise RuntimeError(f"{context.fqn!r}: the criterion needs {name!r}, which was not collected")
    return value


# ---------------------------------------------------------------------------------------------- built-ins
@register_drop("magnitude", needs=())
def _magnitude(ctx: ScoreContext) -> torch.Tensor:
    """``|w|`` (RigL, SNFS, GMP): small weights are dropped first."""
    return scoring.magnitude(ctx.weight)


@register_drop("signed_magnitude", needs=(), tie_noise=False)
def _signed_magnitude(ctx: ScoreContext) -> torch.Tensor:
    """SET: the smallest positive and the largest negative weights, in turns."""
    return scoring.signed_magnitude(ctx.weight, ctx.mask)


@register_drop("random", needs=(), tie_noise=False)
def _random_drop(ctx: ScoreContext) -> torch.Tensor:
    return scoring.uniform_like(ctx.mask, ctx.generator)


@register_drop("weight_gradient", needs=("grad",))
def _weight_gradient(ctx: ScoreContext) -> torch.Tensor:
    """``|w * g|``, the first-order saliency."""
    return scoring.weight_gradient(ctx.weight, _needs_value(ctx, "grad"))


@register_grow("random", needs=(), tie_noise=False)
def _random_grow(ctx: ScoreContext) -> torch.Tensor:
    """SET, DSR: inactive entries grown uniformly at random."""
    return scoring.uniform_like(ctx.mask, ctx.generator)


@register_grow("gradient", needs=("grad",))
def _gradient(ctx: ScoreContext) -> torch.Tensor:
    """RigL: ``|g|`` of the dense gradient."""
    return scoring.gradient(_needs_value(ctx, "grad"))


@register_grow("momentum", needs=("momentum",))
def _momentum(ctx: ScoreContext) -> torch.Tensor:
    """SNFS: ``|m|`` of the dense-gradient momentum."""
    return scoring.momentum(_needs_value(ctx, "momentum"))


@register_grow("cosine", needs=("activations",))
def _cosine(ctx: ScoreContext) -> torch.Tensor:
    """CTRE: ``|cos|`` between output and input neurons' activations."""
    if ctx.activations is None:
        raise RuntimeError(
            f"no activations were captured for {ctx.fqn!r}: cosine growth needs a forward pass through the "
            "layer in the step before each update"
        )
    inputs, outputs = ctx.activations
    return scoring.cosine_similarity(inputs, outputs, ctx.mask.shape).to(ctx.mask.device)


@register_grow("unfired", needs=("ever_active",), tie_noise=False)
def _unfired(ctx: ScoreContext) -> torch.Tensor:
    """Never-active entries first, at random (in-time over-parameterization)."""
    return scoring.unfired(_needs_value(ctx, "ever_active"), ctx.generator)


def _random_entries(ctx: EntryContext) -> torch.Tensor:
    return scoring.uniform_at(ctx.positions, ctx.generator)


def _signed_magnitude_entries(ctx: EntryContext) -> torch.Tensor:
    return scoring.signed_magnitude(ctx.values, torch.ones_like(ctx.values, dtype=torch.bool))


def _attach_entry_forms() -> None:
    """The built-ins' entry forms (each returns its dense function's scores at the active entries, bit for bit)."""
    drop = {
        "magnitude": lambda ctx: scoring.magnitude(ctx.values),
        "random": _random_entries,
        "signed_magnitude": _signed_magnitude_entries,
    }
    for name, form in drop.items():
        _REGISTRY["drop"][name] = replace(_REGISTRY["drop"][name], on_entries=form)
    for name in ("gradient", "random"):
        _REGISTRY["grow"][name] = replace(_REGISTRY["grow"][name], fused=name)


_attach_entry_forms()
_BUILT_IN: Mapping[Kind, frozenset[str]] = {kind: frozenset(names) for kind, names in _REGISTRY.items()}
