"""k-winners-take-all with boosting (sparseapps.core.kwta), the sparse-input kernel, and scripts/bench_kwta.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig
from sparseapps.core.kernels import CondenseConfig, formats, library
from sparseapps.core.kernels.reference import kwta_csc_linear_reference, kwta_mask_reference
from sparseapps.core.kwta import (
    KWinners,
    SparseInputLinear,
    condense_kwta,
    make_mnist1d_kwta_mlp,
    update_boost_strength,
)
from sparseapps.core.masks import get_mask
from tests.scripts import script_module

COST_MODEL = CondenseConfig(planner="cost_model")


def compiled() -> bool:
    return library.ensure_loaded().compiled


# ---------------------------------------------------------------------------------------------- KWinners
def test_forward_without_boost_keeps_the_k_largest_by_hand() -> None:
    layer = KWinners(4, percent_on=0.5, boost_strength=0.0)
    assert (layer.k, layer.k_inference) == (2, 3)
    out = layer(torch.tensor([[0.1, 3.0, -2.0, 1.0], [-1.0, -2.0, -3.0, -0.5]]))
    # the winners keep their value, negative ones included (k-WTA replaces the ReLU)
    assert out.tolist() == [[0.0, 3.0, 0.0, 1.0], [-1.0, 0.0, 0.0, -0.5]]


def test_ties_go_to_the_lower_unit() -> None:
    layer = KWinners(4, percent_on=0.5, boost_strength=0.0)
    assert layer(torch.tensor([[1.0, 2.0, 2.0, 2.0]])).tolist() == [[0.0, 2.0, 2.0, 0.0]]
    assert kwta_mask_reference(torch.tensor([[5.0, 5.0, 5.0]]), 2).tolist() == [[True, True, False]]
    ties = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    assert kwta_mask_reference(ties, 3).int().tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert kwta_mask_reference(ties, 9).all()  # k >= n: every unit


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), min_size=1, max_size=9),
        min_size=1,
        max_size=4,
    ),
    k=st.integers(1, 10),
)
def test_mask_is_exactly_k_and_matches_a_stable_sort(rows: list[list[float]], k: int) -> None:
    """Many ties (six values): exactly min(k, n) winners per row, the same set as a stable descending sort."""
    width = min(len(r) for r in rows)
    keys = torch.tensor([r[:width] for r in rows])
    mask = kwta_mask_reference(keys, k)
    assert mask.sum(1).tolist() == [min(k, width)] * len(rows)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    expected = torch.zeros_like(mask).scatter(1, order, True)
    assert torch.equal(mask, expected)


def test_forward_with_boost_by_hand() -> None:
    """beta = 2, target 0.5, duty cycles [1, 0, 0.5, 0.5]: boosts e^-1, e^1, 1, 1. x = [3, 1, 2, 0.5] gives keys
    [1.10, 2.72, 2, 0.5], so units 1 and 2 win (unboosted, units 0 and 2 would); they keep their own values."""
    layer = KWinners(4, percent_on=0.5, boost_strength=2.0)
    layer.duty_cycle.copy_(torch.tensor([1.0, 0.0, 0.5, 0.5]))
    expected = [math.exp(-1.0), math.exp(1.0), 1.0, 1.0]
    assert layer.boost_factors().tolist() == pytest.approx(expected, rel=1e-6)
    x = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    assert layer(x).tolist() == [[0.0, 1.0, 2.0, 0.0]]  # training mode, k = 2
    plain = KWinners(4, percent_on=0.5, boost_strength=0.0)
    assert plain(x).tolist() == [[3.0, 0.0, 2.0, 0.0]]
    boosted_eval = KWinners(4, percent_on=0.5, boost_strength=2.0, k_inference_factor=1.0).eval()
    boosted_eval.duty_cycle.copy_(torch.tensor([1.0, 0.0, 0.5, 0.5]))
    assert boosted_eval(x).tolist() == [[0.0, 1.0, 2.0, 0.0]]  # eval mode boosts too
    assert boosted_eval.duty_cycle.tolist() == [1.0, 0.0, 0.5, 0.5]  # and does not update


def test_duty_cycle_update_formula_by_hand() -> None:
    """Period 4, k = 1 of 3: d = (1 - a) d + a * wins / B with a = B / min(4, examples seen)."""
    layer = KWinners(3, percent_on=1 / 3, boost_strength=0.0, duty_cycle_period=4)
    layer(torch.tensor([[1.0, 0.0, 0.0]]))  # seen 1, a = 1
    assert layer.duty_cycle.tolist() == pytest.approx([1.0, 0.0, 0.0])
    layer(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))  # seen 3, a = 2/3
    assert layer.duty_cycle.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    layer(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))  # seen 5, period 4, a = 1/2
    assert layer.duty_cycle.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    assert int(layer.examples_seen) == 5
    layer.eval()
    layer(torch.tensor([[9.0, 0.0, 0.0]]))  # eval mode: no update
    assert layer.duty_cycle.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    assert int(layer.examples_seen) == 5


def test_a_batch_larger_than_the_period_replaces_the_duty_cycle() -> None:
    layer = KWinners(2, percent_on=0.5, boost_strength=0.0, duty_cycle_period=2)
    layer(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))  # a = min(1, 4 / 2)
    assert layer.duty_cycle.tolist() == pytest.approx([0.75, 0.25])


def test_boost_strength_decays_once_per_call() -> None:
    model = make_mnist1d_kwta_mlp(percent_on=0.1, boost_strength=1.5, boost_strength_factor=0.9)
    assert update_boost_strength(model) == 2
    assert update_boost_strength(model) == 2
    assert float(model[1].boost_strength) == pytest.approx(1.5 * 0.81)
    assert float(model[3].boost_strength) == pytest.approx(1.5 * 0.81)


def test_gradients_reach_the_winners_only() -> None:
    layer = KWinners(5, percent_on=0.4, boost_strength=0.0)
    x = torch.tensor([[0.5, -1.0, 4.0, 2.0, 0.0], [3.0, 1.0, -2.0, 0.0, 2.5]], requires_grad=True)
    (layer(x) * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [[0.0, 0.0, 3.0, 4.0, 0.0], [1.0, 0.0, 0.0, 0.0, 5.0]]


def test_eval_uses_k_inference() -> None:
    layer = KWinners(20, percent_on=0.2, k_inference_factor=1.5)
    assert (layer.k, layer.k_inference) == (4, 6)
    x = torch.randn(7, 20, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    assert (layer(x) != 0).sum(1).tolist() == [4] * 7
    layer.eval()
    assert (layer(x) != 0).sum(1).tolist() == [6] * 7
    assert KWinners(10, 0.5, k_inference_factor=3.0).k_inference == 10  # capped at n


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 10, "percent_on": 0.0}, r"percent_on in \(0, 1\], got 0.0"),
        ({"n": 10, "percent_on": 1.5}, r"percent_on in \(0, 1\], got 1.5"),
        ({"n": 10, "percent_on": float("nan")}, "percent_on in"),
        ({"n": 10, "percent_on": 0.01}, r"leaves no winner \(k = 0\)"),
        ({"n": 0, "percent_on": 0.5}, "n as an int >= 1, got 0"),
        ({"n": 10, "percent_on": 0.5, "boost_strength": -1.0}, "boost_strength >= 0, got -1.0"),
        ({"n": 10, "percent_on": 0.5, "boost_strength_factor": 0.0}, r"boost_strength_factor in \(0, 1\]"),
        ({"n": 10, "percent_on": 0.5, "duty_cycle_period": 0}, "duty_cycle_period as an int >= 1, got 0"),
        ({"n": 10, "percent_on": 0.5, "k_inference_factor": 0.0}, "k_inference_factor > 0, got 0.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KWinners(**kwargs)


def test_bad_inputs_are_clear_errors() -> None:
    layer = KWinners(4, percent_on=0.5)
    with pytest.raises(ValueError, match=r"shape \[B, 4\] or \[B, 4, \*spatial\], got \(2, 5\)"):
        layer(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"shape \[B, 4\] or \[B, 4, \*spatial\], got \(4,\)"):
        layer(torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.zeros(2, 4, dtype=torch.int64))
    x = torch.zeros(3, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN at example 2, unit 1"):
        layer(x)
    assert int(layer.examples_seen) == 0  # nothing was updated


def test_conv_activations_compete_over_channels_at_each_position() -> None:
    """[B, C, L]: at every position the k largest channels win; a channel's duty cycle is its share of the
    (example, position) pairs it won."""
    layer = KWinners(3, percent_on=1 / 3, boost_strength=0.0, duty_cycle_period=10)
    x = torch.tensor([[[5.0, 0.0, 1.0, 2.0], [1.0, 3.0, 0.0, 2.0], [0.0, 1.0, 4.0, 2.0]]])  # [1, 3, 4]
    out = layer(x)
    assert out.tolist() == [[[5.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]]]
    assert layer.duty_cycle.tolist() == pytest.approx([0.5, 0.25, 0.25])  # position 3: a tie, channel 0
    assert int(layer.examples_seen) == 1
    images = torch.randn(2, 3, 5, 4)  # [B, C, H, W]
    assert torch.equal((layer(images) != 0).sum(1), torch.ones(2, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"NaN at example 1, unit 2"):
        images[1, 2, 3, 0] = float("nan")
        layer(images)


# ---------------------------------------------------------------------------------------------- state
def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, 40, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step % 3 == 2:
            update_boost_strength(model)


def test_state_dict_round_trip_resumes_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = make_mnist1d_kwta_mlp(percent_on=0.2, duty_cycle_period=50)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, optimizer, 5, seed=1)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # its tensors are the live state
    assert {"1.duty_cycle", "1.boost_strength", "1.examples_seen"} <= set(saved_model)
    assert int(saved_model["1.examples_seen"]) == 80 and float(saved_model["1.duty_cycle"].sum()) > 0

    resumed = make_mnist1d_kwta_mlp(percent_on=0.2, duty_cycle_period=50)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train_steps(model, optimizer, 7, seed=2)
    train_steps(resumed, resumed_optimizer, 7, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(model.state_dict()["1.duty_cycle"], saved_model["1.duty_cycle"])


# ---------------------------------------------------------------------------------------------- kernel
def csc(weight: torch.Tensor, mask: torch.Tensor, index_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    col_ptr, rows = formats.csr_structure(mask.t().contiguous(), index_dtype)
    return col_ptr, rows, weight.t()[mask.t()].contiguous()


def masked_dense(
    x: torch.Tensor,
    boost: torch.Tensor | None,
    k: int,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """k-WTA by the module's rule, then the masked dense product: what the kernel must equal."""
    keys = x if boost is None else x * boost
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]  # ties: lower input first
    kept = torch.zeros_like(x).scatter(1, order, x.gather(1, order))
    return F.linear(kept, weight * mask, bias)


def test_reference_by_hand() -> None:
    x = torch.tensor([[3.0, -1.0, 2.0], [0.0, 4.0, 1.0]])
    weight = torch.tensor([[1.0, 5.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    col_ptr, rows, values = csc(weight, weight != 0, torch.int16)
    bias = torch.tensor([0.5, 0.0, -1.0])
    y = kwta_csc_linear_reference(x, None, 2, col_ptr, rows, values, bias, 3)
    # example 0 keeps inputs 0, 2: [3 + 0.5, 4, 2 - 1]; example 1 keeps 1, 2: [20 + 0.5, 2, 1 - 1]
    assert y.tolist() == [[3.5, 4.0, 1.0], [20.5, 2.0, 0.0]]
    x = torch.tensor([[3.0, 1.0, 2.0]])  # unboosted, inputs 0 and 2 win: [3, 4, 2]
    assert kwta_csc_linear_reference(x, None, 2, col_ptr, rows, values, None, 3).tolist() == [[3.0, 4.0, 2.0]]
    boost = torch.tensor([0.1, 1.0, 1.0])  # keys [0.3, 1, 2]: inputs 1 and 2 win, with their own values
    assert kwta_csc_linear_reference(x, boost, 2, col_ptr, rows, values, None, 3).tolist() == [
        [5.0, 4.0, 2.0]
    ]


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("with_boost", [False, True])
@pytest.mark.parametrize(("batch", "k"), [(1, 5), (1, 40), (3, 1), (37, 12), (64, 60)])
def test_kernel_equals_reference_and_masked_dense_product(
    index_dtype: torch.dtype, with_boost: bool, batch: int, k: int
) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + k)
    weight = torch.randn(30, 40, generator=generator)
    mask = torch.rand(30, 40, generator=generator) < 0.1
    mask[:, 7] = False  # an empty column
    bias = torch.randn(30, generator=generator)
    boost = torch.rand(40, generator=generator) + 0.5 if with_boost else None
    x = torch.randn(batch, 40, generator=generator)
    x[:, 3] = 0.0  # a zero input that may win: skipped, no effect
    col_ptr, rows, values = csc(weight, mask, index_dtype)
    args = (boost, k, col_ptr, rows, values, bias, 30)
    want = masked_dense(x, boost, min(k, 40), weight, mask, bias)
    reference = kwta_csc_linear_reference(x, *args)
    torch.testing.assert_close(reference, want, rtol=1e-5, atol=1e-5)
    if not compiled():
        pytest.skip(f"compiled kernels not loaded: {library.kernel_status()['reason']}")
    torch.testing.assert_close(torch.ops.sparseapps.kwta_csc_linear(x, *args), want, rtol=1e-5, atol=1e-5)


def test_kernel_batch_examples_have_their_own_winners() -> None:
    """Batch > 1: each row's winners are its own, so the batched call equals one call per example."""
    weight = torch.arange(12.0).reshape(3, 4)
    layer = SparseInputLinear(weight, torch.ones(3, 4, dtype=torch.bool), None, k=1)
    x = torch.tensor([[5.0, 0.0, 0.0, 1.0], [0.0, 0.0, 7.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
    # column 0 of W is [0, 4, 8], column 2 is [2, 6, 10], column 1 is [1, 5, 9]
    assert layer(x).tolist() == [[0.0, 20.0, 40.0], [14.0, 42.0, 70.0], [2.0, 10.0, 18.0]]
    assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))
    with pytest.raises(ValueError, match=r"shape \[B, 4\], got \(3, 1, 4\)"):
        layer(x.reshape(3, 1, 4))


def test_kernel_errors_name_the_value() -> None:
    weight = torch.randn(4, 6)
    mask = torch.rand(4, 6) < 0.5
    col_ptr, rows, values = csc(weight, mask, torch.int32)
    x = torch.randn(2, 6)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN at example 1, input 4"):
        kwta_csc_linear_reference(x, None, 2, col_ptr, rows, values, None, 4)
    with pytest.raises(ValueError, match="k >= 1, got 0"):
        kwta_csc_linear_reference(torch.randn(2, 6), None, 0, col_ptr, rows, values, None, 4)
    layer = SparseInputLinear(weight * mask, mask, None, k=2)
    with pytest.raises(ValueError, match="NaN at example 1, input 4"):
        layer(x)
    with pytest.raises(ValueError, match=r"shape \[B, 6\], got \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="k as an int >= 1, got 0"):
        SparseInputLinear(weight, mask, None, k=0)
    with pytest.raises(ValueError, match=r"bool mask of shape \(4, 6\)"):
        SparseInputLinear(weight, mask.float(), None, k=2)
    with pytest.raises(ValueError, match=r"boost as float32 \[6\]"):
        SparseInputLinear(weight, mask, None, k=2, boost=torch.ones(5))
    if compiled():
        with pytest.raises(ValueError, match="k >= 1, got 0"):
            torch.ops.sparseapps.kwta_csc_linear(torch.randn(2, 6), None, 0, col_ptr, rows, values, None, 4)
        with pytest.raises(RuntimeError, match=r"row_indices in \[0, 3\)"):
            torch.ops.sparseapps.kwta_csc_linear(torch.randn(2, 6), None, 2, col_ptr, rows, values, None, 3)
        with pytest.raises(RuntimeError, match="col_ptr as 1-D int64 CPU of length in \\+ 1 = 8"):
            torch.ops.sparseapps.kwta_csc_linear(torch.randn(2, 7), None, 2, col_ptr, rows, values, None, 4)


# ---------------------------------------------------------------------------------------------- model
def trained_sparse_kwta(preset: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = make_mnist1d_kwta_mlp(percent_on=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    config = SparsityConfig.preset(preset, sparsity=0.9, seed=0, update_interval=2)
    engine = DynamicSparsity(model, optimizer, config, total_steps=12)
    train_steps(model, optimizer, 12, seed=3)
    assert 1.0 - engine.report().density == pytest.approx(0.9, abs=0.01)
    return model.eval()


@pytest.mark.parametrize("preset", ["static", "rigl"])
def test_kwta_model_trains_under_the_engine_and_condenses_to_equal_outputs(preset: str) -> None:
    model = trained_sparse_kwta(preset)
    for index in (0, 2, 4):
        mask = get_mask(model[index], "weight")
        assert mask is not None and torch.equal(model[index].weight * mask, model[index].weight)
    assert float(model[1].duty_cycle.sum()) > 0 and float(model[1].boost_strength) < 1.0
    fast = condense_kwta(model, COST_MODEL)
    assert [type(m).__name__ for m in fast][1:] == ["SparseInputLinear", "SparseInputLinear"]
    assert fast[1].k == model[1].k_inference == 15 and fast[1].boost is not None
    assert fast[1].nnz == int(get_mask(model[2], "weight").sum())
    generator = torch.Generator().manual_seed(5)
    for batch in (1, 2, 64):
        x = torch.randn(batch, 40, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert model.training is False and float(model[1].duty_cycle.sum()) > 0  # untouched by the copy


def test_condense_kwta_on_dense_weights_and_other_layers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 12), KWinners(12, 0.25), nn.Linear(12, 6), KWinners(6, 0.5)).eval()
    fast = condense_kwta(model)
    assert [type(m).__name__ for m in fast] == ["Linear", "SparseInputLinear", "KWinners"]
    assert fast[1].nnz == 72  # a dense layer stores every entry
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"expected an nn\.Sequential, got Linear"):
        condense_kwta(nn.Linear(3, 3))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- script
def test_bench_script_quick_runs_and_writes_both_parts(tmp_path: Path) -> None:
    with script_module("bench_kwta") as bench:
        out = tmp_path / "out"
        argv = ["--quick", "--percents-on", "0.2", "--timing-rounds", "2", "--timing-calls", "2"]
        bench.main([*argv, "--out", str(out), "--data-root", str(tmp_path / "data")])
        result = json.loads((out / "results.json").read_text())
        assert {p["variant"] for p in result["points"]} == {
            "dense",
            "weights",
            "kwta@0.2",
            "kwta@0.2+weights",
        }
        assert len(result["runs"]) == 4 * bench.QUICK["seeds"]
        sparse = [r for r in result["runs"] if r["variant"].endswith("weights")]
        assert all(r["sparsity"] == pytest.approx(0.9, abs=0.01) for r in sparse)
        assert set(result["timing"]) == {
            "dense",
            "weights",
            "kwta@0.2+weights (sparse-input path)",
            "kwta@0.2+weights (condense only)",
            "kwta@0.2 (sparse-input path)",
        }
        assert all(row["seconds"] > 0 for row in result["timing"].values())
        assert result["timing"]["weights"]["vs_weights"] == 1.0
        table = (out / "results.md").read_text()
        assert "| kwta@0.2+weights |" in table and "Batch-1 inference" in table
        with pytest.raises(ValueError, match="percents_on in"):
            bench.parse_args(["--percents-on", "0"])
        with pytest.raises(ValueError, match="method in"):
            bench.parse_args(["--method", "snip"])
