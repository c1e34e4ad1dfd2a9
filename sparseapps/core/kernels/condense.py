"""``condense(model)``: an inference copy in which every masked Linear / Conv2d runs in its fastest correct form.

For each ``nn.Linear`` or ``nn.Conv2d`` with a ``weight_mask`` buffer (``sparseapps.core.masks``), and each
trainable compact layer (``sparseapps.core.compact.CompactLinear``, already CSR: its dense views enter the same
path, so it gets the same choice of forms):

1. rows that are all False (ablated neurons) are dropped and later restored as bias only;
2. the candidate forms are built: condensed (constant fan-in), CSR (any fan-in), dense over the active rows and
   columns (and, when asked, rows padded to the largest fan-in), sparse forms with a lane-blocked copy for
   small batches;
3. a :class:`~sparseapps.core.kernels.planner.Planner` measures them (or estimates them) at each planned batch
   size and keeps the fastest, combining forms in a :class:`BatchDispatchLinear` when different batch sizes
   prefer different forms.

The copy computes ``F.linear(x, weight * weight_mask, bias)`` (resp. the convolution) up to float rounding; the
original model is not modified. Other modules, masks on other kinds of layers included, are copied unchanged.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseapps.core.kernels import formats, library
from sparseapps.core.kernels.layers import (
    BatchDispatchLinear,
    CondensedConv2d,
    CondensedLinear,
    CSRLinear,
    DenseActiveLinear,
)
from sparseapps.core.kernels.planner import Candidate, Planner
from sparseapps.core.masks import get_mask

FORMS = ("auto", "condensed", "padded", "csr", "dense")
# A dense-active layer drops input columns only when at most this fraction of them is active.
_COLUMN_DROP_FRACTION = 0.9
# Batches up to this size can use the lane-blocked copy.
_BLOCKED_MAX = 4


@dataclass(frozen=True, kw_only=True)
class CondenseConfig:
    """How ``condense`` chooses and builds the inference layers.

    Example:
        >>> CondenseConfig(form="csr", planner="cost_model").form
        'csr'
    """

    form: str = field(
        default="auto",
        metadata={
            "help": "'auto' (planner decides), or force 'condensed', 'padded', 'csr' or 'dense' everywhere"
        },
    )
    batch_sizes: tuple[int, ...] = field(
        default=(1, 16, 256),
        metadata={"help": "batch sizes (rows of [*, in]) to plan for, without example_input"},
    )
    planner: str = field(
        default="measure",
        metadata={"help": "'measure' (time candidates once per shape, cached) or 'cost_model'"},
    )
    repeats: int = field(
        default=7, metadata={"help": "timed calls per candidate and batch size (median kept)"}
    )
    cache_path: str | None = field(
        default=None, metadata={"help": "JSON file keeping measurements across runs"}
    )
    index_dtype: str = field(
        default="auto", metadata={"help": "'auto' (int16 when in <= 32768), 'int16', 'int32'"}
    )
    dtype: torch.dtype | None = field(
        default=None,
        metadata={"help": "weight dtype of the copy: None (keep), torch.float32 or torch.bfloat16"},
    )
    blocked: str = field(
        default="auto",
        metadata={"help": "lane-blocked copy for batches <= 4: 'auto' (when it measures faster) or 'never'"},
    )
    blocked_schedule: str = field(
        default="auto", metadata={"help": "lane-blocked step schedule: 'auto', 'greedy' or 'aligned'"}
    )
    max_padding: float = field(
        default=1.25,
        metadata={"help": "'auto' considers padded rows only when stored / real nonzeros <= this"},
    )
    conv_input_hw: tuple[int, int] = field(
        default=(32, 32),
        metadata={"help": "input height and width assumed for Conv2d planning without example_input"},
    )

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"expected form in {FORMS}, got {self.form!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"expected batch_sizes as positive ints, got {self.batch_sizes!r}")
        if self.planner not in ("measure", "cost_model"):
            raise ValueError(f"expected planner in ('measure', 'cost_model'), got {self.planner!r}")
        if self.repeats < 1:
            raise ValueError(f"expected repeats >= 1, got {self.repeats}")
        if self.index_dtype not in ("auto", "int16", "int32"):
            raise ValueError(f"expected index_dtype in ('auto', 'int16', 'int32'), got {self.index_dtype!r}")
        if self.dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"expected dtype None, torch.float32 or torch.bfloat16, got {self.dtype!r}")
        if self.blocked not in ("auto", "never"):
            raise ValueError(f"expected blocked in ('auto', 'never'), got {self.blocked!r}")
        if self.blocked_schedule not in ("auto", "greedy", "aligned"):
            raise ValueError(
                f"expected blocked_schedule in ('auto', 'greedy', 'aligned'), got {self.blocked_schedule!r}"
            )
        if not self.max_padding >= 1.0:
            raise ValueError(f"expected max_padding >= 1.0, got {self.max_padding}")
        if len(self.conv_input_hw) != 2 or any(v < 1 for v in self.conv_input_hw):
            raise ValueError(f"expected conv_input_hw as two positive ints, got {self.conv_input_hw!r}")


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` in ``model`` whose weight has a mask, and of every
    compact layer."""
    compact = _compact_type()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, compact)
        or (isinstance(module, (nn.Linear, nn.Conv2d)) and get_mask(module, "weight") is not None)
    ]


def _compact_type() -> type[nn.Module]:
    # Imported here: compact layers are built on these kernels, so the compact package imports this one.
    from sparseapps.core.compact.layer import CompactLinear

    return CompactLinear


def _dense_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and its mask: a masked layer's own tensors, or the dense views of a compact layer."""
    if isinstance(module, _compact_type()):
        return module.to_dense_weight(), module.mask()
    return module.weight.detach(), get_mask(module, "weight")


def condense(
    model: nn.Module, config: CondenseConfig | None = None, *, example_input: object = None
) -> nn.Module:
    """An inference copy of ``model`` with its masked Linear / Conv2d layers condensed.

    Args:
        model: any module; layers with a ``weight_mask`` buffer are replaced in the copy.
        config: choices and planning; defaults to :class:`CondenseConfig()`.
        example_input: optional input (a tensor, or a tuple of positional arguments) to run the copy once and
            plan each layer for the batch size it actually sees.

    Returns:
        The copy, in eval mode; or ``model`` itself (with a warning) when it has no masked Linear / Conv2d.

    Raises:
        TypeError: ``model`` is not a module, or a layer's dtype is not float32/bfloat16 (set ``config.dtype``).
        ValueError: a mask is not a bool tensor of the weight's shape, a forced ``form="condensed"`` meets
            varying fan-ins, or an unsupported device.

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> mask = torch.rand(64, 32) < 0.2
        >>> model[0].register_buffer("weight_mask", mask)
        >>> fast = condense(model, CondenseConfig(planner="cost_model"))
        >>> type(fast[0]).__name__                # picks its kernel per batch size at run time
        'BatchDispatchLinear'
        >>> x = torch.randn(3, 32)
        >>> torch.allclose(fast(x), nn.functional.linear(x, model[0].weight * mask, model[0].bias).relu() @ model[2].weight.T + model[2].bias, atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    config = config or CondenseConfig()
    if not sparse_layers(model):
        warnings.warn(
            f"condense: {type(model).__name__} has no nn.Linear / nn.Conv2d with a 'weight_mask' buffer; "
            "returning it unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    library.ensure_loaded()
    for name, module in sparse_layers(model):
        _check_layer(name, module, config)
    inference = copy.deepcopy(model).eval()
    targets = sparse_layers(inference)
    seen = _observed_inputs(inference, targets, example_input) if example_input is not None else {}
    planner = Planner(method=config.planner, repeats=config.repeats, cache_path=config.cache_path)
    for name, module in targets:
        with torch.no_grad():
            if isinstance(module, nn.Conv2d):
                replacement = _condense_conv(name, module, config, planner, seen.get(name))
            else:
                replacement = _condense_linear(name, module, config, planner, seen.get(name))
        _replace(inference, name, replacement)
    return inference


def _check_layer(name: str, module: nn.Module, config: CondenseConfig) -> None:
    weight, mask = _dense_view(module)
    if mask is None or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"expected '{name}.weight_mask' as a bool tensor of shape {tuple(weight.shape)}, got "
            f"{None if mask is None else (mask.dtype, tuple(mask.shape))}"
        )
    if mask.device != weight.device:
        raise ValueError(
            f"expected '{name}.weight_mask' on {weight.device} (the weight's), got {mask.device}"
        )
    dtype = config.dtype or weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"expected '{name}.weight' in float32 or bfloat16 (or CondenseConfig.dtype set), got {weight.dtype}"
        )
    if weight.device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected '{name}' on a CPU or CUDA device, got {weight.device}")


def _observed_inputs(
    model: nn.Module, targets: list[tuple[str, nn.Module]], example_input: object
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in targets:

        def hook(_module: nn.Module, args: tuple[object, ...], _name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes[_name] = tuple(args[0].shape)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def _weights(
    module: nn.Module, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weight (masked, in ``dtype`` or its own), mask and bias of a layer checked by :func:`_check_layer`."""
    weight, mask = _dense_view(module)
    assert mask is not None  # checked by _check_layer
    weight = (weight * mask).to(dtype or weight.dtype)
    bias = module.bias.detach().to(weight.dtype).clone() if module.bias is not None else None
    return weight, mask, bias


def _conv_as_matrix(
    conv: nn.Conv2d, weight: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C_out, C_in / g, kh, kw]`` -> ``[C_out, C_in * kh * kw]`` over im2col columns, zeros across groups."""
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    taps = weight.shape[2] * weight.shape[3]
    groups = conv.groups
    width = conv.in_channels * taps
    if groups == 1:
        return weight.reshape(out_channels, width), mask.reshape(out_channels, width)
    full = weight.new_zeros(out_channels, width)
    full_mask = torch.zeros(out_channels, width, dtype=torch.bool, device=mask.device)
    out_per_group = out_channels // groups
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        columns = slice(group * in_per_group * taps, (group + 1) * in_per_group * taps)
        full[rows, columns] = weight[rows].reshape(out_per_group, -1)
        full_mask[rows, columns] = mask[rows].reshape(out_per_group, -1)
    return full, full_mask


def _sparse_forms(
    stats: formats.MaskStats, config: CondenseConfig, device: torch.device, name: str
) -> list[str]:
    if config.form == "condensed" and not stats.constant_fan_in:
        raise ValueError(
            f"'{name}': form='condensed' needs a constant fan-in, got fan-ins from {stats.min_fan_in} to "
            f"{stats.max_fan_in}; use form='csr', 'padded' or 'auto'"
        )
    if config.form != "auto":
        return [config.form] if config.form != "dense" else []
    if stats.constant_fan_in:
        return ["condensed"]
    forms = ["csr"]
    if device.type == "cuda" and stats.padding_ratio <= config.max_padding:
        forms.append("padded")
    return forms


def _build_sparse(
    form: str,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    config: CondenseConfig,
    blocked: formats.BlockedArrays | None,
) -> nn.Module:
    out_features, in_features = weight.shape
    index_dtype = formats.index_dtype_for(in_features, config.index_dtype)
    cpu_weight, cpu_mask, cpu_rows = weight.cpu(), mask.cpu(), rows.cpu()
    row_map = None if len(rows) == out_features else cpu_rows
    if form in ("condensed", "padded"):
        values, indices = formats.condensed_arrays(
            cpu_weight, cpu_mask, cpu_rows, index_dtype, pad=form == "padded"
        )
        module: nn.Module = CondensedLinear(
            in_features=in_features,
            out_features=out_features,
            values=values,
            indices=indices,
            rows=row_map,
            bias=None if bias is None else bias.cpu(),
            blocked=blocked,
            blocked_max_batch=_BLOCKED_MAX if blocked is not None else 0,
            padded=form == "padded",
        )
    else:
        row_ptr, values, indices = formats.csr_arrays(cpu_weight, cpu_mask, cpu_rows, index_dtype)
        module = CSRLinear(
            in_features=in_features,
            out_features=out_features,
            row_ptr=row_ptr,
            values=values,
            indices=indices,
            rows=row_map,
            bias=None if bias is None else bias.cpu(),
            blocked=blocked,
            blocked_max_batch=_BLOCKED_MAX if blocked is not None else 0,
        )
    return module.to(weight.device)


def _build_dense(
    weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor
) -> DenseActiveLinear:
    out_features, in_features = weight.shape
    columns = mask.any(0).nonzero().flatten()
    keep_columns = columns.numel() <= _COLUMN_DROP_FRACTION * in_features
    matrix = weight[rows]
    if keep_columns:
        matrix = matrix[:, columns]
    return DenseActiveLinear(
        in_features=in_features,
        out_features=out_features,
        weight=matrix,
        rows=None if len(rows) == out_features else rows,
        columns=columns if keep_columns else None,
        bias=bias,
    )


def _sparse_candidates(
    name: str,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    config: CondenseConfig,
    small_batches: bool,
) -> tuple[formats.MaskStats, list[Candidate]]:
    stats = formats.mask_stats(mask)
    rows = formats.active_rows(mask)
    candidates: list[Candidate] = []
    sparse = _sparse_forms(stats, config, weight.device, name)
    use_blocked = (
        small_batches
        and config.blocked == "auto"
        and weight.device.type == "cpu"
        and stats.nnz > 0
        and stats.in_features <= formats.BLOCKED_MAX_WIDTH
    )
    blocked = (
        formats.blocked_arrays(weight.cpu(), mask.cpu(), rows.cpu(), schedule=config.blocked_schedule)
        if use_blocked and sparse
        else None
    )
    for form in sparse:
        module = _build_sparse(form, weight, mask, bias, rows, config, blocked)
        candidates.append(Candidate(form=form, path="rows", module=module))
        if blocked is not None:
            # A small product may be faster on one thread than across all (a parallel region costs
            # microseconds, and much more when other processes hold the cores): the planner decides.
            for threads in (0, 1) if torch.get_num_threads() > 1 else (0,):
                candidates.append(Candidate(form=form, path="blocked", module=module, threads=threads))
    if config.form in ("auto", "dense"):
        candidates.append(
            Candidate(form="dense", path="dense", module=_build_dense(weight, mask, bias, rows))
        )
    return stats, candidates


def _finish_sparse(module: nn.Module, blocked: list[tuple[int, Candidate]]) -> nn.Module:
    """Keeps the lane-blocked copy only for the batch sizes where it won, with the thread limit that won at the
    largest of them."""
    if hasattr(module, "blocked_max_batch"):
        if blocked:
            batch, candidate = max(blocked, key=lambda item: item[0])
            module.blocked_max_batch = batch
            module.blocked_threads = candidate.threads
        elif module.blocked_values is not None:
            module._set_blocked(None, 0, module.in_features)
    return module


def _assemble(choice: dict[int, Candidate]) -> nn.Module:
    """One module, or a BatchDispatchLinear over the forms chosen for increasing batch sizes."""
    batches = sorted(choice)
    segments: list[tuple[nn.Module, list[int]]] = []
    for batch in batches:
        module = choice[batch].module
        if segments and segments[-1][0] is module:
            segments[-1][1].append(batch)
        else:
            segments.append((module, [batch]))
    for module in {id(m): m for m, _ in segments}.values():
        _finish_sparse(
            module,
            [(b, choice[b]) for b in batches if choice[b].module is module and choice[b].path == "blocked"],
        )
    if len(segments) == 1:
        return segments[0][0]
    bounds = [
        max(segment[1][-1], math.isqrt(segment[1][-1] * following[1][0]))
        for segment, following in itertools.pairwise(segments)
    ]
    return BatchDispatchLinear([m for m, _ in segments], bounds)


def _condense_linear(
    name: str, linear: nn.Linear, config: CondenseConfig, planner: Planner, seen: tuple[int, ...] | None
) -> nn.Module:
    weight, mask, bias = _weights(linear, config.dtype)
    dtype = weight.dtype
    batch_sizes = (
        (max(1, math.prod(seen[:-1])),) if seen is not None else tuple(sorted(set(config.batch_sizes)))
    )
    small = any(b <= _BLOCKED_MAX for b in batch_sizes)
    stats, candidates = _sparse_candidates(name, weight, mask, bias, config, small)
    if len(candidates) == 1:
        return _assemble(dict.fromkeys(batch_sizes, candidates[0]))

    def make_input(batch: int) -> torch.Tensor:
        return torch.randn(batch, linear.in_features, device=weight.device).to(dtype)

    choice = _plan(planner, candidates, stats, batch_sizes, make_input)
    return _assemble(choice)


def _plan(
    planner: Planner,
    candidates: list[Candidate],
    stats: formats.MaskStats,
    batch_sizes: tuple[int, ...],
    make_input: Callable[[int], torch.Tensor],
    extra: str = "",
) -> dict[int, Candidate]:
    small = [b for b in batch_sizes if b <= _BLOCKED_MAX]
    large = [b for b in batch_sizes if b > _BLOCKED_MAX]
    if small and any(c.path == "blocked" for c in candidates):
        # Also decide the lane-blocked path for the largest batch it supports, so batches between the
        # planned ones use it when it is faster there too.
        small = sorted({*small, _BLOCKED_MAX})
    choice: dict[int, Candidate] = {}
    if small:
        choice.update(planner.choose(candidates, stats, tuple(small), make_input, extra=extra))
    if large:
        rows_only = [c for c in candidates if c.path != "blocked"]
        choice.update(planner.choose(rows_only, stats, tuple(large), make_input, extra=extra))
    return choice


def _condense_conv(
    name: str, conv: nn.Conv2d, config: CondenseConfig, planner: Planner, seen: tuple[int, ...] | None
) -> nn.Module:
    if isinstance(conv.padding, str):
        raise ValueError(f"'{name}': expected numeric padding, got {conv.padding!r}")
    weight, mask, bias = _weights(conv, config.dtype)
    dtype = weight.dtype
    matrix, matrix_mask = _conv_as_matrix(conv, weight, mask)
    stats, candidates = _sparse_candidates(name, matrix, matrix_mask, bias, config, small_batches=False)
    candidates = [c for c in candidates if c.path != "dense"]
    wrapped = [
        Candidate(form=c.form, path=c.path, module=CondensedConv2d(c.module, conv)) for c in candidates
    ]
    if config.form in ("auto", "dense"):
        dense = copy.deepcopy(conv)
        del dense._buffers["weight_mask"]
        dense.weight.data = weight.clone()
        if bias is not None:
            dense.bias.data = bias.clone()
        dense = dense.to(dtype).requires_grad_(False)
        wrapped.append(Candidate(form="dense", path="dense", module=dense))
    if len(wrapped) == 1:
        return wrapped[0].module
    if seen is not None and len(seen) == 4:
        shapes = [seen]
    else:
        height, width = config.conv_input_hw
        shapes = [(b, conv.in_channels, height, width) for b in sorted(set(config.batch_sizes))]
    votes: dict[int, int] = {}
    for shape in shapes:

        def make_input(_batch: int, _shape: tuple[int, ...] = tuple(shape)) -> torch.Tensor:
            return torch.randn(_shape, device=weight.device).to(dtype)

        best = planner.choose(wrapped, stats, (shape[0],), make_input, extra=f"conv{shape[1:]}")[shape[0]]
        index = wrapped.index(best)
        votes[index] = votes.get(index, 0) + shape[0]
    return wrapped[max(votes, key=lambda i: votes[i])].module
