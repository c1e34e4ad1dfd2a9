"""Supermasks: edge-popup over frozen random weights, and the single-shared-weight evaluation of its masks.

**edge-popup** (Ramanujan et al., CVPR 2020, "What's Hidden in a Randomly Weighted Neural Network?") never trains
a weight. Every weight ``W`` is frozen at a random initialization; beside it a learned score ``s`` decides whether
it is used. The forward pass uses ``W_eff = W * m`` where ``m`` marks the ``k`` highest scores of the layer (``k``
its number of active weights; ``k / numel`` the layer's density). ``m`` is piecewise constant in ``s``, so its
gradient is taken straight through (``dL/ds := dL/dm``), which gives ``dL/ds = dL/dW_eff * W`` at every position,
active or not: a weight outside the mask whose use would lower the loss gains score and "pops up" into it.

**Single shared weight** (Gaier & Ha, NeurIPS 2019, "Weight Agnostic Neural Networks"):
:func:`shared_weight_accuracy` sets every active weight of a supermask network to one value ``w`` and reports the
accuracy per ``w`` and their mean. This is WANN's *evaluation* of a topology, applied here to the masks edge-popup
found; it is not WANN's topology search (which grows architectures and their activation functions, ranked by
that mean). With ReLU and zero biases (what :func:`to_supermask` builds) a network is positively homogeneous in its
weights, so only the sign of ``w`` can change a prediction: the curve has one level for ``w < 0`` and one for
``w > 0``; and for ``w < 0`` a stack of two or more ReLU layers outputs zeros (the first layer's outputs are
``>= 0``, so the second's pre-activations are ``<= 0``), a constant prediction.

Defaults follow the paper and its official code (allenai/hidden-networks, small-scale configs): weights "signed
Kaiming constant" ``±sqrt(2 / fan_in)`` (its best init) or Kaiming normal; scores Kaiming uniform
(``a = sqrt(5)``, PyTorch's default Linear init); biases absent (here zero and frozen); SGD lr 0.1, momentum 0.9,
weight decay 1e-4 on the scores, cosine learning rate (:func:`edge_popup_optimizer`). Every layer is masked, the
first and the last included; per-layer densities are uniform or ERK (:func:`~sparseapps.core.distributions.target_nnz`).
The paper ranks the scores themselves (its code ranks ``|s|``); this module follows the paper.

Example:
    >>> from torch import nn
    >>> model = to_supermask(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5, seed=0)
    >>> [name for name, _ in model.named_parameters()]          # only scores are trained
    ['0.scores', '2.scores']
    >>> {fqn: int(mask.sum()) for fqn, mask in masks(model).items()}   # half of 4 * 8 and of 8 * 3
    {'0.weight': 16, '2.weight': 12}
    >>> dense = export(model)                                   # plain Linear layers, masked weights
    >>> x = torch.randn(5, 4)
    >>> torch.equal(dense(x), model(x))
    True
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import rules
from sparseapps.core.distributions import target_nnz
from sparseapps.core.masks import attach_mask
from sparseapps.core.validation import check_bool, check_choice, check_int, check_number

__all__ = [
    "DISTRIBUTIONS",
    "INITS",
    "WANN_WEIGHTS",
    "SharedWeightAccuracy",
    "SupermaskLayer",
    "edge_popup_optimizer",
    "export",
    "masks",
    "shared_weight_accuracy",
    "to_supermask",
    "top_k_mask",
]

INITS = ("signed_constant", "kaiming_normal")
DISTRIBUTIONS = ("uniform", "erk", "er")
# The shared weight values WANN evaluates every network at (Gaier & Ha 2019).
WANN_WEIGHTS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of the scores. Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, scores: torch.Tensor, n_active: int
    ) -> torch.Tensor:
        everywhere = torch.ones_like(scores, dtype=torch.bool)
        selected = rules.select_top(scores, everywhere, n_active, available=scores.numel())
        return selected.to(scores.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def top_k_mask(scores: torch.Tensor, n_active: int) -> torch.Tensor:
    """``[*S] -> [*S]`` 0/1 mask of the ``n_active`` highest scores, ties to the lower flat position.

    Its gradient is the straight-through estimator: ``d mask / d scores`` is taken as the identity.

    Example:
        >>> top_k_mask(torch.tensor([0.3, -1.0, 0.3, 2.0]), 2)   # the tie at 0.3 goes to position 0
        tensor([1., 0., 0., 1.])
    """
    return _TopKStraightThrough.apply(scores, n_active)


class SupermaskLayer(nn.Module):
    """A ``Linear`` / ``Conv1d`` / ``Conv2d`` computed with a frozen weight through a learned top-k mask.

    ``[B, in] -> [B, out]`` (or the convolution's shapes) as the layer it replaces, with the weight
    ``weight * top_k_mask(scores, n_active)``.

    Args:
        layer: the layer replaced; its configuration (sizes, stride, padding, ...) is kept, its values are not.
        n_active: ``k``, weights used in the forward pass, in ``[0, weight.numel()]``.
        init: ``"signed_constant"`` (``±sqrt(2 / fan_in)``, random signs) or ``"kaiming_normal"``
            (``N(0, 2 / fan_in)``).
        generator: draws the weights, then the scores.
        scale_fan: take ``fan_in`` times the layer's density (``n_active / numel``, the expected active fan-in)
            as the fan, so a masked layer keeps the dense layer's output scale.

    Attributes:
        weight: frozen buffer shaped like the replaced weight.
        bias: frozen buffer of zeros (``None`` when the replaced layer had no bias).
        scores: the Parameter, shaped like ``weight``, Kaiming uniform (``a = sqrt(5)``).

    Example:
        >>> layer = SupermaskLayer(nn.Linear(3, 2), 4, init="signed_constant",
        ...                        generator=torch.Generator().manual_seed(0))
        >>> layer.weight.abs().unique()                                     # sqrt(2 / 3)
        tensor([0.8165])
        >>> int(layer.mask().sum()), layer(torch.ones(5, 3)).shape
        (4, torch.Size([5, 2]))
    """

    def __init__(
        self,
        layer: nn.Linear | nn.Conv1d | nn.Conv2d,
        n_active: int,
        *,
        init: str,
        generator: torch.Generator,
        scale_fan: bool = False,
    ) -> None:
        super().__init__()
        check_choice("init", init, INITS)
        if type(layer) not in _KINDS:
            raise TypeError(f"expected an nn.Linear, nn.Conv1d or nn.Conv2d, got {type(layer).__name__}")
        self.kind = _KINDS[type(layer)]
        if self.kind != "linear" and layer.padding_mode != "zeros":
            raise ValueError(f"expected a convolution with padding_mode 'zeros', got {layer.padding_mode!r}")
        shape = layer.weight.shape
        self.n_active = check_int("n_active", n_active, low=0, high=shape.numel())
        if self.kind != "linear":
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        fan = shape[1:].numel()
        if scale_fan and self.n_active > 0:
            fan *= self.n_active / shape.numel()
        std = math.sqrt(2.0 / fan)  # Kaiming, ReLU gain, fan_in mode
        if init == "signed_constant":
            weight = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float() * std
        else:
            weight = torch.randn(shape, generator=generator) * std
        scores = torch.empty(shape)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
        like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.register_buffer("weight", weight.to(**like))
        self.register_buffer("bias", None if layer.bias is None else torch.zeros_like(layer.bias.detach()))
        self.scores = nn.Parameter(scores.to(**like))

    def mask(self) -> torch.Tensor:
        """``[*W]`` bool: the weights the forward pass uses now."""
        return top_k_mask(self.scores.detach(), self.n_active).bool()

    def masked_weight(self) -> torch.Tensor:
        """``weight * top_k_mask(scores)``, differentiable in the scores (straight through the top-k)."""
        return self.weight * top_k_mask(self.scores, self.n_active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The replaced layer's computation with :meth:`masked_weight`."""
        weight = self.masked_weight()
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_dense(self) -> nn.Linear | nn.Conv1d | nn.Conv2d:
        """A plain layer of the replaced kind: the masked weight (and the zero bias) as Parameters, the mask as its
        ``weight_mask`` buffer (the package's masked-layer form, which ``condense`` reads)."""
        out_size, in_size = self.weight.shape[:2]
        bias = self.bias is not None
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        if self.kind == "linear":
            dense: nn.Linear | nn.Conv1d | nn.Conv2d = nn.Linear(in_size, out_size, bias=bias, **like)
        else:
            kind = nn.Conv1d if self.kind == "conv1d" else nn.Conv2d
            dense = kind(
                in_size * self.groups,
                out_size,
                tuple(self.weight.shape[2:]),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=bias,
                **like,
            )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        attach_mask(dense, "weight", self.mask())  # zeroes the masked weights
        return dense

    def extra_repr(self) -> str:
        return f"kind={self.kind}, weight={tuple(self.weight.shape)}, n_active={self.n_active}"


def to_supermask(
    model: nn.Module,
    density: float,
    distribution: str = "uniform",
    init: str = "signed_constant",
    seed: int = 0,
    *,
    scale_fan: bool = False,
) -> nn.Module:
    """Replaces every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` (in place) by a :class:`SupermaskLayer`.

    Args:
        model: any module; layers of exactly those types are replaced (subclasses, e.g. inside
            ``nn.MultiheadAttention``, are left alone). Other parameters (normalization, embeddings) stay
            trainable: freeze them yourself for a pure supermask (the paper's BatchNorm is non-affine).
        density: global fraction of weights used, in ``(0, 1]`` (the paper's ``k``; 0.5 for its best results).
        distribution: per-layer densities: ``"uniform"`` (every layer at ``density``), ``"erk"`` or ``"er"``
            (see :func:`~sparseapps.core.distributions.target_nnz`); the global count is exact.
        init: the frozen weights: ``"signed_constant"`` (the paper's best) or ``"kaiming_normal"``.
        seed: seeds the weights and the scores, layer after layer in module order.
        scale_fan: scale each layer's init to its density (``std = sqrt(2 / (fan_in * density))``), as the official
            code's ``scale_fan`` option (off in its configs); without it a layer at density ``d`` shrinks its
            outputs by about ``sqrt(d)``, which measured here slows learning at low density (see
            ``docs/supermask.md``).

    Returns:
        ``model``, whose only new Parameters are the layers' ``scores`` (a ``SupermaskLayer`` when ``model``
        itself is a supported layer).

    Raises:
        ValueError: ``density`` outside ``(0, 1]``, an unknown ``init`` or ``distribution`` (the allowed values
            named), a convolution with non-zero padding mode, or no supported layer in ``model``.

    Example:
        >>> from torch import nn
        >>> model = to_supermask(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)), 0.1, "erk", seed=0)
        >>> {fqn: int(mask.sum()) for fqn, mask in masks(model).items()}   # 435 of 4352; the small layer denser
        {'0.weight': 284, '1.weight': 151}
    """
    check_number("density", density, low=0.0, high=1.0, low_open=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_choice("init", init, INITS)
    check_int("seed", seed, low=0)
    check_bool("scale_fan", scale_fan)
    targets = [(fqn, module) for fqn, module in model.named_modules() if type(module) in _KINDS]
    if not targets:
        raise ValueError(
            f"expected a model with at least one nn.Linear, nn.Conv1d or nn.Conv2d, got none in "
            f"{type(model).__name__}"
        )
    shapes = {_weight_fqn(fqn): tuple(module.weight.shape) for fqn, module in targets}
    counts = target_nnz(shapes, density, distribution)
    generator = torch.Generator().manual_seed(seed)
    for fqn, module in targets:
        layer = SupermaskLayer(
            module, counts[_weight_fqn(fqn)], init=init, generator=generator, scale_fan=scale_fan
        )
        if not fqn:
            return layer
        parent_name, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), name, layer)
    return model


def _weight_fqn(module_fqn: str) -> str:
    return f"{module_fqn}.weight" if module_fqn else "weight"


def _supermask_layers(model: nn.Module) -> list[tuple[str, SupermaskLayer]]:
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, SupermaskLayer)]
    if not layers:
        raise ValueError(
            f"expected a model with supermask layers (see to_supermask), got none in {type(model).__name__}"
        )
    return layers


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight fqn: [*W] bool}``: the weights each supermask layer of ``model`` uses now.

    Raises:
        ValueError: ``model`` has no supermask layer.
    """
    return {_weight_fqn(fqn): layer.mask() for fqn, layer in _supermask_layers(model)}


def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every supermask layer replaced by a plain layer holding its masked weight.

    The copy's outputs equal ``model``'s; its masked entries are exact zeros and each mask is the layer's
    ``weight_mask`` buffer, so the package's other tools (``condense``) read it as any masked model. ``model`` is
    left unchanged.

    Raises:
        ValueError: ``model`` has no supermask layer.
    """
    layers = _supermask_layers(model)
    if layers[0][0] == "":
        return layers[0][1].to_dense()
    dense = copy.deepcopy(model)
    for fqn, layer in layers:
        parent_name, _, name = fqn.rpartition(".")
        setattr(dense.get_submodule(parent_name), name, layer.to_dense())
    return dense


def edge_popup_optimizer(
    model: nn.Module,
    total_steps: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """SGD over the scores of ``model``'s supermask layers with a cosine schedule over ``total_steps``.

    Defaults: the official code's small-scale configs (lr 0.1, momentum 0.9, weight decay 1e-4 on the scores,
    cosine). Call ``scheduler.step()`` after each ``optimizer.step()``.

    Example:
        >>> from torch import nn
        >>> model = to_supermask(nn.Linear(4, 2), 0.5)
        >>> optimizer, scheduler = edge_popup_optimizer(model, total_steps=100)
        >>> len(optimizer.param_groups[0]["params"]), optimizer.param_groups[0]["lr"]
        (1, 0.1)
    """
    check_int("total_steps", total_steps, low=1)
    scores = [layer.scores for _, layer in _supermask_layers(model)]
    optimizer = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)


@dataclass(frozen=True)
class SharedWeightAccuracy:
    """Accuracy of one supermask network with every active weight set to each shared value."""

    weights: tuple[float, ...]
    accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean accuracy over the shared weights (WANN's ranking criterion)."""
        return statistics.fmean(self.accuracies)


@torch.no_grad()
def shared_weight_accuracy(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    weights: Sequence[float] = WANN_WEIGHTS,
    *,
    batch_size: int = 1024,
) -> SharedWeightAccuracy:
    """Classification accuracy of ``model``'s masks with all active weights set to one shared value ``w``.

    WANN's single-shared-weight evaluation (Gaier & Ha 2019), not its topology search: each supermask layer
    computes with ``w * mask`` (its bias stays, zero as :func:`to_supermask` builds it); ``model`` is left
    unchanged (its training mode restored).

    Args:
        model: a model with supermask layers.
        data: ``(inputs [N, ...], targets [N])``, class indices.
        weights: the shared values (default :data:`WANN_WEIGHTS`, WANN's ``-2, -1, -0.5, 0.5, 1, 2``).
        batch_size: examples per forward pass.

    Returns:
        accuracy per ``w`` (in the order given) and, as ``.mean``, their mean.

    Example:
        >>> from torch import nn
        >>> model = to_supermask(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5, seed=0)
        >>> x = torch.randn(50, 2)
        >>> result = shared_weight_accuracy(model, (x, (x[:, 0] > 0).long()), weights=[-1.0, 0.5, 1.0, 3.0])
        >>> result.accuracies[1] == result.accuracies[2] == result.accuracies[3]   # ReLU, no bias: scale-free
        True
    """
    layers = _supermask_layers(model)
    inputs, targets = data
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"expected as many targets as inputs (at least one), got {len(inputs)} and {len(targets)}"
        )
    values = tuple(check_number("weights[]", w) for w in weights)
    if not values:
        raise ValueError("expected at least one shared weight, got none")
    check_int("batch_size", batch_size, low=1)
    was_training = model.training
    model.eval()
    accuracies = []
    try:
        for w in values:
            shared = {_weight_fqn(fqn): torch.full_like(layer.weight, w) for fqn, layer in layers}
            correct = 0
            for start in range(0, len(inputs), batch_size):
                outputs = torch.func.functional_call(model, shared, (inputs[start : start + batch_size],))
                correct += int((outputs.argmax(1) == targets[start : start + batch_size]).sum())
            accuracies.append(correct / len(inputs))
    finally:
        model.train(was_training)
    return SharedWeightAccuracy(weights=values, accuracies=tuple(accuracies))
