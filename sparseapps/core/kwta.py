"""Sparse activations: k-winners-take-all with boosting (Ahmad & Scheinkman 2019, "How can we be so dense?").

:class:`KWinners` keeps, per example, the ``k = round(percent_on * n)`` units with the largest *boosted*
activations and zeroes the others (it replaces the ReLU). Boosting favours units that win less often than the
target density ``percent_on``: the selection key of unit ``i`` is ``x_i * exp(beta * (percent_on - d_i))``, where
``d_i`` is the unit's duty cycle (how often it won over about the last ``duty_cycle_period`` examples) and
``beta`` the boost strength, multiplied by ``boost_strength_factor`` at every :func:`update_boost_strength`
(once per epoch). The winners keep their own value ``x_i`` (the boost only chooses them), so gradients flow to
the winners only. In eval mode ``k_inference = round(k * k_inference_factor)`` units win (the paper's 1.5: a
little denser at test time), chosen with the same boost (current duty cycles and strength); duty cycles change in
training mode only. Ties go to the lower unit, so exactly ``k`` units win.

Sparse weights come from the engine as for any model: ``DynamicSparsity(model, optimizer, config, total_steps)``
masks the Linear layers and leaves the k-WTA layers alone. After training, :func:`condense_kwta` fuses every
k-WTA layer with the Linear layer that follows it into a :class:`SparseInputLinear`: the compiled kernel
``sparseapps::kwta_csc_linear`` picks the winners and reads only their columns of the sparse weight (stored
column by column, CSC), ``k * nnz / in`` multiply-adds per example instead of ``nnz``.

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = make_mnist1d_kwta_mlp(percent_on=0.1)  # 40-100-100-10, 10 of 100 hidden units win
    >>> y = model(torch.randn(8, 40))
    >>> int((model[1](model[0](torch.randn(8, 40))) != 0).sum(1).max())
    10
    >>> fast = condense_kwta(model.eval())
    >>> x = torch.randn(3, 40)
    >>> bool(torch.allclose(fast(x), model(x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparseapps.core.kernels import formats, library
from sparseapps.core.kernels.condense import CondenseConfig, condense, sparse_layers
from sparseapps.core.kernels.reference import kwta_csc_linear_reference, kwta_mask_reference
from sparseapps.core.masks import get_mask
from sparseapps.core.mnist1d import MNIST1D_CLASSES, MNIST1D_LENGTH

__all__ = [
    "KWinners",
    "SparseInputLinear",
    "condense_kwta",
    "make_mnist1d_kwta_mlp",
    "update_boost_strength",
]


def _check_activations(x: object, n: int, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[1] != n:
        raise ValueError(
            f"{where}: expected activations of shape [B, {n}] or [B, {n}, *spatial], got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected floating-point activations, got {x.dtype}")
    if bool(torch.isnan(x).any()):
        example, unit = (int(v) for v in torch.isnan(x).nonzero()[0][:2])
        raise ValueError(
            f"{where}: expected activations without NaN, got NaN at example {example}, unit {unit}"
        )
    return x


class KWinners(nn.Module):
    """k-winners-take-all over the ``n`` units of a ``[B, n]`` activation, with boosting; on a convolutional
    ``[B, n, *spatial]`` activation, over the ``n`` channels at each position (one duty cycle per channel).

    Args:
        n: units.
        percent_on: fraction of units that win in training, in (0, 1]; ``k = round(percent_on * n) >= 1``.
        boost_strength: ``beta >= 0`` at the start (0: no boosting).
        boost_strength_factor: in (0, 1]; :meth:`update_boost_strength` multiplies ``beta`` by it.
        duty_cycle_period: examples over which the duty cycles average (a running mean over
            ``min(period, examples seen)``).
        k_inference_factor: ``k_inference = min(n, round(k * factor))`` units win in eval mode; ``factor > 0``.

    State (buffers, so ``state_dict`` round-trips and a resumed run continues bit for bit): ``duty_cycle [n]``,
    ``boost_strength`` (the current ``beta``) and ``examples_seen`` (int64).

    Shapes:
        ``[B, n] -> [B, n]`` with ``k`` (training) or ``k_inference`` (eval) nonzeros per row at most;
        ``[B, n, *spatial] -> [B, n, *spatial]`` with that many per example and position.

    Example:
        >>> layer = KWinners(4, percent_on=0.5, boost_strength=0.0)
        >>> layer(torch.tensor([[0.1, 3.0, -2.0, 1.0]])).tolist()
        [[0.0, 3.0, 0.0, 1.0]]
        >>> layer.duty_cycle.tolist()  # units 1 and 3 won the one example seen
        [0.0, 1.0, 0.0, 1.0]
    """

    def __init__(
        self,
        n: int,
        percent_on: float,
        *,
        boost_strength: float = 1.0,
        boost_strength_factor: float = 0.9,
        duty_cycle_period: int = 1000,
        k_inference_factor: float = 1.5,
    ) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"expected n as an int >= 1, got {n!r}")
        if not 0.0 < percent_on <= 1.0:
            raise ValueError(f"expected percent_on in (0, 1], got {percent_on!r}")
        k = round(percent_on * n)
        if k < 1:
            raise ValueError(
                f"percent_on={percent_on!r} of n={n} leaves no winner (k = {k}); expected k >= 1"
            )
        if not boost_strength >= 0.0:
            raise ValueError(f"expected boost_strength >= 0, got {boost_strength!r}")
        if not 0.0 < boost_strength_factor <= 1.0:
            raise ValueError(f"expected boost_strength_factor in (0, 1], got {boost_strength_factor!r}")
        if (
            isinstance(duty_cycle_period, bool)
            or not isinstance(duty_cycle_period, int)
            or duty_cycle_period < 1
        ):
            raise ValueError(f"expected duty_cycle_period as an int >= 1, got {duty_cycle_period!r}")
        if not k_inference_factor > 0.0:
            raise ValueError(f"expected k_inference_factor > 0, got {k_inference_factor!r}")
        self.n = n
        self.percent_on = percent_on
        self.k = k
        self.k_inference = min(n, max(1, round(k * k_inference_factor)))
        self.boost_strength_factor = boost_strength_factor
        self.duty_cycle_period = duty_cycle_period
        self.k_inference_factor = k_inference_factor
        self.register_buffer("duty_cycle", torch.zeros(n))
        self.register_buffer("boost_strength", torch.tensor(float(boost_strength)))
        self.register_buffer("examples_seen", torch.tensor(0, dtype=torch.int64))

    def boost_factors(self) -> torch.Tensor:
        """``[n]``: ``exp(beta * (percent_on - duty_cycle))`` (all ones when ``beta == 0``)."""
        return torch.exp((self.percent_on - self.duty_cycle) * self.boost_strength)

    def _boosting(self) -> bool:
        return bool(self.boost_strength > 0)

    def winners(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, *spatial] -> [B, n, *spatial]`` bool: the winners among the ``n`` units (channels) at each
        example and position for the current mode (ties to the lower unit)."""
        keys = x.detach().movedim(1, -1)  # [B, *spatial, n]
        if self._boosting():
            keys = keys * self.boost_factors().to(keys.dtype)
        return kwta_mask_reference(keys, self.k if self.training else self.k_inference).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n] -> [B, n]`` (or ``[B, n, *spatial]``, k-WTA over the channels at each position): the winners
        keep their value, the other units are 0."""
        _check_activations(x, self.n, "KWinners")
        winners = self.winners(x)
        if self.training:
            self.update_duty_cycle(winners)
        return torch.where(winners, x, torch.zeros((), dtype=x.dtype, device=x.device))

    @torch.no_grad()
    def update_duty_cycle(self, winners: torch.Tensor) -> None:
        """Running mean of winning over a batch's ``[B, n, *spatial]`` bool ``winners``: with ``T =
        min(duty_cycle_period, examples seen including this batch)`` and ``a = min(1, B / T)``, ``duty_cycle =
        (1 - a) * duty_cycle + a * wins / (B * P)``, where ``wins[i]`` counts the (example, position) pairs that
        unit ``i`` won and ``P`` is the number of positions (1 for ``[B, n]``)."""
        batch = winners.shape[0]
        if batch == 0 or winners.numel() == 0:
            return
        dims = [0, *range(2, winners.dim())]
        wins = winners.sum(dim=dims, dtype=self.duty_cycle.dtype)
        samples = winners.numel() // self.n  # B * P
        self.examples_seen += batch
        period = min(self.duty_cycle_period, int(self.examples_seen))
        alpha = min(1.0, batch / period)
        self.duty_cycle.mul_(1.0 - alpha).add_(wins, alpha=alpha / samples)

    @torch.no_grad()
    def update_boost_strength(self) -> None:
        """``beta *= boost_strength_factor`` (call once per epoch, e.g. through :func:`update_boost_strength`)."""
        self.boost_strength.mul_(self.boost_strength_factor)

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, percent_on={self.percent_on}, k={self.k}, k_inference={self.k_inference}, "
            f"boost_strength={float(self.boost_strength):.4g}, boost_strength_factor={self.boost_strength_factor}, "
            f"duty_cycle_period={self.duty_cycle_period}"
        )


def update_boost_strength(model: nn.Module) -> int:
    """Decays the boost strength of every :class:`KWinners` in ``model`` once; returns how many there are.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), KWinners(4, 0.5, boost_strength=2.0, boost_strength_factor=0.5))
        >>> update_boost_strength(model), float(model[1].boost_strength)
        (1, 1.0)
    """
    layers = [m for m in model.modules() if isinstance(m, KWinners)]
    for layer in layers:
        layer.update_boost_strength()
    return len(layers)


def make_mnist1d_kwta_mlp(
    hidden: int = 100,
    percent_on: float = 0.1,
    *,
    boost_strength: float = 1.0,
    boost_strength_factor: float = 0.9,
    duty_cycle_period: int = 1000,
    k_inference_factor: float = 1.5,
) -> nn.Sequential:
    """``[B, 40] -> [B, 10]``: the MNIST-1D MLP of ``mnist1d.make_mnist1d_mlp`` (40-100-100-10) with a
    :class:`KWinners` in place of each hidden ReLU."""

    def kwinners() -> KWinners:
        return KWinners(
            hidden,
            percent_on,
            boost_strength=boost_strength,
            boost_strength_factor=boost_strength_factor,
            duty_cycle_period=duty_cycle_period,
            k_inference_factor=k_inference_factor,
        )

    return nn.Sequential(
        nn.Linear(MNIST1D_LENGTH, hidden),
        kwinners(),
        nn.Linear(hidden, hidden),
        kwinners(),
        nn.Linear(hidden, MNIST1D_CLASSES),
    )


class SparseInputLinear(nn.Module):
    """k-WTA then a sparse Linear that reads only the winners' weight columns (inference only).

    ``y = bias + sum over winners j of x_j * W[:, j]``: per example the ``k`` largest ``x * boost`` win (ties to
    the lower input; ``k >= in`` keeps every input, zeros skipped), and the weight is stored column by column
    (CSC: ``col_ptr [in + 1]``, ``row_indices [nnz]``, ``values [nnz]``), so an example costs ``k * nnz / in``
    multiply-adds. Runs the compiled ``sparseapps::kwta_csc_linear`` on float32 CPU inputs when the kernels are
    built, its twin ``reference.kwta_csc_linear_reference`` otherwise. Each example of a batch has its own
    winners; the kernel walks the batch one example at a time (in parallel across examples).

    Args:
        weight: ``[out, in]`` float32 weight (its masked entries zero).
        mask: ``[out, in]`` bool, the entries to store (all True for a dense layer).
        bias: ``[out]`` or None.
        k: winners per example.
        boost: ``[in]`` boost factors of the k-WTA, or None (no boosting).

    Shapes:
        ``[B, in] -> [B, out]`` (the k-WTA is over the ``in`` units of each example, as :class:`KWinners`' on
        ``[B, n]``).

    Example:
        >>> weight = torch.tensor([[1.0, 5.0, 0.0], [0.0, 0.0, 2.0]])
        >>> layer = SparseInputLinear(weight, weight != 0, None, k=2)
        >>> layer(torch.tensor([[3.0, -1.0, 2.0]])).tolist()  # inputs 0 and 2 win
        [[3.0, 4.0]]
    """

    def __init__(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        k: int,
        boost: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"expected a float32 weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(
                f"expected a bool mask of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        out_features, in_features = weight.shape
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"expected k as an int >= 1, got {k!r}")
        if boost is not None and (boost.shape != (in_features,) or boost.dtype != torch.float32):
            raise ValueError(
                f"expected boost as float32 [{in_features}], got {boost.dtype} {tuple(boost.shape)}"
            )
        if bias is not None and (bias.shape != (out_features,) or bias.dtype != torch.float32):
            raise ValueError(
                f"expected bias as float32 [{out_features}], got {bias.dtype} {tuple(bias.shape)}"
            )
        library.ensure_loaded()
        weight, mask = weight.detach(), mask.detach()
        col_ptr, row_indices = formats.csr_structure(
            mask.t().contiguous(), formats.index_dtype_for(out_features)
        )
        self.in_features = in_features
        self.out_features = out_features
        self.k = min(k, in_features)
        self.register_buffer("col_ptr", col_ptr)
        self.register_buffer("row_indices", row_indices.contiguous())
        self.register_buffer("values", weight.t()[mask.t()].contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("boost", None if boost is None else boost.detach().clone())

    @classmethod
    def from_layers(cls, kwinners: KWinners, linear: nn.Linear) -> SparseInputLinear:
        """The eval-mode ``linear(kwinners(x))``: ``k_inference`` winners, the current boost, ``linear``'s mask
        (``sparseapps.core.masks``) or every entry when it has none."""
        if linear.in_features != kwinners.n:
            raise ValueError(
                f"expected a Linear with {kwinners.n} inputs after the KWinners, got {linear.in_features}"
            )
        mask = get_mask(linear, "weight")
        weight = linear.weight.detach()
        mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.detach()
        boost = kwinners.boost_factors().detach().float() if kwinners._boosting() else None
        bias = None if linear.bias is None else linear.bias.detach()
        return cls((weight * mask).float(), mask, bias, k=kwinners.k_inference, boost=boost)

    @property
    def nnz(self) -> int:
        """Stored weights."""
        return self.values.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in] -> [B, out]``."""
        buffers = self._buffers
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input of shape [B, {self.in_features}], got {tuple(x.shape)}")
        args = (
            buffers["boost"],
            self.k,
            buffers["col_ptr"],
            buffers["row_indices"],
            buffers["values"],
            buffers["bias"],
            self.out_features,
        )
        if x.device.type == "cpu" and x.dtype == torch.float32 and library.ensure_loaded().compiled:
            return torch.ops.sparseapps.kwta_csc_linear(x, *args)
        return kwta_csc_linear_reference(x, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, nnz={self.nnz}, "
            f"boost={self.boost is not None}"
        )


def condense_kwta(model: nn.Sequential, config: CondenseConfig | None = None) -> nn.Sequential:
    """An inference copy of a sequential k-WTA model that exploits sparse weights and sparse activations.

    Every :class:`KWinners` directly followed by an ``nn.Linear`` becomes one :class:`SparseInputLinear` (its
    eval-mode winners, reading only their weight columns); every other masked Linear / Conv2d goes through
    ``kernels.condense`` with ``config``; other layers are copied. The copy computes the eval-mode outputs of
    ``model`` up to float rounding (winners chosen on equal keys, so the same units win); ``model`` is not
    modified.

    Raises:
        TypeError: ``model`` is not an ``nn.Sequential``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential, got {type(model).__name__}")
    children = list(model.children())
    layers: list[nn.Module] = []
    index = 0
    with torch.no_grad():
        while index < len(children):
            child = children[index]
            following = children[index + 1] if index + 1 < len(children) else None
            if isinstance(child, KWinners) and isinstance(following, nn.Linear):
                layers.append(SparseInputLinear.from_layers(child, following))
                index += 2
                continue
            if sparse_layers(nn.Sequential(child)):
                layers.append(condense(nn.Sequential(child), config)[0])
            else:
                layers.append(copy.deepcopy(child))
            index += 1
    return nn.Sequential(*layers).eval()
