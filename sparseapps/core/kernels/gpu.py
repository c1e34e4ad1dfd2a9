"""The GPU path: Triton kernels for condensed and CSR layers and for the compact layers' weight gradient.

Registered as the CUDA implementations of ``torch.ops.sparseapps.condensed_linear``, ``csr_linear`` (the forward
and, over the transposed structure, the input gradient of compact training layers) and ``csr_sddmm`` (their
weight gradient on the active entries); used only where a CUDA device exists, and Triton is imported on first
use, never at package import. Without Triton the reference twins run on the GPU instead. The kernels are checked
against the twins under ``TRITON_INTERPRET=1`` on CPU tensors (tests), and on a GPU where one exists (``gpu``
marker).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sparseapps.core.kernels import reference

_kernel: Any = None
_csr_kernels: Any = None


def triton_available() -> bool:
    """True when Triton can be imported (it still needs a CUDA device, or ``TRITON_INTERPRET=1``, to run)."""
    return importlib.util.find_spec("triton") is not None


def _build_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def condensed_rows_kernel(
        x_ptr,
        values_ptr,
        indices_ptr,
        y_ptr,
        n_batch,
        n_rows,
        k,
        stride_x,
        block_n: tl.constexpr,
        block_r: tl.constexpr,
        block_k: tl.constexpr,
    ):
        # y[n, r] = sum_t values[r, t] * x[n, indices[r, t]] for a [block_n, block_r] tile of (batch, rows).
        ns = tl.program_id(1) * block_n + tl.arange(0, block_n)
        rs = tl.program_id(0) * block_r + tl.arange(0, block_r)
        n_ok = ns < n_batch
        r_ok = rs < n_rows
        acc = tl.zeros((block_n, block_r), dtype=tl.float32)
        for k0 in range(0, k, block_k):
            ks = k0 + tl.arange(0, block_k)
            entry_ok = r_ok[:, None] & (ks[None, :] < k)
            offsets = rs[:, None].to(tl.int64) * k + ks[None, :]
            w = tl.load(values_ptr + offsets, mask=entry_ok, other=0.0).to(tl.float32)
            j = tl.load(indices_ptr + offsets, mask=entry_ok, other=0).to(tl.int64)
            x_offsets = ns[:, None, None].to(tl.int64) * stride_x + j[None, :, :]
            gathered = tl.load(x_ptr + x_offsets, mask=n_ok[:, None, None] & entry_ok[None, :, :], other=0.0)
            acc += tl.sum(gathered.to(tl.float32) * w[None, :, :], axis=2)
        y_offsets = ns[:, None].to(tl.int64) * n_rows + rs[None, :]
        tl.store(y_ptr + y_offsets, acc, mask=n_ok[:, None] & r_ok[None, :])

    return condensed_rows_kernel


def condensed_rows_triton(x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[N, in] -> [N, R]`` float32 with the Triton kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        x2: ``[N, in]`` contiguous activations.
        values: ``[R, k]`` contiguous weights.
        indices: ``[R, k]`` contiguous int16/int32 positions.

    Returns:
        ``[N, R]`` float32 row outputs (no bias, no scatter).
    """
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    n_batch, n_rows, k = x2.shape[0], values.shape[0], values.shape[1]
    y = torch.empty((n_batch, n_rows), dtype=torch.float32, device=x2.device)
    if n_batch == 0 or n_rows == 0:
        return y
    if k == 0:
        return y.zero_()
    block_n, block_r, block_k = 16, 32, 16
    grid = ((n_rows + block_r - 1) // block_r, (n_batch + block_n - 1) // block_n)
    _kernel[grid](
        x2,
        values,
        indices,
        y,
        n_batch,
        n_rows,
        k,
        x2.stride(0),
        block_n=block_n,
        block_r=block_r,
        block_k=block_k,
    )
    return y


def condensed_linear_cuda(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """CUDA implementation of ``sparseapps::condensed_linear`` (Triton when installed, else the reference)."""
    if not triton_available():
        return reference.condensed_linear_reference(x, values, indices, bias, rows, out_features)
    if x.dtype != values.dtype:
        raise TypeError(f"expected x of dtype {values.dtype} (the weights'), got {x.dtype}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y_rows = condensed_rows_triton(x2, values.contiguous(), indices.contiguous())
    return reference.assemble_rows(y_rows, bias, rows, out_features, lead, x.dtype)


def _build_csr_kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def csr_rows_kernel(
        x_ptr,
        row_ptr_ptr,
        values_ptr,
        indices_ptr,
        y_ptr,
        n_batch,
        n_rows,
        stride_x,
        block_n: tl.constexpr,
        block_k: tl.constexpr,
    ):
        # y[n, r] = sum over the entries e of row r of values[e] * x[n, indices[e]], for one row and a block of n.
        r = tl.program_id(0)
        ns = tl.program_id(1) * block_n + tl.arange(0, block_n)
        n_ok = ns < n_batch
        start = tl.load(row_ptr_ptr + r)
        end = tl.load(row_ptr_ptr + r + 1)
        acc = tl.zeros((block_n,), dtype=tl.float32)
        for e0 in range(start, end, block_k):
            es = e0 + tl.arange(0, block_k)
            e_ok = es < end
            w = tl.load(values_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
            j = tl.load(indices_ptr + es, mask=e_ok, other=0).to(tl.int64)
            gathered = tl.load(
                x_ptr + ns[:, None].to(tl.int64) * stride_x + j[None, :],
                mask=n_ok[:, None] & e_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(gathered.to(tl.float32) * w[None, :], axis=1)
        tl.store(y_ptr + ns.to(tl.int64) * n_rows + r, acc, mask=n_ok)

    @triton.jit
    def csr_sddmm_kernel(
        x_ptr,
        dy_ptr,
        row_ptr_ptr,
        indices_ptr,
        grad_ptr,
        n_batch,
        n_out,
        stride_x,
        block_b: tl.constexpr,
        block_e: tl.constexpr,
    ):
        # grad[e] = sum_b dy[b, r] * x[b, indices[e]] for the entries e of row r, a block of entries at a time.
        r = tl.program_id(0)
        start = tl.load(row_ptr_ptr + r)
        end = tl.load(row_ptr_ptr + r + 1)
        for e0 in range(start, end, block_e):
            es = e0 + tl.arange(0, block_e)
            e_ok = es < end
            j = tl.load(indices_ptr + es, mask=e_ok, other=0).to(tl.int64)
            acc = tl.zeros((block_e,), dtype=tl.float32)
            for b0 in range(0, n_batch, block_b):
                bs = b0 + tl.arange(0, block_b)
                b_ok = bs < n_batch
                d = tl.load(dy_ptr + bs.to(tl.int64) * n_out + r, mask=b_ok, other=0.0).to(tl.float32)
                xs = tl.load(
                    x_ptr + bs[:, None].to(tl.int64) * stride_x + j[None, :],
                    mask=b_ok[:, None] & e_ok[None, :],
                    other=0.0,
                )
                acc += tl.sum(xs.to(tl.float32) * d[:, None], axis=0)
            tl.store(grad_ptr + es, acc, mask=e_ok)

    return csr_rows_kernel, csr_sddmm_kernel


def _csr_kernel_pair() -> Any:
    global _csr_kernels
    if _csr_kernels is None:
        _csr_kernels = _build_csr_kernels()
    return _csr_kernels


def csr_rows_triton(
    x2: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """``[N, in] -> [N, R]`` float32 CSR rows (any fan-in, empty rows too) with the Triton kernel (CUDA tensors, or
    CPU under ``TRITON_INTERPRET=1``).

    Args:
        x2: ``[N, in]`` contiguous activations.
        row_ptr: ``[R + 1]`` int64 offsets.
        values: ``[nnz]`` weights.
        indices: ``[nnz]`` int16/int32 columns.
    """
    rows_kernel, _ = _csr_kernel_pair()
    n_batch, n_rows = x2.shape[0], row_ptr.numel() - 1
    y = torch.zeros((n_batch, n_rows), dtype=torch.float32, device=x2.device)
    if n_batch == 0 or n_rows == 0 or values.numel() == 0:
        return y
    block_n, block_k = 16, 32
    grid = (n_rows, (n_batch + block_n - 1) // block_n)
    rows_kernel[grid](
        x2, row_ptr, values, indices, y, n_batch, n_rows, x2.stride(0), block_n=block_n, block_k=block_k
    )
    return y


def csr_sddmm_triton(
    x: torch.Tensor, dy: torch.Tensor, row_ptr: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """``[nnz]`` weight gradient of a CSR layer on its active entries, in ``x``'s dtype (Triton; CUDA tensors, or CPU
    under ``TRITON_INTERPRET=1``): ``grad[e] = sum_b dy[b, r] * x[b, indices[e]]``, float32 accumulation."""
    if x.dtype != dy.dtype:
        raise TypeError(f"expected dy of dtype {x.dtype} (the inputs'), got {dy.dtype}")
    _, sddmm_kernel = _csr_kernel_pair()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    grad = torch.zeros(indices.numel(), dtype=torch.float32, device=x.device)
    n_out = dy2.shape[1]
    if x2.shape[0] > 0 and indices.numel() > 0 and n_out > 0:
        sddmm_kernel[(n_out,)](
            x2, dy2, row_ptr, indices, grad, x2.shape[0], n_out, x2.stride(0), block_b=32, block_e=32
        )
    return grad.to(x.dtype)


def csr_sddmm_cuda(
    x: torch.Tensor, dy: torch.Tensor, row_ptr: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """CUDA implementation of ``sparseapps::csr_sddmm`` (Triton when installed, else the reference twin)."""
    if not triton_available():
        return reference.csr_sddmm_reference(x, dy, row_ptr, indices)
    return csr_sddmm_triton(x, dy, row_ptr.contiguous(), indices.contiguous())


def csr_linear_cuda(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """CUDA implementation of ``sparseapps::csr_linear`` (Triton when installed, else the reference twin)."""
    if not triton_available():
        return reference.csr_linear_reference(x, row_ptr, values, indices, bias, rows, out_features)
    if x.dtype != values.dtype:
        raise TypeError(f"expected x of dtype {values.dtype} (the weights'), got {x.dtype}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y_rows = csr_rows_triton(x2, row_ptr.contiguous(), values.contiguous(), indices.contiguous())
    return reference.assemble_rows(y_rows, bias, rows, out_features, lead, x.dtype)
