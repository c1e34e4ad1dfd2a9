"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning by layer-wise reconstruction, and its magnitude baseline.

For a linear layer ``y = W x`` with calibration inputs ``X [in, N]``, SparseGPT looks for a sparse ``W'`` with a
small reconstruction error ``||(W - W') X||_F^2``, whose Hessian in each row of ``W`` is ``H = 2 X X^T``. It
visits the columns left to right; pruning column ``j``'s entries of a row (or keeping them, ``q = w``) leaves an
error ``e = (w_j - q_j) / U_jj`` that the Optimal Brain Surgeon update spreads over the columns not yet visited:
``w_k -= e * U_jk`` for ``k > j``. ``U`` is the upper Cholesky factor of the damped ``H^-1`` (``H^-1 = U^T U``):
its row ``j`` is the OBS update of column ``j`` with the columns before ``j`` already fixed, so one factor serves
every row at once. ``U_jj^2`` is the inverse-Hessian diagonal of that reduced problem, so the pruning score
``w^2 / U_jj^2`` is the OBS saliency (up to a factor 2).

The mask is chosen block by block (``block_size`` columns): in each block, the entries with the lowest score on
the weights as updated so far, with an exact budget per block (the layer's ``round(sparsity * out * in)``
zeros spread over the blocks in proportion to their columns); for an ``N:M`` pattern, each row keeps the ``N``
highest-scoring of every ``M`` consecutive columns, chosen when the group's first column is reached. Updates to
the columns after the block are applied once per block (the "lazy batch" of the paper), which changes the
arithmetic order but not the result.

:func:`prune_model` runs it layer after layer on a model: each layer's ``H`` comes from forward hooks on the
calibration data passed through the model whose earlier layers are already pruned, so later layers correct
for earlier layers' errors. :func:`magnitude_prune_model` is the baseline at the same layers and pattern.

Example:
    >>> x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]])      # X [in=3, N=2]; input 2 is always 0
    >>> weight = torch.tensor([[1.0, 2.0, 3.0]])
    >>> pruned, mask = prune_layer(weight, 2 * x @ x.T, sparsity=1 / 3)
    >>> mask                                  # the dead input's weight goes first: it costs nothing
    tensor([[ True,  True, False]])
    >>> magnitude_prune_layer(weight, sparsity=1 / 3)[1]
    tensor([[False,  True,  True]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import rules
from sparseapps.core.validation import check_int, check_number

__all__ = [
    "LayerReport",
    "layer_inputs",
    "magnitude_prune_layer",
    "magnitude_prune_model",
    "prune_layer",
    "prune_model",
    "reconstruction_error",
]


def _check_pattern(sparsity: float | None, n_m: tuple[int, int] | None) -> None:
    """Exactly one of ``sparsity`` in ``[0, 1)`` or ``n_m = (N, M)`` with ``1 <= N <= M``."""
    if (sparsity is None) == (n_m is None):
        raise ValueError(
            f"expected exactly one of sparsity or n_m (e.g. sparsity=0.5 or n_m=(2, 4)), "
            f"got sparsity={sparsity!r} and n_m={n_m!r}"
        )
    if sparsity is not None:
        check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        return
    valid = (
        isinstance(n_m, tuple)
        and len(n_m) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)
        and 1 <= n_m[0] <= n_m[1]
    )
    if not valid:
        raise ValueError(
            f"n_m must be a pair of integers (N, M) with 1 <= N <= M (keep N of every M), got {n_m!r}"
        )


def _check_columns(n_m: tuple[int, int] | None, columns: int, what: str) -> None:
    if n_m is not None and columns % n_m[1] != 0:
        raise ValueError(f"n_m={n_m!r} needs {what} divisible by M={n_m[1]}, got in_features={columns}")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"expected a weight [out, in] with out, in >= 1, got shape {tuple(weight.shape)}")


def _prune_count(sparsity: float, rows: int, columns: int) -> int:
    """Zeros of a ``[rows, columns]`` tensor at ``sparsity``: ``round(sparsity * rows * columns)``."""
    return round(sparsity * rows * columns)


def magnitude_prune_layer(
    weight: torch.Tensor, *, sparsity: float | None = None, n_m: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroes the smallest-magnitude entries of ``weight [out, in]``: the layer's lowest ``round(sparsity * numel)``,
    or per row the ``M - N`` smallest of every ``M`` consecutive columns.

    Returns:
        ``(new_weight [out, in], mask [out, in])``: ``mask`` is ``True`` where a weight is kept; the others are
        exactly zero in ``new_weight``; kept weights are unchanged.

    Example:
        >>> magnitude_prune_layer(torch.tensor([[0.5, -3.0, 1.5, -0.1]]), n_m=(1, 2))[0]
        tensor([[ 0.0000, -3.0000,  1.5000,  0.0000]])
    """
    _check_pattern(sparsity, n_m)
    _check_weight(weight)
    rows, columns = weight.shape
    _check_columns(n_m, columns, "in_features")
    magnitude = weight.detach().abs()
    if n_m is None:
        everything = torch.ones_like(magnitude, dtype=torch.bool)
        pruned = rules.select_top(magnitude, everything, _prune_count(sparsity, rows, columns), largest=False)
    else:
        n, m = n_m
        groups = magnitude.reshape(rows, columns // m, m)
        lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
        pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(rows, columns)
    return weight.detach().masked_fill(pruned, 0), ~pruned


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: the pruned ``weight`` with the surviving weights updated to reconstruct ``W X``.

    Args:
        weight: ``[out, in]`` the layer's weight ``W``.
        hessian: ``[in, in]`` ``H = 2 X X^T`` of the calibration inputs ``X [in, N]`` (any positive scale: the
            damping is relative). An input that is always zero (``H_jj = 0``) costs nothing to cut: its weights are
            pruned first.
        sparsity: the fraction of zeros, in ``[0, 1)``; exactly ``round(sparsity * out * in)`` entries are pruned.
        n_m: ``(N, M)``: keep ``N`` of every ``M`` consecutive weights of a row instead (``M`` divides ``in``).
        block_size: columns per mask-selection block (rounded down to a multiple of ``M``, at least ``M``, for
            ``n_m``). With ``H = I`` and one block (``block_size >= in``) the result is magnitude pruning.
        damp: ``damp * mean(diag H)`` is added to ``H``'s diagonal before it is inverted (> 0).

    Returns:
        ``(new_weight [out, in], mask [out, in])`` in ``weight``'s dtype: ``mask`` is ``True`` where a weight is
        kept; pruned weights are exactly zero. With nothing to prune the weight comes back unchanged.

    Raises:
        ValueError: a bad pattern (sparsity outside ``[0, 1)``, ``N > M``, ``M`` not dividing ``in``), a Hessian
            of the wrong shape, with NaN / inf entries, not symmetric, or not positive definite once damped;
            ``block_size < 1`` or ``damp <= 0``.

    Example:
        >>> h = torch.tensor([[2.0, 1.8], [1.8, 2.0]])        # two strongly correlated inputs
        >>> prune_layer(torch.tensor([[1.0, 0.9]]), h, n_m=(1, 2))[0]   # the kept weight takes over the cut one
        tensor([[0.0000, 1.7911]])
    """
    _check_pattern(sparsity, n_m)
    _check_weight(weight)
    rows, columns = weight.shape
    _check_columns(n_m, columns, "in_features")
    check_int("block_size", block_size, low=1)
    check_number("damp", damp, low=0.0, low_open=True)
    if hessian.shape != (columns, columns):
        raise ValueError(
            f"expected a hessian [in, in] = [{columns}, {columns}] for a weight {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    bad = int((~torch.isfinite(hessian)).sum())
    if bad:
        raise ValueError(f"hessian must be finite, got {bad} NaN or inf entries of {hessian.numel()}")
    if n_m is not None:
        block_size = max(n_m[1], block_size - block_size % n_m[1])

    h = hessian.detach().to(device=weight.device, dtype=torch.float64, copy=True)
    if float((h - h.T).abs().max()) > 1e-4 * float(h.abs().max()):
        raise ValueError(
            f"hessian must be symmetric (2 X X^T), got an asymmetry of {float((h - h.T).abs().max()):.3g} "
            f"for entries up to {float(h.abs().max()):.3g}"
        )
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"hessian + damp * mean(diag) * I is not positive definite (damp={damp!r}): expected a symmetric "
            "positive semi-definite 2 X X^T; raise damp if it is one"
        )
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)  # H^-1 = U^T U

    w = weight.detach().to(torch.float64).clone()
    pruned = torch.zeros(rows, columns, dtype=torch.bool, device=weight.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end]  # a view: updated in place
        u = upper[start:end, start:end]
        diagonal = u.diagonal()
        block_pruned = pruned[:, start:end]  # a view: filled in place
        if sparsity is not None:
            score = (block.pow(2) / diagonal.pow(2)).masked_fill(dead[start:end], 0.0)
            count = _prune_count(sparsity, rows, end) - _prune_count(sparsity, rows, start)
            block_pruned |= rules.select_top(score, torch.ones_like(block_pruned), count, largest=False)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if n_m is not None and j % n_m[1] == 0:
                n, m = n_m
                group = (block[:, j : j + m].pow(2) / diagonal[j : j + m].pow(2)).masked_fill(
                    dead[start + j : start + j + m], 0.0
                )
                lowest = torch.topk(group, m - n, dim=1, largest=False).indices
                block_pruned[:, j : j + m].scatter_(1, lowest, True)
            column = block[:, j]
            error = torch.where(block_pruned[:, j], column, 0.0) / diagonal[j]
            block[:, j:] -= error[:, None] * u[j, j:][None, :]
            errors[:, j] = error
        block.masked_fill_(block_pruned, 0.0)  # zero up to rounding already: make it exact
        w[:, end:] -= errors @ upper[start:end, end:]
    return w.to(weight.dtype), ~pruned


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||_F^2 / ||W X||_F^2`` from ``H = 2 X X^T [in, in]`` (0 for an all-zero ``W X``).

    Example:
        >>> x = torch.eye(2)
        >>> reconstruction_error(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]]), 2 * x @ x.T)
        0.64
    """
    h = hessian.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    difference = w - new_weight.detach().to(torch.float64)
    total = float(torch.einsum("oi,ij,oj->", w, h, w))
    return float(torch.einsum("oi,ij,oj->", difference, h, difference)) / total if total > 0 else 0.0


@dataclass(frozen=True)
class LayerReport:
    """One layer of :func:`prune_model`: relative reconstruction errors ``||(W - W') X||^2 / ||W X||^2`` on its
    calibration inputs ``X`` (those of the model pruned up to that layer)."""

    fqn: str
    shape: tuple[int, int]
    sparsity: float  # fraction of zeros in the layer's mask
    error_without_update: float  # the SparseGPT mask applied to the original weights, survivors unchanged
    error_with_update: float  # the SparseGPT weights
    error_magnitude: float  # magnitude pruning at the same pattern, on the same inputs


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    """``{fqn: Linear}``: the named ones, or every ``nn.Linear`` but the last registered (the output head)."""
    linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        if len(linears) < 2:
            raise ValueError(
                f"expected a model with a Linear besides its output head to prune, got {len(linears)} Linear "
                "modules; name the layers to prune with layers=[...]"
            )
        return dict(list(linears.items())[:-1])
    if isinstance(layers, str) or not layers:
        raise ValueError(f"expected layers as a non-empty list of Linear module names, got {layers!r}")
    unknown = [fqn for fqn in layers if fqn not in linears]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not nn.Linear modules of the model; its Linear modules: {list(linears)}"
        )
    return {fqn: linears[fqn] for fqn in dict.fromkeys(layers)}


def _check_batches(calibration_batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("calibration_batches is empty: expected at least one batch of model inputs")
    for index, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"calibration batch {index} must be a tensor, got {type(batch).__name__}")
        if batch.is_floating_point() or batch.is_complex():
            bad = int((~torch.isfinite(batch)).sum())
            if bad:
                raise ValueError(
                    f"calibration batch {index} must be finite, got {bad} NaN or inf values of {batch.numel()}"
                )
    return batches


def _call_order(model: nn.Module, modules: dict[str, nn.Linear], batch: torch.Tensor) -> list[str]:
    """The modules' fqns in the order of their first call in ``model(batch)``."""
    order: list[str] = []

    def record(fqn: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            if fqn not in order:
                order.append(fqn)

        return hook

    handles = [module.register_forward_hook(record(fqn)) for fqn, module in modules.items()]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [fqn for fqn in modules if fqn not in order]
    if missing:
        raise ValueError(f"layers {missing} are not called when the model runs on the calibration data")
    return order


def layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The rows ``[N, fan_in]`` that ``module``'s weight, viewed ``[out, fan_in]``, multiplies: a Linear's inputs, a
    convolution's unfolded patches (channel-major, as ``weight.reshape(out, -1)`` orders them).

    Example:
        >>> conv = nn.Conv1d(2, 3, kernel_size=3, padding=1)
        >>> x = torch.randn(4, 2, 5)
        >>> rows = layer_inputs(conv, x)
        >>> rows.shape
        torch.Size([20, 6])
        >>> out = (rows @ conv.weight.reshape(3, -1).T + conv.bias).reshape(4, 5, 3).transpose(1, 2)
        >>> torch.allclose(out, conv(x), atol=1e-6)
        True
    """
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1 or not isinstance(module.padding, tuple):
            raise ValueError(
                f"{type(module).__name__} with groups={module.groups}, padding={module.padding!r}: SparseGPT "
                "unfolds convolutions with groups=1 and numeric padding only; exclude the layer"
            )
        if isinstance(module, nn.Conv1d):
            inputs = inputs.unsqueeze(-2)
            kernel, dilation, stride = (
                (1, *getattr(module, name)) for name in ("kernel_size", "dilation", "stride")
            )
            padding = (0, *module.padding)
        else:
            kernel, dilation, padding, stride = (
                module.kernel_size,
                module.dilation,
                module.padding,
                module.stride,
            )
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise ValueError(f"SparseGPT reconstructs Linear and Conv1d/Conv2d layers, got {type(module).__name__}")


def _input_hessian(model: nn.Module, module: nn.Linear, batches: list[torch.Tensor]) -> torch.Tensor:
    """``H = 2 X X^T / N [in, in]`` (float64) over every input row ``module`` sees in ``model(batch)``."""
    total = torch.zeros(
        module.in_features, module.in_features, dtype=torch.float64, device=module.weight.device
    )
    rows = 0

    def accumulate(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal rows
        x = layer_inputs(module, inputs[0].detach()).to(torch.float64)
        total.add_(x.T @ x)
        rows += x.shape[0]

    handle = module.register_forward_pre_hook(accumulate)
    try:
        for batch in batches:
            model(batch)
    finally:
        handle.remove()
    return 2.0 * total / max(rows, 1)


def prune_model(
    model: nn.Module,
    calibration_batches: Sequence[torch.Tensor],
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> list[LayerReport]:
    """Prunes ``model``'s Linear layers one after another with :func:`prune_layer`, in place.

    Layers are taken in the order the model first calls them. For each, the Hessian of its inputs is collected
    by a forward hook while the model (its earlier layers already pruned) runs on every calibration batch;
    the layer is then pruned and its weight replaced. Biases and all other parameters are left as they are.

    Args:
        model: called as ``model(batch)``; it is run in eval mode (its mode is restored afterwards).
        calibration_batches: the inputs, e.g. ``[B, T]`` token windows; at least one, floating ones finite.
        sparsity: fraction of zeros per layer, in ``[0, 1)``. Exactly one of ``sparsity`` and ``n_m``.
        n_m: ``(N, M)``: keep ``N`` of every ``M`` consecutive weights of a row.
        layers: fqns of the ``nn.Linear`` modules to prune; default every ``nn.Linear`` but the last registered
            (the output head).
        block_size, damp: see :func:`prune_layer`.

    Returns:
        A :class:`LayerReport` per layer, in the order they were pruned.

    Raises:
        ValueError: a bad pattern, an empty calibration set, NaN / inf in a batch or in a layer's inputs, a name
            that is not a Linear of the model, ``M`` not dividing a layer's ``in_features``; all are checked
            before any weight changes except non-finite layer inputs.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = prune_model(model, [torch.randn(32, 8)], n_m=(2, 4))
        >>> [(r.fqn, r.sparsity) for r in report]
        [('0', 0.5), ('2', 0.5)]
    """
    _check_pattern(sparsity, n_m)
    check_int("block_size", block_size, low=1)
    check_number("damp", damp, low=0.0, low_open=True)
    batches = _check_batches(calibration_batches)
    modules = _select_layers(model, layers)
    for fqn, module in modules.items():
        _check_columns(n_m, module.in_features, f"in_features of {fqn!r}")
    training = model.training
    model.eval()
    reports = []
    try:
        with torch.no_grad():
            for fqn in _call_order(model, modules, batches[0]):
                module = modules[fqn]
                hessian = _input_hessian(model, module, batches)
                if not bool(torch.isfinite(hessian).all()):
                    raise ValueError(f"the inputs of layer {fqn!r} hold NaN or inf on the calibration data")
                weight = module.weight.detach().clone()
                new_weight, mask = prune_layer(
                    weight, hessian, sparsity=sparsity, n_m=n_m, block_size=block_size, damp=damp
                )
                magnitude, _ = magnitude_prune_layer(weight, sparsity=sparsity, n_m=n_m)
                reports.append(
                    LayerReport(
                        fqn=fqn,
                        shape=(module.out_features, module.in_features),
                        sparsity=1.0 - float(mask.float().mean()),
                        error_without_update=reconstruction_error(weight, weight * mask, hessian),
                        error_with_update=reconstruction_error(weight, new_weight, hessian),
                        error_magnitude=reconstruction_error(weight, magnitude, hessian),
                    )
                )
                module.weight.copy_(new_weight)
    finally:
        model.train(training)
    return reports


def magnitude_prune_model(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The baseline: :func:`magnitude_prune_layer` on the layers :func:`prune_model` would prune, in place.

    Returns:
        ``{fqn: mask [out, in]}``, ``True`` where a weight is kept.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> masks = magnitude_prune_model(model, sparsity=0.75)
        >>> {fqn: int(mask.sum()) for fqn, mask in masks.items()}
        {'0': 4}
    """
    _check_pattern(sparsity, n_m)
    modules = _select_layers(model, layers)
    for fqn, module in modules.items():
        _check_columns(n_m, module.in_features, f"in_features of {fqn!r}")
    masks = {}
    with torch.no_grad():
        for fqn, module in modules.items():
            new_weight, masks[fqn] = magnitude_prune_layer(module.weight, sparsity=sparsity, n_m=n_m)
            module.weight.copy_(new_weight)
    return masks
