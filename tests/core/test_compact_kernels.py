"""The SDDMM kernel (weight gradient on the active entries): compiled variants equal the reference twin."""

from __future__ import annotations

import pytest
import torch

from sparseapps.core.kernels import configure_kernels, formats, kernel_status, reference
from tests.core.test_kernels import assert_close

COMPILED = kernel_status()["compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled kernels not built")


@needs_compiled
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 37, 300])
def test_compiled_sddmm_equals_reference(isa: str, index_dtype: torch.dtype, batch: int) -> None:
    if f"{isa}=1" not in str(torch.ops.sparseapps.kernel_info()) and isa != "generic":
        pytest.skip(f"this CPU lacks {isa}")
    g = torch.Generator().manual_seed(batch)
    # 70 inputs: a column tile of 64 and a tail; rows 2 and 5 empty; a few rows denser than 16 (SIMD tails).
    mask = torch.rand(23, 70, generator=g) < 0.3
    mask[[2, 5]] = False
    mask[7] = True
    row_ptr, indices = formats.csr_structure(mask, index_dtype)
    x = torch.randn(batch, 70, generator=g)
    dy = torch.randn(batch, 23, generator=g)
    try:
        configure_kernels(isa)
        got = torch.ops.sparseapps.csr_sddmm(x, dy, row_ptr, indices)
    finally:
        configure_kernels("")
    want = reference.csr_sddmm_reference(x, dy, row_ptr, indices)
    assert got.dtype == torch.float32 and got.shape == (int(mask.sum()),)
    assert_close(got, want)
    assert_close(got, (dy.T @ x)[mask])


def test_sddmm_reference_is_the_dense_product_at_the_active_entries() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    row_ptr, indices = formats.csr_structure(mask, torch.int16)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    dy = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    # grad[0] = dy[:, 0] . x[:, 0] = 1 + 8; grad[1] = dy[:, 0] . x[:, 2] = 3 + 12; grad[2] = dy[:, 2] . x[:, 1]
    expected = torch.tensor([9.0, 15.0, -2.0 + 2.5])
    assert torch.equal(reference.csr_sddmm_reference(x, dy, row_ptr, indices), expected)
    assert torch.equal(torch.ops.sparseapps.csr_sddmm(x, dy, row_ptr, indices), expected)


@needs_compiled
def test_sddmm_refuses_bad_input_by_name() -> None:
    row_ptr, indices = formats.csr_structure(torch.ones(3, 4, dtype=torch.bool), torch.int16)
    with pytest.raises(RuntimeError, match="float32 x and dy"):
        torch.ops.sparseapps.csr_sddmm(
            torch.randn(2, 4).double(), torch.randn(2, 3).double(), row_ptr, indices
        )
    with pytest.raises(RuntimeError, match="same number of rows"):
        torch.ops.sparseapps.csr_sddmm(torch.randn(2, 4), torch.randn(5, 3), row_ptr, indices)
    with pytest.raises(RuntimeError, match="row_ptr of length out"):
        torch.ops.sparseapps.csr_sddmm(torch.randn(2, 4), torch.randn(2, 7), row_ptr, indices)


@needs_compiled
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_compiled_sddmm_sums_over_several_column_tiles(isa: str) -> None:
    """A wide input (5000) leaves room for 64 batch columns per tile: 150 rows take tiles of 64, 64 and 32."""
    if f"{isa}=1" not in str(torch.ops.sparseapps.kernel_info()) and isa != "generic":
        pytest.skip(f"this CPU lacks {isa}")
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(8, 5000, generator=g) < 0.05
    row_ptr, indices = formats.csr_structure(mask, torch.int16)
    x, dy = torch.randn(150, 5000, generator=g), torch.randn(150, 8, generator=g)
    try:
        configure_kernels(isa)
        got = torch.ops.sparseapps.csr_sddmm(x, dy, row_ptr, indices)
    finally:
        configure_kernels("")
    assert_close(got, (dy.T @ x)[mask])
