"""Structured pruning that physically shrinks layers: unit criteria, selection, surgery and neuron merging.

A *unit* is one output neuron of a ``Linear`` or one output channel of a ``Conv1d`` / ``Conv2d`` (the
*producer*). Removing unit ``c`` removes the producer's row ``c`` (and bias entry), entry ``c`` of a BatchNorm right
after it (the *norm*), and the inputs unit ``c`` feeds in the next weight layer (the *consumer*): input channel
``c`` of a convolution, input column ``c`` of a ``Linear``, or columns ``c * P .. c * P + P - 1`` of a ``Linear``
that reads a convolution through a channel-major flatten (``P`` positions per channel). A :class:`UnitGroup` names
the three layers by fully qualified name (fqn); :func:`find_unit_groups` finds them in registration order.

:func:`shrink` returns a new, smaller model that computes exactly what the original computes with the removed
units' inputs to the consumer set to zero (:func:`mask_units`, its reference twin). Criteria score units (higher
means more worth keeping; the registry :data:`UNIT_CRITERIA`, each entry citing its paper):

- ``l1``: the L1 norm of the unit's incoming weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- ``bn_scale``: ``|gamma|`` of the BatchNorm after the unit, compared across layers (Liu et al. 2017, "Learning
  Efficient Convolutional Networks through Network Slimming"); train with :func:`slimming_penalty` first.
- ``taylor``: ``|mean over positions of a * dL/da|`` averaged over calibration examples, ``a`` the unit's input to
  the consumer: the first-order loss change of zeroing it (Molchanov et al. 2017, "Pruning Convolutional Neural
  Networks for Resource Efficient Inference").
- ``activation_mean`` / ``activation_variance``: the mean ``|a|`` / the variance of ``a`` over calibration examples
  and positions (activity-based pruning in the spirit of APoZ, Hu et al. 2016, "Network Trimming").

:func:`merge_similar_units` is the data-free method of Srinivas & Babu 2015 ("Data-free parameter pruning for Deep
Neural Networks"): the pair of units with the most similar incoming weights is merged, the removed unit's outgoing
weights added to the survivor's, which is exact when the two are identical.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> prune_units(model, "l1", 0.5)
    Sequential(
      (0): Linear(in_features=4, out_features=3, bias=True)
      (1): ReLU()
      (2): Linear(in_features=3, out_features=3, bias=True)
    )
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sparseapps.core import rules
from sparseapps.core.validation import check_choice, check_number

__all__ = [
    "SCOPES",
    "UNIT_CRITERIA",
    "UnitContext",
    "UnitCriterion",
    "UnitGroup",
    "collect_unit_inputs",
    "find_unit_groups",
    "mask_units",
    "merge_similar_units",
    "merge_units_",
    "prune_units",
    "register_unit_criterion",
    "score_units",
    "select_units",
    "shrink",
    "slimming_penalty",
    "unit_activation_mean",
    "unit_activation_variance",
    "unit_bn_scale",
    "unit_l1",
    "unit_taylor",
]

Scope = Literal["layer", "global"]
SCOPES: tuple[Scope, ...] = ("layer", "global")
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)
_NEEDS = ("norm", "inputs", "gradients")


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True, kw_only=True)
class UnitGroup:
    """A producer whose output units can be removed, the BatchNorm after it (if any) and the layer consuming them.

    Example:
        >>> UnitGroup(producer="conv1", norm="bn1", consumer="conv2")
        UnitGroup(producer='conv1', consumer='conv2', norm='bn1')
    """

    producer: str
    consumer: str
    norm: str | None = None


def _units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def _check_layer(fqn: str, module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> None:
    convolution = isinstance(module, nn.Conv1d | nn.Conv2d)
    if not isinstance(module, kinds) or (convolution and module.groups != 1):
        expected = ", ".join(
            kind.__name__ + (" (groups=1)" if kind in (nn.Conv1d, nn.Conv2d) else "") for kind in kinds
        )
        detail = f" with groups={module.groups}" if convolution else ""
        raise ValueError(
            f"layer {fqn!r} ({type(module).__name__}{detail}) is not supported: expected one of {expected}"
        )


def _check_group(model: nn.Module, group: UnitGroup) -> None:
    """Raises ``ValueError`` unless ``group``'s layers exist, have supported types and matching sizes."""
    names = dict(model.named_modules())
    for role, fqn in (("producer", group.producer), ("consumer", group.consumer), ("norm", group.norm)):
        if fqn is not None and fqn not in names:
            raise ValueError(f"{role} {fqn!r} is not a module of the model")
    producer, consumer = names[group.producer], names[group.consumer]
    _check_layer(group.producer, producer, _WEIGHT_LAYERS)
    _check_layer(group.consumer, consumer, _WEIGHT_LAYERS)
    units = _units(producer)
    if group.norm is not None:
        norm = names[group.norm]
        _check_layer(group.norm, norm, _NORM_LAYERS)
        if norm.num_features != units:  # type: ignore[union-attr]
            raise ValueError(
                f"norm {group.norm!r} has {norm.num_features} features, expected the {units} units of "
                f"{group.producer!r}"
            )
    if isinstance(consumer, nn.Linear):
        fits = consumer.in_features == units or (
            not isinstance(producer, nn.Linear) and consumer.in_features % units == 0
        )
        width = consumer.in_features
    else:
        fits = not isinstance(producer, nn.Linear) and consumer.in_channels == units  # type: ignore[union-attr]
        width = consumer.in_channels  # type: ignore[union-attr]
    if not fits:
        raise ValueError(
            f"{group.producer!r} ({units} units) does not feed {group.consumer!r} ({width} inputs): expected "
            "the consumer to read the producer's units directly or through a channel-major flatten; pass the "
            "groups explicitly where registration order differs from the forward pass"
        )


def find_unit_groups(model: nn.Module) -> list[UnitGroup]:
    """The groups of ``model``, taking its weight layers in registration order as the forward pass's order.

    Each ``Linear`` / ``Conv1d`` / ``Conv2d`` but the last produces units for the next one; a ``BatchNorm1d`` /
    ``BatchNorm2d`` registered right after a weight layer is its norm. Parameter-free modules (activations,
    pooling, flatten, dropout) are skipped. This fits ``nn.Sequential`` chains and models whose ``forward`` calls
    their layers in the order they were created; for branching models (residual additions, concatenations) pass
    groups explicitly to the functions below.

    Raises:
        ValueError: a module with parameters of another type (named by its fqn), a BatchNorm that follows no
            weight layer, or sizes that do not chain.

    Example:
        >>> from torch import nn
        >>> find_unit_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        [UnitGroup(producer='0', consumer='2', norm=None)]
    """
    groups: list[UnitGroup] = []
    previous: str | None = None
    norm: str | None = None
    for fqn, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            if previous is None or norm is not None:
                raise ValueError(f"BatchNorm {fqn!r} follows no Linear or Conv layer in registration order")
            norm = fqn
        elif isinstance(module, _WEIGHT_LAYERS):
            _check_layer(fqn, module, _WEIGHT_LAYERS)
            if previous is not None:
                group = UnitGroup(producer=previous, consumer=fqn, norm=norm)
                _check_group(model, group)
                groups.append(group)
            previous, norm = fqn, None
        elif any(True for _ in module.parameters(recurse=False)):
            _check_layer(fqn, module, _WEIGHT_LAYERS + _NORM_LAYERS)
    return groups


def _resolve_groups(model: nn.Module, groups: Sequence[UnitGroup] | None) -> list[UnitGroup]:
    if groups is None:
        return find_unit_groups(model)
    groups = list(groups)
    for group in groups:
        _check_group(model, group)
    for role in ("producer", "consumer"):
        names = [getattr(g, role) for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"expected one group per {role}, got {role}s {names}")
    return groups


# ---------------------------------------------------------------------------------------------- criteria
def unit_l1(weight: torch.Tensor) -> torch.Tensor:
    """Li et al. 2017: ``sum |W[c]|`` over each unit's incoming weights, ``[U, *] -> [U]``.

    Example:
        >>> unit_l1(torch.tensor([[1.0, -2.0], [0.5, 0.0], [-3.0, 1.0]]))
        tensor([3.0000, 0.5000, 4.0000])
    """
    return weight.detach().float().reshape(weight.shape[0], -1).abs().sum(1)


def unit_bn_scale(gamma: torch.Tensor) -> torch.Tensor:
    """Liu et al. 2017: ``|gamma|``, ``[U] -> [U]``.

    Example:
        >>> unit_bn_scale(torch.tensor([0.5, -2.0, 0.0]))
        tensor([0.5000, 2.0000, 0.0000])
    """
    return gamma.detach().float().abs()


def unit_taylor(inputs: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Molchanov et al. 2017: ``mean_n |mean_p a[n, c, p] * g[n, c, p]|``, ``[N, U, P] x [N, U, P] -> [U]``.

    ``a`` is the unit's input to the consumer, ``g`` the gradient of example ``n``'s loss with respect to it.

    Example:
        >>> a = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])       # N = 2 examples, U = 1 unit, P = 2 positions
        >>> g = torch.tensor([[[1.0, -1.0]], [[2.0, 5.0]]])
        >>> unit_taylor(a, g)                                      # (|(1 - 2) / 2| + |(6 + 0) / 2|) / 2
        tensor([1.7500])
    """
    return (inputs.detach().float() * gradients.detach().float()).mean(2).abs().mean(0)


def unit_activation_mean(inputs: torch.Tensor) -> torch.Tensor:
    """The mean ``|a|`` over examples and positions, ``[N, U, P] -> [U]``.

    Example:
        >>> unit_activation_mean(torch.tensor([[[1.0], [0.0]], [[-3.0], [0.0]]]))
        tensor([2., 0.])
    """
    return inputs.detach().float().abs().mean((0, 2))


def unit_activation_variance(inputs: torch.Tensor) -> torch.Tensor:
    """The (population) variance of ``a`` over examples and positions, ``[N, U, P] -> [U]``.

    Example:
        >>> unit_activation_variance(torch.tensor([[[1.0], [2.0]], [[3.0], [2.0]]]))
        tensor([1., 0.])
    """
    values = inputs.detach().float().transpose(0, 1).reshape(inputs.shape[1], -1)
    return values.var(1, correction=0)


@dataclass(frozen=True, kw_only=True)
class UnitContext:
    """What a criterion may read about one group of ``U`` units (``N`` calibration examples, ``P`` positions).

    Attributes:
        group: the group scored.
        weight: ``[U, *]`` the producer's weight.
        norm_weight: ``[U]`` the BatchNorm's ``gamma``, or ``None`` without a norm.
        inputs: ``[N, U, P]`` the units' inputs to the consumer over the calibration batches, or ``None``.
        gradients: ``[N, U, P]`` each example's loss gradient with respect to ``inputs``, or ``None``.
    """

    group: UnitGroup
    weight: torch.Tensor
    norm_weight: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    gradients: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class UnitCriterion:
    """A registered unit criterion: its score function, what it reads, its default scope and its paper."""

    name: str
    score: Callable[[UnitContext], torch.Tensor]
    needs: frozenset[str]
    scope: Scope
    reference: str


UNIT_CRITERIA: dict[str, UnitCriterion] = {}


def register_unit_criterion(
    name: str, *, needs: Iterable[str] = (), scope: Scope = "layer", reference: str
) -> Callable[[Callable[[UnitContext], torch.Tensor]], Callable[[UnitContext], torch.Tensor]]:
    """Registers ``score(context) -> [U]`` in :data:`UNIT_CRITERIA` under ``name``.

    Args:
        name: the criterion's name (unique).
        needs: among ``"norm"`` (a BatchNorm in every group), ``"inputs"`` (calibration batches) and
            ``"gradients"`` (batches and a loss).
        scope: the default of :func:`prune_units`: rank per layer or across all layers.
        reference: the paper the criterion comes from.
    """
    needs = frozenset(needs)
    for need in needs:
        check_choice("needs", need, _NEEDS)
    check_choice("scope", scope, SCOPES)

    def decorate(score: Callable[[UnitContext], torch.Tensor]) -> Callable[[UnitContext], torch.Tensor]:
        if name in UNIT_CRITERIA:
            raise ValueError(f"a unit criterion named {name!r} is already registered")
        UNIT_CRITERIA[name] = UnitCriterion(
            name=name, score=score, needs=needs, scope=scope, reference=reference
        )
        return score

    return decorate


@register_unit_criterion("l1", reference="Li et al. 2017, Pruning Filters for Efficient ConvNets")
def _l1(context: UnitContext) -> torch.Tensor:
    return unit_l1(context.weight)


@register_unit_criterion(
    "bn_scale",
    needs=("norm",),
    scope="global",
    reference="Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming",
)
def _bn_scale(context: UnitContext) -> torch.Tensor:
    assert context.norm_weight is not None  # score_units checks the need
    return unit_bn_scale(context.norm_weight)


@register_unit_criterion(
    "taylor",
    needs=("inputs", "gradients"),
    reference="Molchanov et al. 2017, Pruning Convolutional Neural Networks for Resource Efficient Inference",
)
def _taylor(context: UnitContext) -> torch.Tensor:
    assert context.inputs is not None and context.gradients is not None
    return unit_taylor(context.inputs, context.gradients)


@register_unit_criterion(
    "activation_mean", needs=("inputs",), reference="Hu et al. 2016, Network Trimming (APoZ), mean |a|"
)
def _activation_mean(context: UnitContext) -> torch.Tensor:
    assert context.inputs is not None
    return unit_activation_mean(context.inputs)


@register_unit_criterion(
    "activation_variance", needs=("inputs",), reference="activity-based pruning: variance of a over the data"
)
def _activation_variance(context: UnitContext) -> torch.Tensor:
    assert context.inputs is not None
    return unit_activation_variance(context.inputs)


# ---------------------------------------------------------------------------------------------- scoring
def collect_unit_inputs(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every group's unit inputs to its consumer over ``batches``, with their loss gradients if ``loss_fn``.

    The model runs in eval mode (BatchNorm uses its running statistics, so examples do not interact) and is put
    back in its mode afterwards; parameters' ``.grad`` are left untouched.

    Args:
        model: the network.
        groups: the groups to observe.
        batches: ``(inputs [B, ...], targets [B, ...])`` pairs; targets are read only with ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` averaged over the batch (as ``F.cross_entropy``); times
            ``B``, its gradient is each example's own loss gradient.

    Returns:
        ``{producer fqn: (inputs [N, U, P], gradients [N, U, P] or None)}``.
    """
    captured: dict[str, torch.Tensor] = {}
    units = {g.consumer: (g.producer, _units(model.get_submodule(g.producer))) for g in groups}

    def hook(fqn: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
        def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            if isinstance(module, nn.Linear) and x.dim() != 2:
                raise ValueError(f"expected [B, features] inputs to {fqn!r}, got {list(x.shape)}")
            if loss_fn is not None and not x.requires_grad:
                x = x.detach().requires_grad_()  # only frozen layers before it: differentiate from here
            captured[fqn] = x
            return (x, *args[1:])

        return capture

    handles = [model.get_submodule(fqn).register_forward_pre_hook(hook(fqn)) for fqn in units]
    inputs: dict[str, list[torch.Tensor]] = {fqn: [] for fqn in units}
    gradients: dict[str, list[torch.Tensor]] = {fqn: [] for fqn in units}
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            captured.clear()
            with torch.set_grad_enabled(loss_fn is not None):
                outputs = model(x)
                if loss_fn is not None:
                    loss = loss_fn(outputs, y) * len(x)
                    grads = torch.autograd.grad(loss, [captured[fqn] for fqn in units])
                    for fqn, g in zip(units, grads, strict=True):
                        gradients[fqn].append(g.reshape(len(x), units[fqn][1], -1))
            for fqn in units:
                inputs[fqn].append(captured[fqn].detach().reshape(len(x), units[fqn][1], -1))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not any(inputs.values()):
        raise ValueError("expected at least one calibration batch, got none")
    return {
        producer: (torch.cat(inputs[fqn]), torch.cat(gradients[fqn]) if loss_fn is not None else None)
        for fqn, (producer, _) in units.items()
    }


def score_units(
    model: nn.Module,
    criterion: str,
    *,
    groups: Sequence[UnitGroup] | None = None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-unit scores of every group by a registered criterion (higher: more worth keeping).

    Args:
        model: the network.
        criterion: a name in :data:`UNIT_CRITERIA`.
        groups: the groups to score (default :func:`find_unit_groups`).
        batches: calibration ``(inputs, targets)`` batches, for criteria that need ``"inputs"``.
        loss_fn: the batch-mean loss, for criteria that need ``"gradients"`` (see :func:`collect_unit_inputs`).

    Returns:
        ``{producer fqn: [U] float32}``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.1, 0.0], [-2.0, 0.0]]))
        >>> score_units(model, "l1")
        {'0': tensor([2.0000, 0.1000, 2.0000])}
    """
    check_choice("criterion", criterion, UNIT_CRITERIA)
    entry = UNIT_CRITERIA[criterion]
    groups = _resolve_groups(model, groups)
    if "norm" in entry.needs:
        bare = [g.producer for g in groups if g.norm is None or model.get_submodule(g.norm).weight is None]
        if bare:
            raise ValueError(
                f"criterion {criterion!r} needs a BatchNorm with affine=True after every producer, got none after "
                f"{bare}"
            )
    if {"inputs", "gradients"} & entry.needs and batches is None:
        raise ValueError(f"criterion {criterion!r} needs calibration batches, got batches=None")
    if "gradients" in entry.needs and loss_fn is None:
        raise ValueError(f"criterion {criterion!r} needs a loss_fn for the gradients, got loss_fn=None")
    observed: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if {"inputs", "gradients"} & entry.needs:
        observed = collect_unit_inputs(
            model,
            groups,
            batches,
            loss_fn if "gradients" in entry.needs else None,  # type: ignore[arg-type]
        )
    scores = {}
    for group in groups:
        inputs, gradients = observed.get(group.producer, (None, None))
        norm = model.get_submodule(group.norm).weight if group.norm is not None else None
        context = UnitContext(
            group=group,
            weight=model.get_submodule(group.producer).weight,
            norm_weight=norm,
            inputs=inputs,
            gradients=gradients,
        )
        scores[group.producer] = entry.score(context)
    return scores


def select_units(
    scores: Mapping[str, torch.Tensor], ratio: float, *, scope: Scope = "layer"
) -> dict[str, torch.Tensor]:
    """Keep masks removing the ``ratio`` of units with the lowest scores, per layer or across all layers.

    Per layer, ``round(ratio * U)`` units of each group go; globally, ``round(ratio * total)`` units of all
    groups, ranked on one scale. Ties go to the lower index (kept first).

    Args:
        scores: ``{producer fqn: [U]}`` scores.
        ratio: the fraction of units to remove, in ``[0, 1)``.
        scope: ``"layer"`` or ``"global"``.

    Returns:
        ``{producer fqn: [U] bool}``, ``True`` for the units kept (a plan for :func:`shrink`).

    Raises:
        ValueError: a ratio outside ``[0, 1)``, an unknown scope, or a layer that would lose all its units.

    Example:
        >>> plan = select_units({"a": torch.tensor([3.0, 1.0, 2.0, 0.0]), "b": torch.tensor([5.0, 4.0])}, 0.5,
        ...                     scope="global")
        >>> plan["a"].tolist(), plan["b"].tolist()
        ([True, False, False, False], [True, True])
    """
    check_number("ratio", ratio, low=0.0, high=1.0, high_open=True)
    check_choice("scope", scope, SCOPES)
    if scope == "layer":
        plan = {
            fqn: rules.select_top(
                s.float(), torch.ones_like(s, dtype=torch.bool), len(s) - round(ratio * len(s))
            )
            for fqn, s in scores.items()
        }
    else:
        flat = torch.cat([s.float().reshape(-1) for s in scores.values()])
        chosen = rules.select_top(
            flat, torch.ones_like(flat, dtype=torch.bool), len(flat) - round(ratio * len(flat))
        )
        plan, offset = {}, 0
        for fqn, s in scores.items():
            plan[fqn] = chosen[offset : offset + len(s)]
            offset += len(s)
    emptied = [fqn for fqn, keep in plan.items() if not bool(keep.any())]
    if emptied:
        raise ValueError(
            f"layers {emptied} would lose all their units at ratio {ratio} with scope {scope!r}: expected at least "
            "one unit kept per layer; lower the ratio or rank per layer"
        )
    return plan


# ---------------------------------------------------------------------------------------------- surgery
def _input_index(consumer: nn.Module, selected: torch.Tensor) -> torch.Tensor:
    """The consumer's input columns (``Linear``) or channels (conv) fed by the units ``selected`` (``[U]`` bool)."""
    units = selected.nonzero().squeeze(1)
    if isinstance(consumer, nn.Linear):
        positions = consumer.in_features // len(selected)
        return (units.unsqueeze(1) * positions + torch.arange(positions)).reshape(-1)
    return units


def _checked_plan(
    model: nn.Module, plan: Mapping[str, torch.Tensor], groups: Sequence[UnitGroup] | None
) -> tuple[list[UnitGroup], dict[str, torch.Tensor]]:
    groups = _resolve_groups(model, groups)
    by_producer = {g.producer: g for g in groups}
    unknown = sorted(set(plan) - set(by_producer))
    if unknown:
        raise ValueError(f"plan names producers {unknown} that are not in the groups {sorted(by_producer)}")
    masks = {}
    for fqn, keep in plan.items():
        units = _units(model.get_submodule(fqn))
        if keep.dtype != torch.bool or keep.shape != (units,):
            raise ValueError(
                f"plan[{fqn!r}] must be a bool tensor of shape [{units}], got {keep.dtype} {list(keep.shape)}"
            )
        if not bool(keep.any()):
            raise ValueError(
                f"plan[{fqn!r}] keeps none of the {units} units of {fqn!r}: expected at least one"
            )
        masks[fqn] = keep.cpu()
    return [by_producer[fqn] for fqn in masks], masks


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.clone())


def shrink(
    model: nn.Module, plan: Mapping[str, torch.Tensor], *, groups: Sequence[UnitGroup] | None = None
) -> nn.Module:
    """A new model without the units ``plan`` drops: fewer outputs in producers and norms, fewer consumer inputs.

    The copy computes exactly what :func:`mask_units` computes (up to float rounding of shorter sums). Groups the
    plan does not name are copied whole; ``model`` is not changed.

    Args:
        model: the network.
        plan: ``{producer fqn: [U] bool}``, ``True`` for the units kept (from :func:`select_units`).
        groups: the groups the plan refers to (default :func:`find_unit_groups`).

    Raises:
        ValueError: a plan entry of the wrong shape or type, keeping no unit, or naming no group's producer.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 2))
        >>> small = shrink(model, {"0": torch.tensor([True, False, True, False])})
        >>> small[0].out_channels, small[1].num_features, small[4].in_features
        (2, 2, 12)
    """
    groups, masks = _checked_plan(model, plan, groups)
    result = copy.deepcopy(model)
    with torch.no_grad():
        for group in groups:
            keep = masks[group.producer]
            units = keep.nonzero().squeeze(1)
            producer = result.get_submodule(group.producer)
            _replace(producer, "weight", producer.weight[units])
            if producer.bias is not None:
                _replace(producer, "bias", producer.bias[units])
            if isinstance(producer, nn.Linear):
                producer.out_features = len(units)
            else:
                producer.out_channels = len(units)
            if group.norm is not None:
                norm = result.get_submodule(group.norm)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(norm, name) is not None:
                        _replace(norm, name, getattr(norm, name)[units])
                norm.num_features = len(units)
            consumer = result.get_submodule(group.consumer)
            columns = _input_index(consumer, keep)
            _replace(consumer, "weight", consumer.weight[:, columns])
            if isinstance(consumer, nn.Linear):
                consumer.in_features = len(columns)
            else:
                consumer.in_channels = len(columns)
    return result


def mask_units(
    model: nn.Module, plan: Mapping[str, torch.Tensor], *, groups: Sequence[UnitGroup] | None = None
) -> nn.Module:
    """:func:`shrink`'s reference twin: a copy of the same size whose consumers ignore the dropped units.

    The consumer's weights reading a dropped unit are set to zero, so the unit contributes nothing downstream.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> masked = mask_units(model, {"0": torch.tensor([True, False, True])})
        >>> masked[2].weight[:, 1].tolist()
        [0.0]
    """
    groups, masks = _checked_plan(model, plan, groups)
    result = copy.deepcopy(model)
    with torch.no_grad():
        for group in groups:
            consumer = result.get_submodule(group.consumer)
            consumer.weight[:, _input_index(consumer, ~masks[group.producer])] = 0
    return result


def prune_units(
    model: nn.Module,
    criterion: str,
    ratio: float,
    *,
    scope: Scope | None = None,
    groups: Sequence[UnitGroup] | None = None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """:func:`score_units`, :func:`select_units` and :func:`shrink` in one call: the smaller copy of ``model``.

    Args:
        model: the network (not changed).
        criterion: a name in :data:`UNIT_CRITERIA`.
        ratio: the fraction of units to remove, in ``[0, 1)``.
        scope: ``"layer"`` or ``"global"``; default the criterion's (``bn_scale``: global, the others: layer).
        groups, batches, loss_fn: as for :func:`score_units`.
    """
    check_number("ratio", ratio, low=0.0, high=1.0, high_open=True)
    check_choice("criterion", criterion, UNIT_CRITERIA)
    groups = _resolve_groups(model, groups)
    scores = score_units(model, criterion, groups=groups, batches=batches, loss_fn=loss_fn)
    plan = select_units(scores, ratio, scope=UNIT_CRITERIA[criterion].scope if scope is None else scope)
    return shrink(model, plan, groups=groups)


# ---------------------------------------------------------------------------------------------- merging
def merge_units_(incoming: torch.Tensor, outgoing: torch.Tensor, n_merge: int) -> torch.Tensor:
    """Srinivas & Babu 2015: merges ``n_merge`` units, one pair at a time; returns the ``[U]`` keep mask.

    The saliency of removing unit ``j`` into unit ``i`` is ``mean(a_j ** 2) * ||W_i - W_j|| ** 2``, with ``W`` the
    incoming weights and ``a_j`` unit ``j``'s outgoing weights. The least salient pair is merged: ``a_i += a_j``
    and ``j`` is removed; the saliencies are updated and the next pair chosen among the survivors.

    Args:
        incoming: ``[U, F]`` each unit's incoming weights (its bias as one more column).
        outgoing: ``[O, U, X]`` each unit's outgoing weights (``X`` per unit and consumer row); updated in place.
        n_merge: units to remove, ``0 <= n_merge < U``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])     # units 0 and 2 are identical
        >>> a = torch.tensor([[[1.0], [2.0], [3.0]]])
        >>> merge_units_(w, a, 1).tolist(), a.squeeze().tolist()
        ([True, True, False], [4.0, 2.0, 0.0])
    """
    units = incoming.shape[0]
    if not 0 <= n_merge < units:
        raise ValueError(f"n_merge must be in [0, {units}), got {n_merge}")
    w = incoming.detach().double()
    distance = torch.cdist(w, w).pow(2)
    distance.fill_diagonal_(torch.inf)
    keep = torch.ones(units, dtype=torch.bool)
    for _ in range(n_merge):
        strength = outgoing.detach().double().pow(2).mean((0, 2))
        saliency = distance * strength.unsqueeze(0)  # [i, j]: remove j into i
        saliency[~keep] = torch.inf
        saliency[:, ~keep] = torch.inf
        flat = int(torch.argmin(saliency))
        survivor, removed = divmod(flat, units)
        outgoing[:, survivor] += outgoing[:, removed]
        outgoing[:, removed] = 0
        keep[removed] = False
    return keep


def merge_similar_units(
    model: nn.Module, ratio: float, *, groups: Sequence[UnitGroup] | None = None
) -> nn.Module:
    """Srinivas & Babu 2015, data-free: removes ``round(ratio * U)`` units per group by merging similar pairs.

    Groups are merged in order, each on the model already shrunk by the groups before it (a consumer's incoming
    weights then exclude the units removed upstream). The function is unchanged where merged units are identical
    (same incoming weights and bias: they compute the same activation, whatever the nonlinearity).

    Args:
        model: the network (not changed).
        ratio: the fraction of units to remove per group, in ``[0, 1)``.
        groups: the groups to merge (default :func:`find_unit_groups`); none may have a BatchNorm.

    Raises:
        ValueError: a ratio outside ``[0, 1)`` or a group with a BatchNorm (its statistics are per unit).
    """
    check_number("ratio", ratio, low=0.0, high=1.0, high_open=True)
    groups = _resolve_groups(model, groups)
    normed = [g.norm for g in groups if g.norm is not None]
    if normed:
        raise ValueError(
            f"merge_similar_units does not merge units normalized by a BatchNorm, got norms {normed}"
        )
    result = copy.deepcopy(model)
    for group in groups:
        producer = result.get_submodule(group.producer)
        consumer = result.get_submodule(group.consumer)
        units = _units(producer)
        incoming = producer.weight.detach().reshape(units, -1)
        if producer.bias is not None:
            incoming = torch.cat([incoming, producer.bias.detach().unsqueeze(1)], 1)
        with torch.no_grad():
            outgoing = consumer.weight.view(consumer.weight.shape[0], units, -1)
            keep = merge_units_(incoming, outgoing, round(ratio * units))
        result = shrink(result, {group.producer: keep}, groups=[group])
    return result


# ---------------------------------------------------------------------------------------------- slimming
def slimming_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """Network slimming's sparsity term ``lam * sum |gamma|`` over every BatchNorm scale, to add to the loss.

    Liu et al. 2017 train with it (``lam`` 1e-4 for VGG, 1e-5 for ResNet and DenseNet on CIFAR), then remove the
    channels with the smallest ``|gamma|`` across all layers (``prune_units(model, "bn_scale", ratio)``). Its
    gradient with respect to each ``gamma`` is ``lam * sign(gamma)``.

    Raises:
        ValueError: ``lam`` negative or not finite, or a model without BatchNorm scales.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> slimming_penalty(model, 1e-4)                          # gammas start at 1
        tensor(0.0003, grad_fn=<MulBackward0>)
    """
    check_number("lam", lam, low=0.0)
    scales = [m.weight for m in model.modules() if isinstance(m, _NORM_LAYERS) and m.weight is not None]
    if not scales:
        raise ValueError("network slimming needs BatchNorm1d/2d layers with affine=True; the model has none")
    return lam * torch.stack([gamma.abs().sum() for gamma in scales]).sum()
