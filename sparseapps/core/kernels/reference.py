"""Pure-torch twins of the compiled kernels: the same inputs, the same outputs, no extension needed.

They define what the kernels compute and are the path used wherever the compiled library is missing (not
built, failed to build, built for another torch) or the device has no compiled kernel. They gather the
activations each nonzero needs and accumulate in float32, like the kernels (float64 inputs in float64, for
gradient checks); work is chunked so memory stays bounded (about ``2**22`` gathered elements at a time) at any
batch size.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other dtype (what the kernels accumulate in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assemble_rows(
    y_rows: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
    lead: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Places ``y_rows [N, R]`` (accumulated) at output columns ``rows`` and adds the bias; ablated outputs = bias."""
    if rows is None:
        y = y_rows
    else:
        y = y_rows.new_zeros((y_rows.shape[0], out_features))
        y[:, rows] = y_rows
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype).reshape((*lead, out_features))


def condensed_linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``y[..., rows[r]] = sum_t values[r, t] * x[..., indices[r, t]] + bias``; other outputs get the bias alone.

    Args:
        x: ``[*, in]`` activations.
        values: ``[R, k]`` weights of the ``R`` kept (non-ablated) output neurons.
        indices: ``[R, k]`` int16/int32 input positions of those weights.
        bias: ``[out]`` or None.
        rows: ``[R]`` int64 output position of each kept row, or None when ``R == out``.
        out_features: ``out``.

    Returns:
        ``[*, out]`` in ``x.dtype``.
    """
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).to(accumulation_dtype(x.dtype))
    n_rows, k = values.shape
    y_rows = x2.new_zeros((x2.shape[0], n_rows))
    if x2.shape[0] > 0 and n_rows > 0 and k > 0:
        index = indices.long()
        weight = values.to(x2.dtype)
        step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0] * k))
        for r0 in range(0, n_rows, step):
            gathered = x2[:, index[r0 : r0 + step]]  # [N, chunk, k]
            y_rows[:, r0 : r0 + step] = (gathered * weight[r0 : r0 + step]).sum(-1)
    return assemble_rows(y_rows, bias, rows, out_features, lead, x.dtype)


def csr_linear_reference(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """The CSR twin: row ``r`` holds ``values[row_ptr[r]:row_ptr[r + 1]]`` at ``indices[...]``.

    Args:
        x: ``[*, in]`` activations.
        row_ptr: ``[R + 1]`` int64 offsets.
        values: ``[nnz]`` weights.
        indices: ``[nnz]`` int16/int32 input positions.
        bias: ``[out]`` or None.
        rows: ``[R]`` int64 output position of each row, or None when ``R == out``.
        out_features: ``out``.

    Returns:
        ``[*, out]`` in ``x.dtype``.
    """
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).to(accumulation_dtype(x.dtype))
    n_rows = row_ptr.numel() - 1
    y_rows = x2.new_zeros((x2.shape[0], n_rows))
    nnz = values.numel()
    if x2.shape[0] > 0 and nnz > 0:
        row_of = row_of_entries(row_ptr)
        index = indices.long()
        weight = values.to(x2.dtype)
        step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0]))
        for t0 in range(0, nnz, step):
            products = x2[:, index[t0 : t0 + step]] * weight[t0 : t0 + step]  # [N, chunk]
            y_rows.index_add_(1, row_of[t0 : t0 + step], products)
    return assemble_rows(y_rows, bias, rows, out_features, lead, x.dtype)


def row_of_entries(row_ptr: torch.Tensor) -> torch.Tensor:
    """``[nnz]`` int64 row of each entry of a CSR structure with offsets ``row_ptr [R + 1]``.

    Example:
        >>> row_of_entries(torch.tensor([0, 2, 2, 3]))
        tensor([0, 0, 2])
    """
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device), row_ptr.diff())


def csr_sddmm_reference(
    x: torch.Tensor, dy: torch.Tensor, row_ptr: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The weight gradient of a CSR layer on its active entries only (a sampled dense-dense product).

    ``grad[e] = sum_b dy[b, r] * x[b, indices[e]]`` for every entry ``e`` of row ``r``: the entries of
    ``dy^T x`` that the structure holds, never the dense product.

    Args:
        x: ``[*, in]`` the layer's inputs.
        dy: ``[*, out]`` the gradient of its outputs (same leading shape).
        row_ptr: ``[out + 1]`` int64 offsets.
        indices: ``[nnz]`` int16/int32 input positions.

    Returns:
        ``[nnz]`` in ``x.dtype``.
    """
    dtype = accumulation_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
    nnz = indices.numel()
    grad = x2.new_zeros(nnz)
    if x2.shape[0] > 0 and nnz > 0:
        row_of = row_of_entries(row_ptr)
        index = indices.long()
        step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0]))
        for t0 in range(0, nnz, step):
            chunk = slice(t0, t0 + step)
            grad[chunk] = (x2[:, index[chunk]] * dy2[:, row_of[chunk]]).sum(0)
    return grad.to(x.dtype)


def blocked_linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    lanes: torch.Tensor,
    chunks: torch.Tensor,
    group_ptr: torch.Tensor,
    lane_rows: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    max_threads: int = 0,
) -> torch.Tensor:
    """The lane-blocked twin (layout in ``formats.BlockedArrays``).

    Args:
        x: ``[*, in]`` activations.
        values: ``[S, 16]`` weights, zero in empty lanes.
        lanes: ``[S, 16]`` uint8 position among the step's two chunks of 16 inputs (bit 4: second chunk).
        chunks: ``[S, 2]`` int16 chunk numbers.
        group_ptr: ``[G + 1]`` int64 first step of each group of 16 rows.
        lane_rows: ``[G * 16]`` int64 output row of each lane, -1 for none; None when lane ``j`` is output ``j``
            (lanes at or past ``out`` empty).
        bias: ``[out]`` or None.
        out_features: ``out``.
        max_threads: thread limit of the compiled kernel (no effect here).

    Returns:
        ``[*, out]`` in ``x.dtype``.
    """
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).to(accumulation_dtype(x.dtype))
    n_groups = group_ptr.numel() - 1
    if lane_rows is None:
        lane_rows = torch.arange(n_groups * 16, device=x.device)
        lane_rows[out_features:] = -1
    y = x2.new_zeros((x2.shape[0], out_features))
    if x2.shape[0] > 0 and values.shape[0] > 0:
        group_of_step = torch.repeat_interleave(torch.arange(n_groups, device=x.device), group_ptr.diff())
        position = lanes.long()
        chunk = torch.where(position >= 16, chunks[:, 1:2].long(), chunks[:, 0:1].long())
        column = (chunk * 16 + (position & 15)).flatten()
        row = lane_rows[(group_of_step[:, None] * 16 + torch.arange(16, device=x.device)).flatten()]
        weight = values.to(x2.dtype).flatten()
        keep = (row >= 0) & (weight != 0)
        column, row, weight = column[keep], row[keep], weight[keep]
        x_padded = torch.nn.functional.pad(
            x2, (0, max(0, int(column.max()) + 1 - x2.shape[1]) if column.numel() else 0)
        )
        step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0]))
        for t0 in range(0, weight.numel(), step):
            products = x_padded[:, column[t0 : t0 + step]] * weight[t0 : t0 + step]
            y.index_add_(1, row[t0 : t0 + step], products)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape((*lead, out_features))


_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, constant: int) -> torch.Tensor:
    """``(a * constant) mod 2^32`` for int64 ``a`` in ``[0, 2^32)``, without int64 overflow (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hashed_uniform_reference(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[numel]`` float32 in ``[0, 1)``: value ``i`` is a fixed hash of ``(seed, i)`` (the compiled
    ``hashed_uniform``'s twin, bit for bit; runs on any device).

    Example:
        >>> u = hashed_uniform_reference(7, 5)
        >>> bool(((u >= 0) & (u < 1)).all()), torch.equal(u, hashed_uniform_reference(7, 5))
        (True, True)
    """
    if numel < 0 or seed < 0:
        raise ValueError(f"expected seed >= 0 and numel >= 0, got seed={seed}, numel={numel}")
    return hashed_uniform_at_reference(seed, torch.arange(numel, dtype=torch.int64, device=device))


def hashed_uniform_at_reference(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """``[K]`` float32: the values of :func:`hashed_uniform_reference` at ``positions [K]`` int64 (the compiled
    ``hashed_uniform_at``'s twin).

    Example:
        >>> torch.equal(hashed_uniform_at_reference(7, torch.tensor([4, 1])), hashed_uniform_reference(7, 5)[[4, 1]])
        True
    """
    if seed < 0 or (positions.numel() and int(positions.min()) < 0):
        raise ValueError(f"expected seed >= 0 and positions >= 0, got seed={seed}")
    key0, key1 = seed & _MASK32, (seed >> 32) & _MASK32
    h = _fmix32((_mul32(positions & _MASK32, 0x9E3779B9) + key0) & _MASK32)
    g = _fmix32(h ^ ((key1 + _mul32(positions >> 32, 0x85EBCA6B)) & _MASK32))
    return (g >> 8).to(torch.float32) * (1.0 / 16777216.0)


def grow_select_reference(
    dense: torch.Tensor | None,
    dy: torch.Tensor | None,
    x: torch.Tensor | None,
    rows: int,
    cols: int,
    excluded: torch.Tensor,
    n: int,
    seed: int,
    tie_noise: float,
    random: bool,
    dense_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n]`` int64 ascending: the ``n`` best positions of a ``[rows, cols]`` layer outside ``excluded`` (the
    compiled ``grow_select``'s twin). Scores: ``u(seed, i)`` if ``random``, else ``|g| + u(seed, i) * factor`` with
    ``g = dense`` or ``dy^T x`` and ``factor = max|g| * tie_noise`` (1 for an all-zero ``g``; no noise if
    ``tie_noise == 0``); best = higher score, ties to the lower position. With ``dense_rows`` (ascending int64),
    ``dense`` holds only those rows of ``g`` (``[len(dense_rows), cols]``) and every other row is 0.

    Example:
        >>> grow_select_reference(torch.tensor([[3.0, -5.0], [0.0, 4.0]]), None, None, 2, 2, torch.tensor([1]), 2,
        ...                       0, 0.0, False).tolist()
        [0, 3]
    """
    if random:
        scores = hashed_uniform_reference(seed, rows * cols, excluded.device)
    else:
        g = dense if dense is not None else dy.mT.mm(x)  # type: ignore[union-attr]
        if dense_rows is not None:
            g = g.new_zeros(rows, cols).index_copy_(0, dense_rows, g.reshape(-1, cols))
        scores = g.reshape(-1).float().abs()
        if tie_noise > 0:
            magnitude = scores.max() if scores.numel() else torch.zeros(())
            magnitude = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude)
            add_hashed_uniform_reference(scores, seed, float(magnitude * tie_noise))
    candidates = torch.ones(rows * cols, dtype=torch.bool, device=scores.device)
    candidates[excluded] = False
    index = candidates.nonzero().squeeze(1)
    if n > index.numel():
        raise ValueError(f"cannot select {n} entries from {index.numel()} candidates")
    order = torch.sort(scores[index], descending=True, stable=True).indices[:n]
    return index[order].sort().values


def sorted_index_reference(haystack: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """``[len(needles)]`` int64: the index of each needle in the ascending ``haystack``, -1 where absent (the
    compiled ``sorted_index``'s twin).

    Example:
        >>> sorted_index_reference(torch.tensor([2, 5, 9]), torch.tensor([1, 5, 9])).tolist()
        [-1, 1, 2]
    """
    if haystack.numel() == 0:
        return torch.full_like(needles, -1)
    slot = torch.searchsorted(haystack, needles).clamp_(max=haystack.numel() - 1)
    return torch.where(haystack[slot] == needles, slot, torch.full_like(slot, -1))


def merge_positions_reference(kept: torch.Tensor, grown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged, slots)``: the ascending union of two disjoint ascending position lists, and where each kept
    position landed (the compiled ``merge_positions``' twin).

    Example:
        >>> merged, slots = merge_positions_reference(torch.tensor([2, 7]), torch.tensor([0, 5]))
        >>> merged.tolist(), slots.tolist()
        ([0, 2, 5, 7], [1, 3])
    """
    merged = torch.cat([kept, grown]).sort().values
    return merged, torch.searchsorted(merged, kept)


def add_hashed_uniform_reference(scores: torch.Tensor, seed: int, factor: float) -> torch.Tensor:
    """``scores += hashed_uniform(seed) * factor`` in place (the compiled ``add_hashed_uniform_``'s twin; the
    product is rounded to float32 before the sum, as there). ``factor`` must be a float32 value.

    Example:
        >>> s = torch.zeros(3)
        >>> torch.equal(add_hashed_uniform_reference(s, 7, 2.0), hashed_uniform_reference(7, 3) * 2.0)
        True
    """
    noise = hashed_uniform_reference(seed, scores.numel(), scores.device).mul_(factor)
    return scores.add_(noise.view(scores.shape))


def csr_transpose_reference(
    row_ptr: torch.Tensor, indices: torch.Tensor, in_features: int, t_index_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transposed structure of a CSR layer (the compiled ``csr_transpose``'s twin): entries by column, rows
    ascending within a column.

    Returns:
        ``t_row_ptr [in + 1]`` int64, ``t_indices [nnz]`` (each entry's row, ``t_index_dtype``) and ``t_order
        [nnz]`` (int32, int64 past 2^31 entries: each transposed entry's position in the row-major values).

    Example:
        >>> ptr, rows, order = csr_transpose_reference(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 1]), 2,
        ...                                            torch.int16)
        >>> ptr.tolist(), rows.tolist(), order.tolist()
        ([0, 1, 3], [0, 0, 1], [1, 0, 2])
    """
    order = torch.argsort(indices, stable=True)  # on the narrow indices: 3x faster than on int64
    t_row_ptr = torch.zeros(in_features + 1, dtype=torch.int64, device=indices.device)
    t_row_ptr[1:] = torch.cumsum(torch.bincount(indices.long(), minlength=in_features), 0)
    rows = row_of_entries(row_ptr)[order].to(t_index_dtype).contiguous()
    return t_row_ptr, rows, order.to(torch.int32 if order.numel() < 2**31 else torch.int64)


def kwta_mask_reference(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, n] -> [N, n]`` bool: per row, the ``min(k, n)`` largest keys, ties to the lower position (the selection
    rule of ``kwta_csc_linear`` and of ``sparseapps.core.kwta.KWinners``). One ``topk`` for the k-th largest key,
    then the keys above it and, of those equal to it, the first ones.

    Example:
        >>> kwta_mask_reference(torch.tensor([[0.5, 2.0, 0.5, -1.0]]), 2).tolist()
        [[True, True, False, False]]
    """
    k = min(k, keys.shape[-1])
    if k == keys.shape[-1]:
        return torch.ones_like(keys, dtype=torch.bool)
    threshold = keys.topk(k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    above = keys > threshold
    tied = keys == threshold
    needed = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= needed))


def kwta_csc_linear_reference(
    x: torch.Tensor,
    boost: torch.Tensor | None,
    k: int,
    col_ptr: torch.Tensor,
    row_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """k-winners-take-all on ``x`` then a sparse linear layer stored column by column (``kwta_csc_linear``'s twin).

    Per example, the ``k`` largest keys ``x * boost`` (``x`` without boost; ties to the lower input) keep their
    value ``x``, the other inputs become 0, and ``y = bias + sum_j x_j W[:, j]`` over the kept inputs, where column
    ``j`` of ``W`` holds ``values[col_ptr[j]:col_ptr[j + 1]]`` at rows ``row_indices[...]``.

    Args:
        x: ``[*, in]`` pre-activations.
        boost: ``[in]`` boost factors, or None.
        k: winners per example (``k >= in``: every input, zeros contribute nothing).
        col_ptr: ``[in + 1]`` int64 offsets.
        row_indices: ``[nnz]`` int16/int32 output positions.
        values: ``[nnz]`` weights.
        bias: ``[out]`` or None.
        out_features: ``out``.

    Returns:
        ``[*, out]`` in ``x.dtype``.

    Raises:
        ValueError: ``k < 1`` or ``x`` holds NaN.

    Example:
        >>> x = torch.tensor([[3.0, -1.0, 2.0]])  # k = 2 keeps inputs 0 and 2
        >>> col_ptr = torch.tensor([0, 1, 2, 4])  # W = [[1, 5, 0], [0, 0, 2], [0, 0, 1]]
        >>> rows, values = torch.tensor([0, 0, 1, 2], dtype=torch.int16), torch.tensor([1.0, 5.0, 2.0, 1.0])
        >>> kwta_csc_linear_reference(x, None, 2, col_ptr, rows, values, None, 3).tolist()
        [[3.0, 4.0, 2.0]]
    """
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}")
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features).to(accumulation_dtype(x.dtype))
    if bool(torch.isnan(x2).any()):
        example, column = (int(v) for v in torch.isnan(x2).nonzero()[0])
        raise ValueError(f"expected x without NaN, got NaN at example {example}, input {column}")
    keys = x2 * boost.to(x2.dtype) if boost is not None else x2
    kept = torch.where(kwta_mask_reference(keys, k), x2, torch.zeros((), dtype=x2.dtype))
    weight = x2.new_zeros((out_features, in_features))
    weight.index_put_((row_indices.long(), row_of_entries(col_ptr)), values.to(x2.dtype), accumulate=True)
    y = kept @ weight.T
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape((*x.shape[:-1], out_features))
