"""N:M fine-grained structure: in every group of ``m`` consecutive inputs of a row, exactly ``n`` are active.

A weight ``[out, in, *kernel]`` is viewed as rows ``[out, fan_in]`` (as constant fan-in does), and each row is cut
into groups of ``m`` consecutive entries; ``fan_in`` must be a multiple of ``m``. 2:4 is the pattern sparse tensor
cores run (``torch.sparse.to_sparse_semi_structured``); general N:M (1:4, 2:8, 4:8, ...) is the same constraint.
A Conv weight's groups follow the flattened ``[in, kh, kw]`` order (the order constant fan-in and ``condense``
use), an Embedding table's run along the embedding dimension.

``SparsityConfig(n_m=(n, m))`` makes it a structure of the engine, like ``constant_fan_in``: the initial masks are
drawn N:M (:func:`random_mask`) and every topology update keeps them N:M (:func:`nm_update`), whatever the drop and
grow criteria, in both storages. N:M masks have a constant fan-in (``n / m * fan_in`` per row), so ``condense``
exports them to its condensed ``[out, k]`` layout; :func:`to_semi_structured` exports a 2:4 weight to the sparse
tensor cores of a CUDA device of capability 8.0 or more.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparseapps.core import rules
from sparseapps.core.validation import check_int

__all__ = [
    "check_n_m",
    "check_tensors",
    "groups",
    "is_n_m",
    "nm_update",
    "random_mask",
    "semi_structured_reason",
    "to_semi_structured",
    "to_semi_structured_model",
    "top_n_of_m",
]


def check_n_m(
    n_m: tuple[int, int], shape: torch.Size | tuple[int, ...] | None = None, name: str = "n_m"
) -> None:
    """Raise ``ValueError`` naming the value unless ``0 < n <= m`` and ``shape``'s fan-in is a multiple of ``m``.

    Example:
        >>> check_n_m((2, 4), (8, 12))
        >>> check_n_m((2, 4), (8, 10))
        Traceback (most recent call last):
        ...
        ValueError: n_m=(2, 4) needs a fan-in that is a multiple of 4; the tensor of shape (8, 10) has fan-in 10
    """
    if not isinstance(n_m, tuple | list) or len(n_m) != 2:
        raise ValueError(f"{name} must be a pair (n, m) such as (2, 4), got {n_m!r}")
    n, m = n_m
    check_int(f"{name}[1] (m)", m, low=1)
    check_int(f"{name}[0] (n)", n, low=1, high=m)
    if shape is not None:
        shape = tuple(shape)
        fan_in = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 0
        if fan_in == 0 or fan_in % m:
            raise ValueError(
                f"{name}={tuple(n_m)} needs a fan-in that is a multiple of {m}; the tensor of shape {shape} has "
                f"fan-in {fan_in}"
            )


def check_tensors(
    shapes: Mapping[str, Sequence[int]],
    n_m: tuple[int, int],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Raise ``ValueError`` naming the tensor unless every one of ``shapes`` can hold ``n_m`` (its fan-in a multiple
    of ``m``) and every given mask is N:M already (the engine's ``initial_masks``).

    A tensor that cannot hold the structure is not kept dense behind the user's back: the message names it, and
    ``SparsityConfig(exclude=...)`` (the one way to keep a tensor dense) does it.

    Example:
        >>> check_tensors({"0.weight": (8, 12), "2.weight": (3, 10)}, (2, 4))
        Traceback (most recent call last):
        ...
        ValueError: n_m=(2, 4) needs a fan-in that is a multiple of 4; '2.weight' of shape (3, 10) has fan-in 10; keep it dense with SparsityConfig(exclude=('2.weight',))
    """
    n, m = n_m
    for fqn, shape in shapes.items():
        try:
            check_n_m(n_m, tuple(shape))
        except ValueError:
            fan_in = int(torch.Size(tuple(shape)[1:]).numel()) if len(shape) > 1 else 0
            raise ValueError(
                f"n_m={tuple(n_m)} needs a fan-in that is a multiple of {m}; {fqn!r} of shape {tuple(shape)} has "
                f"fan-in {fan_in}; keep it dense with SparsityConfig(exclude=({fqn!r},))"
            ) from None
    for fqn, mask in (masks or {}).items():
        if fqn in shapes and not is_n_m(mask, n, m):
            counts = groups(mask.bool(), m).sum(-1)
            bad = sorted(set(counts.reshape(-1).tolist()) - {n})
            raise ValueError(
                f"initial mask of {fqn!r} is not {n}:{m}: groups of {m} hold {bad} active entries instead of {n}"
            )


def groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``tensor [out, *]`` viewed as ``[out, fan_in // m, m]`` (groups of ``m`` consecutive inputs)."""
    return tensor.reshape(tensor.shape[0], -1, m)


def top_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The bool mask keeping, in every group of ``m`` consecutive inputs of each row, the ``n`` highest scores.

    Ties go to the lower position (a stable sort), so the result is deterministic for a given ``scores``.

    Example:
        >>> s = torch.tensor([[0.1, 0.9, 0.5, 0.2, 4.0, 3.0, 2.0, 1.0]])
        >>> top_n_of_m(s, 2, 4).int().tolist()
        [[0, 1, 1, 0, 1, 1, 0, 0]]
    """
    check_n_m((n, m), scores.shape)
    grouped = groups(scores, m)
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def is_n_m(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row of ``mask`` holds exactly ``n`` nonzeros."""
    check_n_m((n, m), mask.shape)
    return bool((groups(mask.bool(), m).sum(-1) == n).all())


def random_mask(shape: Sequence[int], n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random N:M mask: ``n`` entries of every group drawn from one ``torch.rand`` of ``shape``.

    Example:
        >>> mask = random_mask((3, 8), 2, 4, torch.Generator().manual_seed(0))
        >>> is_n_m(mask, 2, 4), int(mask.sum())
        (True, 12)
    """
    shape = torch.Size(shape)
    check_n_m((n, m), shape)
    return top_n_of_m(torch.rand(shape, generator=generator), n, m)


def _check_update(
    mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n: int, m: int
) -> None:
    """The structure fits the mask, and both scores have the mask's shape (the updates' common check)."""
    check_n_m((n, m), mask.shape)
    if drop_scores.shape != mask.shape or grow_scores.shape != mask.shape:
        raise ValueError(
            f"expected scores of the mask's shape {tuple(mask.shape)}, got {tuple(drop_scores.shape)} and "
            f"{tuple(grow_scores.shape)}"
        )


def nm_update(
    mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n_drop: int, n: int, m: int
) -> torch.Tensor:
    """One drop/grow update that keeps an N:M mask N:M (and so its nnz).

    1. Drop: the ``n_drop`` lowest ``drop_scores`` among the active entries, tensor-wide (as unstructured RigL
       drops, so the weakest groups lose the most).
    2. Grow: every group regrows as many entries as it lost, its best ``grow_scores`` among its entries that were
       inactive before the update; the entries just dropped are not candidates (RigL's rule). Only a group that
       lost more entries than it has other places (possible when ``n > m / 2``) grows the rest back among its
       just-dropped entries, best ``grow_scores`` first.

    Why the just-dropped entries are left out here, while the engine's unstructured rule (``rules.update_masks``)
    lets them compete: a group must regrow in itself, among ``m - n + lost`` entries, and a just-dropped entry
    often holds the best gradient there, so regrowing it undoes the drop. Measured on MNIST-1D (2:4 RigL at 50%,
    5 seeds, docs/nm.md), leaving them out gives 0.644 test accuracy against 0.629.

    Args:
        mask: ``[out, *]`` bool, N:M.
        drop_scores, grow_scores: ``[out, *]`` float, higher is better.
        n_drop: entries to drop tensor-wide (``rules.drop_counts``); at most the mask's nnz.
        n, m: the structure.

    Returns:
        The new ``[out, *]`` bool mask, N:M.

    Example (one row, two groups of 4, 2:4; the two weakest go, each group regrows its best fresh candidate):
        >>> mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
        >>> drop = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 9.0, 0.0]])
        >>> grow = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.9, 0.7, 0.0, 0.2]])
        >>> nm_update(mask, drop, grow, 2, 2, 4).int().tolist()
        [[1, 0, 1, 0, 1, 0, 1, 0]]
    """
    _check_update(mask, drop_scores, grow_scores, n, m)
    nnz = int(torch.count_nonzero(mask))
    if not 0 <= n_drop <= nnz:
        raise ValueError(f"n_drop must be in [0, nnz={nnz}], got {n_drop}")
    before = groups(mask.bool(), m).reshape(-1, m)
    after_drop = groups(rules.drop(mask, drop_scores, n_drop), m).reshape(-1, m)
    lost = n - after_drop.sum(1)
    if bool((lost < 0).any()):
        raise ValueError(f"mask is not {n}:{m}: a group holds more than {n} active entries")
    scores = groups(grow_scores, m).reshape(-1, m)
    fresh = ~before
    grown = rules.select_top_per_row(scores, fresh, torch.minimum(lost, fresh.sum(1)))
    short = lost - grown.sum(1)  # nonzero only where n > m / 2
    if bool(short.any()):
        grown |= rules.select_top_per_row(scores, before & ~after_drop, short)
    return (after_drop | grown).reshape(mask.shape)


def nm_swap_update(
    mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n_drop: int, n: int, m: int
) -> torch.Tensor:
    """One N:M update led by growth: ``n_drop`` swaps inside groups, the tensor's best ``grow_scores`` first.

    Each group offers up to ``min(n, m - n)`` swaps: its ``k``-th best inactive entry (by ``grow_scores``) in for
    its ``k``-th weakest active entry (by ``drop_scores``). The ``n_drop`` swaps whose incoming entry scores highest,
    tensor-wide, are made (RigL's growth ranking, where :func:`nm_update` ranks by the drop instead; ``n_drop`` is
    capped at the swaps the groups offer); within a group the drop scores only choose which entry leaves. Each
    group keeps exactly ``n`` active entries. Chosen over :func:`nm_update` for ranked growth on MNIST-1D
    validation and confirmed on the test split (docs/nm_registration.md).

    Example (one row, two groups of 4, 2:4, one swap: the best inactive grow score is 0.9 in the second group,
    whose weaker active entry leaves):
        >>> mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
        >>> drop = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 9.0, 0.0]])
        >>> grow = torch.tensor([[0.0, 0.0, 0.8, 0.1, 0.9, 0.0, 0.0, 0.2]])
        >>> nm_swap_update(mask, drop, grow, 1, 2, 4).int().tolist()
        [[1, 1, 0, 0, 1, 0, 1, 0]]
    """
    _check_update(mask, drop_scores, grow_scores, n, m)
    active = groups(mask.bool(), m).reshape(-1, m)
    if bool((active.sum(1) != n).any()):
        raise ValueError(f"mask is not {n}:{m}: a group does not hold exactly {n} active entries")
    per_group = min(n, m - n)
    if n_drop < 0:
        raise ValueError(f"n_drop must be >= 0, got {n_drop}")
    n_drop = min(n_drop, per_group * active.shape[0])  # a group swaps at most min(n, m - n) entries
    grow = groups(grow_scores, m).reshape(-1, m).detach().float()
    drop = groups(drop_scores, m).reshape(-1, m).detach().float()
    # k-th best inactive and k-th weakest active entry of every group, k < per_group
    incoming = grow.masked_fill(active, float("-inf")).argsort(dim=1, descending=True, stable=True)
    incoming = incoming[:, :per_group]
    outgoing = drop.masked_fill(~active, float("inf")).argsort(dim=1, stable=True)[:, :per_group]
    gains = grow.gather(1, incoming)  # [G, per_group], descending along k
    chosen = torch.zeros_like(gains, dtype=torch.bool).reshape(-1)
    if n_drop:
        chosen[gains.reshape(-1).topk(n_drop, sorted=False).indices] = True
    chosen = chosen.reshape(gains.shape)
    # a group's k-th swap is only chosen with its better ones: the gains fall along k, ties kept in order
    chosen = chosen.sum(1, keepdim=True) > torch.arange(per_group, device=mask.device)
    after = active.clone()
    rows = torch.arange(active.shape[0], device=mask.device).unsqueeze(1).expand_as(chosen)
    after[rows[chosen], outgoing[chosen]] = False
    after[rows[chosen], incoming[chosen]] = True
    return after.reshape(mask.shape)


def semi_structured_reason(mask: torch.Tensor, device: torch.device | str | None = None) -> str | None:
    """Why ``to_semi_structured`` cannot export a weight of ``mask``'s pattern on ``device`` (default: the current
    CUDA device); ``None`` when it can. Sparse tensor cores need CUDA capability >= 8.0 and at most 2 active
    entries in every group of 4 consecutive inputs (2:4; 1:4 fits too).

    Example:
        >>> reason = semi_structured_reason(torch.ones(16, 16, dtype=torch.bool), "cpu")
        >>> reason.startswith("the mask is not 2:4")
        True
    """
    if mask.dim() != 2 or mask.shape[1] % 4:
        return f"the weight must be 2-D [out, in] with in a multiple of 4, got shape {tuple(mask.shape)}"
    counts = groups(mask.bool(), 4).sum(-1)
    if bool((counts > 2).any()):
        return (
            f"the mask is not 2:4: a group of 4 consecutive inputs holds {int(counts.max())} active entries"
        )
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return f"semi-structured sparse tensors need a CUDA device, got device {str(device)!r}"
    if not torch.cuda.is_available():
        return "semi-structured sparse tensors need a CUDA device; torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"sparse tensor cores need CUDA capability >= 8.0, got {capability[0]}.{capability[1]}"
    return None


def to_semi_structured(
    weight: torch.Tensor, mask: torch.Tensor, *, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """``weight * mask`` as a ``torch.sparse.SparseSemiStructuredTensor`` on the sparse tensor cores of a CUDA
    device of capability >= 8.0 (``torch.sparse.to_sparse_semi_structured``).

    Args:
        weight: ``[out, in]`` float; moved to the current CUDA device when on the CPU.
        mask: ``[out, in]`` bool, at most 2 active entries in every group of 4 consecutive inputs.
        dtype: the stored dtype (float16 or bfloat16 on cuSPARSELt; torch checks the dtype and its shape
            multiples, e.g. ``out`` and ``in`` multiples of 16 for float16).

    Raises:
        ValueError: the mask is not 2:4, or torch refuses the dtype or shape (its message quoted).
        RuntimeError: no CUDA device, or one below capability 8.0 (see :func:`semi_structured_reason`).

    Example (exports where the device allows; ``semi_structured_reason`` says why not elsewhere):
        >>> mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool).repeat(16, 4)
        >>> weight = torch.randn(16, 16)
        >>> if semi_structured_reason(mask) is None:
        ...     sparse = to_semi_structured(weight, mask)
        ...     assert torch.equal(sparse.to_dense().cpu(), (weight * mask).half())
    """
    if weight.shape != mask.shape:
        raise ValueError(
            f"weight and mask must share a shape, got {tuple(weight.shape)} and {tuple(mask.shape)}"
        )
    _raise_unless_exportable(mask, weight.device if weight.is_cuda else None, "the weight")
    target = weight.device if weight.is_cuda else torch.device("cuda", torch.cuda.current_device())
    dense = (weight.detach() * mask.to(weight.device)).to(device=target, dtype=dtype).contiguous()
    try:
        return torch.sparse.to_sparse_semi_structured(dense)
    except (RuntimeError, NotImplementedError) as error:
        raise ValueError(
            f"torch refused the {tuple(dense.shape)} {dtype} weight for a semi-structured sparse tensor: {error}"
        ) from error


def to_semi_structured_model(model: nn.Module, *, dtype: torch.dtype = torch.float16) -> nn.Module:
    """An inference copy of ``model`` on the current CUDA device in ``dtype``, in which every ``nn.Linear`` with a
    ``weight_mask`` holds a semi-structured sparse weight (see :func:`to_semi_structured`) and no mask. The original
    model is not modified.

    Raises:
        ValueError: no masked ``nn.Linear`` in ``model``, or one whose mask is not 2:4 (named), or torch refuses a
            weight's dtype or shape.
        RuntimeError: no CUDA device, or one below capability 8.0.
    """
    # imported here: masks imports the config, which imports this module
    from sparseapps.core.masks import detach_mask, get_mask

    layers = [
        (name, mask)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (mask := get_mask(module)) is not None
    ]
    if not layers:
        raise ValueError(f"expected an nn.Linear with a weight_mask in {type(model).__name__}, got none")
    for name, mask in layers:
        _raise_unless_exportable(mask, None, repr(name))
    copied = copy.deepcopy(model).to(device=torch.device("cuda", torch.cuda.current_device()), dtype=dtype)
    for name, _ in layers:
        layer = copied.get_submodule(name)
        mask = get_mask(layer)
        assert mask is not None  # copied from a masked layer
        sparse = to_semi_structured(layer.weight, mask, dtype=dtype)
        detach_mask(layer)
        layer.weight = nn.Parameter(sparse, requires_grad=False)
    return copied


def _raise_unless_exportable(mask: torch.Tensor, device: torch.device | None, what: str) -> None:
    reason = semi_structured_reason(mask, device)
    if reason is None:
        return
    kind = ValueError if reason.startswith(("the mask", "the weight")) else RuntimeError
    raise kind(f"cannot export {what} to a semi-structured sparse tensor: {reason}")
