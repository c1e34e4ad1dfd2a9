"""CompactLinear and its kernels: forward, input gradient and weight gradient (SDDMM) equal the masked dense layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseapps.core.compact import CompactLinear, Repack, compact_linear
from sparseapps.core.kernels import kernel_status
from tests.core.test_kernels import assert_close
from tests.core.test_kernels_integration import run_python

COMPILED = kernel_status()["compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled kernels not built")


def random_layer(
    out: int, width: int, density: float, generator: torch.Generator, *, bias: bool = True
) -> tuple[CompactLinear, torch.Tensor]:
    """A compact layer and the dense weight it stands for (zeros outside its mask)."""
    mask = torch.rand(out, width, generator=generator) < density
    weight = torch.randn(out, width, generator=generator) * mask
    layer = CompactLinear(weight, mask, torch.randn(out, generator=generator) if bias else None)
    return layer, weight


def dense_gradients(
    layer: CompactLinear, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Output and gradients (input, active weights, bias) of the masked dense layer."""
    w = weight.clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    xd = x.clone().requires_grad_(True)
    y = F.linear(xd, w, b)
    y.backward(dy)
    grad_b = b.grad if b is not None else None
    return y.detach(), xd.grad, w.grad[layer.mask()], grad_b


def compact_gradients(layer: CompactLinear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_(True)
    y = layer(xc)
    y.backward(dy)
    grad_b = layer.bias.grad if layer.bias is not None else None
    return y.detach(), xc.grad, layer.values.grad, grad_b


def test_gradcheck_in_float64_through_the_reference_path() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 9, generator=g) < 0.4
    mask[2] = False  # an empty row
    weight = torch.randn(6, 9, generator=g, dtype=torch.float64)
    layer = CompactLinear(weight, mask, torch.randn(6, generator=g, dtype=torch.float64))
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, values, bias: compact_linear(x, values, bias, layer), (x, layer.values, layer.bias)
    )


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    width=st.integers(1, 70),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    lead=st.sampled_from([(1,), (3,), (17,), (2, 5), (40,)]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_every_gradient_equal_the_masked_dense_layer(
    out: int, width: int, density: float, lead: tuple[int, ...], bias: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    layer, weight = random_layer(out, width, density, g, bias=bias)
    x = torch.randn(*lead, width, generator=g)
    dy = torch.randn(*lead, out, generator=g)
    for got, want in zip(compact_gradients(layer, x, dy), dense_gradients(layer, weight, x, dy), strict=True):
        if want is None:
            assert got is None
        else:
            assert_close(got, want)


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_bfloat16_layer_trains_within_bfloat16_rounding_of_float32(batch: int) -> None:
    """bf16 weights and activations: forward and every gradient in bf16, within bf16 rounding of the float32
    masked-dense layer fed the same (bf16-representable) numbers; the weight gradient keeps bf16 storage."""
    g = torch.Generator().manual_seed(batch)
    layer, weight = random_layer(24, 50, 0.2, g)
    layer = layer.to(torch.bfloat16)
    weight = layer.to_dense_weight().float()
    x = torch.randn(batch, 50, generator=g).bfloat16()
    dy = torch.randn(batch, 24, generator=g).bfloat16()
    got = compact_gradients(layer, x, dy)
    assert all(t.dtype == torch.bfloat16 for t in got)
    reference_layer = CompactLinear(weight, layer.mask(), layer.bias.detach().float())
    want = dense_gradients(reference_layer, weight, x.float(), dy.float())
    for a, b in zip(got, want, strict=True):
        assert_close(a.float(), b, rtol=2e-2)


def test_empty_rows_and_an_empty_layer() -> None:
    g = torch.Generator().manual_seed(1)
    for mask in (torch.zeros(5, 8, dtype=torch.bool), torch.eye(5, 8, dtype=torch.bool)):
        weight = torch.randn(5, 8, generator=g) * mask
        layer = CompactLinear(weight, mask, torch.randn(5, generator=g))
        x, dy = torch.randn(4, 8, generator=g), torch.randn(4, 5, generator=g)
        for got, want in zip(
            compact_gradients(layer, x, dy), dense_gradients(layer, weight, x, dy), strict=True
        ):
            assert_close(got, want)


def test_storage_is_the_active_entries_with_narrow_indices() -> None:
    g = torch.Generator().manual_seed(2)
    layer, weight = random_layer(16, 300, 0.1, g)
    assert layer.values.shape == (layer.nnz,) and layer.nnz == int((weight != 0).sum())
    assert layer.col_indices.dtype == torch.int16 and layer.t_indices.dtype == torch.int16
    assert layer.row_ptr.shape == (17,) and layer.t_row_ptr.shape == (301,)
    assert torch.equal(layer.to_dense_weight(), weight)
    assert torch.equal(layer.mask(), weight != 0)
    assert sorted(layer.state_dict()) == ["bias", "col_indices", "row_ptr", "values"]
    wide = CompactLinear(torch.zeros(2, 40000), torch.rand(2, 40000, generator=g) < 0.001)
    assert wide.col_indices.dtype == torch.int32 and wide.t_indices.dtype == torch.int16


def test_set_mask_keeps_kept_values_and_gradients_and_zeroes_new_ones() -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    layer = CompactLinear(weight, weight != 0)
    layer.values.grad = torch.tensor([10.0, 20.0, 30.0])
    new = torch.tensor([[True, True, False], [False, True, False]])  # drop (0, 2), grow (0, 1)
    repack = layer.set_mask(new)
    assert isinstance(repack, Repack) and repack.nnz == 3
    assert torch.equal(layer.values.detach(), torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(layer.values.grad, torch.tensor([10.0, 0.0, 30.0]))
    assert torch.equal(layer.mask(), new)
    x = torch.randn(4, 3, requires_grad=True)
    layer(x).sum().backward()
    assert_close(x.grad, torch.ones(4, 2) @ layer.to_dense_weight())


def test_state_dict_loads_into_a_layer_of_another_topology() -> None:
    g = torch.Generator().manual_seed(3)
    trained, _ = random_layer(12, 20, 0.3, g)
    fresh, _ = random_layer(12, 20, 0.1, g)
    assert fresh.nnz != trained.nnz
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.mask(), trained.mask())
    x, dy = torch.randn(5, 20, generator=g), torch.randn(5, 12, generator=g)
    for a, b in zip(compact_gradients(fresh, x, dy), compact_gradients(trained, x, dy), strict=True):
        assert torch.equal(a, b)
    broken = trained.state_dict()
    broken["row_ptr"] = broken["row_ptr"].flip(0)
    with pytest.raises(ValueError, match="CSR structure"):
        fresh.load_state_dict(broken)


def test_capture_adds_the_dense_gradient_of_each_backward() -> None:
    g = torch.Generator().manual_seed(4)
    layer, weight = random_layer(7, 11, 0.3, g)
    layer.capture_dense_grad = True
    x, dy = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 7, generator=g)
    compact_gradients(layer, x, dy)
    compact_gradients(layer, x, dy)
    w = weight.clone().requires_grad_(True)
    F.linear(x, w).backward(dy)
    assert_close(layer.dense_grad, 2 * w.grad)


def test_bad_construction_is_named() -> None:
    with pytest.raises(ValueError, match="bool mask of shape"):
        CompactLinear(torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D floating-point weight"):
        CompactLinear(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        CompactLinear.from_linear(nn.Conv2d(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))  # type: ignore[arg-type]
    layer = CompactLinear(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input \[\*, 4\]"):
        layer(torch.randn(2, 5))


def test_reference_mode_trains_the_layer_with_the_twins() -> None:
    result = run_python(
        """
        import torch
        from sparseapps.core.compact import CompactLinear
        from sparseapps.core.kernels import kernel_status
        assert kernel_status()["state"] == "disabled", kernel_status()
        weight = torch.randn(6, 9); mask = torch.rand(6, 9) < 0.4
        layer = CompactLinear(weight, mask, torch.randn(6))
        x = torch.randn(5, 9, requires_grad=True)
        layer(x).square().sum().backward()
        w = (weight * mask).requires_grad_(True); xd = x.detach().clone().requires_grad_(True)
        torch.nn.functional.linear(xd, w, layer.bias.detach()).square().sum().backward()
        assert torch.allclose(layer.values.grad, w.grad[mask], atol=1e-5)
        assert torch.allclose(x.grad, xd.grad, atol=1e-5)
        print("ok")
        """,
        SPARSEAPPS_KERNELS="reference",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_compiled
@pytest.mark.parametrize(
    ("out", "width", "density"),
    [(5, 8, 0.3), (300, 70, 0.1), (10, 40000, 0.001), (40000, 3, 0.3), (3, 3, 0.0)],
)
def test_compiled_transpose_equals_its_twin(out: int, width: int, density: float) -> None:
    from sparseapps.core.kernels import formats, reference

    g = torch.Generator().manual_seed(out)
    mask = torch.rand(out, width, generator=g) < density
    layer = CompactLinear(torch.randn(out, width, generator=g) * mask, mask)
    t_dtype = formats.index_dtype_for(out)
    compiled = torch.ops.sparseapps.csr_transpose(layer.row_ptr, layer.col_indices, width, t_dtype)
    twin = reference.csr_transpose_reference(layer.row_ptr, layer.col_indices, width, t_dtype)
    for a, b in zip(compiled, twin, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
