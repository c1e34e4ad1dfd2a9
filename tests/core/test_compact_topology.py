"""Topology updates of compact layers on their active entries (compact/topology.py and its compiled ops): the same
masks, weights and optimizer state as the dense-view update, the ops equal to their twins, errors named."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseapps.core import DynamicSparsity, SparsityConfig, scores, to_compact
from sparseapps.core.compact import topology
from sparseapps.core.kernels import library, reference
from tests.core.test_compact_engine import digits, digits_mlp, start, train

pytestmark = pytest.mark.skipif(not library.ensure_loaded().compiled, reason="compiled kernels unavailable")
ops = torch.ops.sparseapps


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    batch=st.integers(1, 6),
    excluded_share=st.floats(0.0, 0.95),
    pick=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**62),
    tie_noise=st.sampled_from([0.0, 1e-5, 0.3]),
    random=st.booleans(),
    zero_columns=st.booleans(),
)
def test_grow_select_equals_its_twin_from_the_dense_gradient_and_from_its_factors(
    rows: int,
    cols: int,
    batch: int,
    excluded_share: float,
    pick: float,
    seed: int,
    tie_noise: float,
    random: bool,
    zero_columns: bool,
) -> None:
    """Small integers: the product is exact in float32, so the factored and the dense forms score bit for bit alike;
    zero columns make many exact ties (broken by noise, or by position without it)."""
    generator = torch.Generator().manual_seed(seed % 2**31)
    dy = torch.randint(-3, 4, (batch, rows), generator=generator).float()
    x = torch.randint(-3, 4, (batch, cols), generator=generator).float()
    if zero_columns:
        x[:, ::2] = 0
    size = rows * cols
    excluded = torch.randperm(size, generator=generator)[: int(excluded_share * size)].sort().values
    n = int(pick * (size - excluded.numel()))
    dense = dy.mT.mm(x)
    want = reference.grow_select_reference(
        dense, None, None, rows, cols, excluded, n, seed, tie_noise, random
    )
    assert torch.equal(
        ops.grow_select(dense, None, None, rows, cols, excluded, n, seed, tie_noise, random), want
    )
    assert torch.equal(ops.grow_select(None, dy, x, rows, cols, excluded, n, seed, tie_noise, random), want)
    assert want.numel() == n and not bool(torch.isin(want, excluded).any())


def test_grow_select_on_a_large_layer_takes_the_threshold_path_and_stays_exact() -> None:
    """A 512 x 512 layer (past the size where a sampled threshold is used) with whole zero columns."""
    generator = torch.Generator().manual_seed(0)
    dy, x = torch.randn(8, 512, generator=generator), torch.randn(8, 512, generator=generator)
    x[:, 100:300] = 0
    dense = dy.mT.mm(x)
    excluded = torch.randperm(512 * 512, generator=generator)[:26_000].sort().values
    for n in (1, 700, 5_000, 100_000):
        want = reference.grow_select_reference(dense, None, None, 512, 512, excluded, n, 9, 1e-5, False)
        assert torch.equal(ops.grow_select(dense, None, None, 512, 512, excluded, n, 9, 1e-5, False), want), n


@pytest.mark.parametrize("tie_noise", [0.0, 1e-5])
@pytest.mark.parametrize("shape", [(30, 8), (2_000, 64)])
def test_grow_select_from_the_nonzero_rows_equals_the_whole_gradient(
    shape: tuple[int, int], tie_noise: float
) -> None:
    """An embedding table's captured gradient held as its looked-up rows (``dense_rows``) selects what the whole
    ``[R, D]`` gradient with zero rows elsewhere selects, bit for bit, on the small path and (2,000 x 64) the
    sampled-threshold path, including counts that reach into the zero rows (chosen by noise, or by position)."""
    rows, cols = shape
    generator = torch.Generator().manual_seed(3)
    held = torch.randperm(rows, generator=generator)[: rows // 6].sort().values
    grad = torch.randn(len(held), cols, generator=generator)
    grad[:, : cols // 4] = 0  # exact ties inside held rows too
    whole = torch.zeros(rows, cols).index_copy_(0, held, grad)
    excluded = torch.randperm(rows * cols, generator=generator)[: rows * cols // 5].sort().values
    available = rows * cols - excluded.numel()
    for n in (1, available // 50, available // 4, available):
        want = ops.grow_select(whole, None, None, rows, cols, excluded, n, 5, tie_noise, False)
        got = ops.grow_select(grad, None, None, rows, cols, excluded, n, 5, tie_noise, False, 262144, held)
        twin = reference.grow_select_reference(
            grad, None, None, rows, cols, excluded, n, 5, tie_noise, False, held
        )
        assert torch.equal(got, want) and torch.equal(twin, want), n
    none = ops.grow_select(
        torch.zeros(0, cols),
        None,
        None,
        rows,
        cols,
        excluded,
        7,
        5,
        tie_noise,
        False,
        262144,
        torch.zeros(0, dtype=torch.int64),
    )
    assert torch.equal(
        none,
        ops.grow_select(torch.zeros(rows, cols), None, None, rows, cols, excluded, 7, 5, tie_noise, False),
    )


def test_hashed_uniform_at_and_merge_positions_equal_their_twins() -> None:
    positions = torch.tensor([0, 5, 2**33 + 7, 2**40, 3])
    assert torch.equal(
        ops.hashed_uniform_at(11, positions), reference.hashed_uniform_at_reference(11, positions)
    )
    assert torch.equal(ops.hashed_uniform_at(11, torch.arange(50)), ops.hashed_uniform(11, 50))
    kept, grown = torch.tensor([1, 4, 9]), torch.tensor([0, 5, 10, 11])
    merged, slots = ops.merge_positions(kept, grown)
    want = reference.merge_positions_reference(kept, grown)
    assert torch.equal(merged, want[0]) and torch.equal(slots, want[1])
    assert merged.tolist() == [0, 1, 4, 5, 9, 10, 11] and slots.tolist() == [1, 2, 4]


def _select_from_rows(dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``grow_select`` of one entry of a 3 x 2 layer from the gradient's rows ``rows`` only."""
    return ops.grow_select(dense, None, None, 3, 2, torch.tensor([0]), 1, 0, 0.0, False, 64, rows)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ops.grow_select(
                torch.zeros(2, 2), None, None, 2, 2, torch.tensor([1, 0]), 1, 0, 0.0, False
            ),
            "not ascending",
        ),
        (
            lambda: ops.grow_select(torch.zeros(2, 2), None, None, 2, 2, torch.tensor([4]), 1, 0, 0.0, False),
            "outside",
        ),
        (
            lambda: ops.grow_select(torch.zeros(2, 2), None, None, 2, 2, torch.tensor([0]), 4, 0, 0.0, False),
            "cannot select 4 entries from 3",
        ),
        (lambda: ops.grow_select(None, None, None, 2, 2, torch.tensor([0]), 1, 0, 0.0, False), "factors"),
        (lambda: _select_from_rows(torch.zeros(2, 2), torch.tensor([2, 1])), "dense row 1 at 1 is outside"),
        (lambda: _select_from_rows(torch.zeros(2, 2), torch.tensor([1])), "1 x 2 entries"),
        (lambda: ops.merge_positions(torch.tensor([1, 2]), torch.tensor([2])), "both kept and grown"),
        (lambda: ops.hashed_uniform_at(-1, torch.tensor([0])), "seed >= 0"),
    ],
)
def test_topology_ops_refuse_bad_input_by_name(call: Any, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


def _runs(preset: str, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> tuple[Any, Any]:
    x, y = digits()
    runs = []
    for on_entries in (True, False):
        if not on_entries:
            monkeypatch.setattr(topology, "applies", lambda engine: False)
        run = start(digits_mlp(), "compact", "adamw", preset, 150, update_interval=25, **overrides)
        train(run, x, y, 150, seed=1)
        runs.append(run)
    monkeypatch.undo()
    return runs[0], runs[1]


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("rigl", {}),
        ("rigl", {"grow_init_range": 0.01, "tie_noise": 0.0}),
        ("set", {}),
        ("rigl", {"drop": "random", "grow": "random"}),
        ("srigl", {"ablation_threshold": 0.0}),
        ("srigl", {"ablation_threshold": 0.0, "tie_noise": 0.0}),
    ],
)
def test_updates_on_active_entries_equal_the_dense_view_update_bit_for_bit(
    preset: str, overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, dense = _runs(preset, monkeypatch, **overrides)
    assert topology.applies(fast.engine)
    assert fast.engine.history == dense.engine.history and len(fast.engine.history) >= 4
    for a, b in zip(fast.updates, dense.updates, strict=True):
        for fqn in a:
            assert torch.equal(a[fqn], b[fqn]), fqn
    for fqn, t in fast.engine.tensors.items():
        other = dense.engine.tensors[fqn]
        assert torch.equal(t.param, other.param), fqn
        for key, value in fast.optimizer.state[t.param].items():
            assert torch.equal(value, dense.optimizer.state[other.param][key]), (fqn, key)


def test_dropped_and_regrown_entries_keep_their_value_and_the_record_counts_them_as_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """drop = grow = random with a large drop fraction: some entries are dropped and drawn again at once."""
    fast, dense = _runs("rigl", monkeypatch, drop="random", grow="random", drop_fraction=0.9)
    entries = fast.engine.history[0]["tensors"]["4.weight"]
    assert entries["dropped"] == entries["grown"] < round(0.9 * entries["nnz"])  # some came back
    assert fast.engine.history == dense.engine.history


def test_updates_fall_back_to_dense_views_where_a_criterion_has_no_entry_form() -> None:
    config = SparsityConfig.preset("rigl", sparsity=0.9, seed=0, storage="compact")
    model = to_compact(digits_mlp(), config)
    engine = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config, 100)
    assert topology.applies(engine)

    @scores.register_drop("test_magnitude_copy", needs=())
    def _copy(ctx: scores.ScoreContext) -> torch.Tensor:
        return ctx.weight.abs()

    try:
        for changes in (
            {"drop": "test_magnitude_copy"},
            {"constant_fan_in": True, "ablation_threshold": 0.3},  # SRigL without ablation runs on entries
            {"constant_fan_in": True, "grow": "random"},
            {"redistribution": "dsr"},
        ):
            try:
                changed = config.replace(**changes)
                model = to_compact(digits_mlp(), changed)
                other = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), changed, 100)
            except ValueError:
                continue  # a combination the engine refuses for compact storage altogether
            assert not topology.applies(other), changes
    finally:
        scores.unregister("drop", "test_magnitude_copy")


def test_a_non_finite_captured_gradient_is_named_before_the_update() -> None:
    config = SparsityConfig.preset("rigl", sparsity=0.9, seed=0, storage="compact", update_interval=2)
    model = to_compact(digits_mlp(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = DynamicSparsity(model, optimizer, config, 100, check_finite=False)
    x, y = digits()
    for step in range(2):
        optimizer.zero_grad()
        inputs = x[:32].clone()
        if step == 1:
            inputs[0, 0] = float("nan")
        torch.nn.functional.cross_entropy(model(inputs), y[:32]).backward()
        if step == 1:
            with pytest.raises(ValueError, match=r"non-finite gradient in '0\.weight' at update step 2"):
                optimizer.step()
        else:
            optimizer.step()
    assert engine.step == 1


def test_sorted_index_equals_its_twin() -> None:
    haystack = torch.tensor([2, 5, 9, 14])
    needles = torch.tensor([0, 2, 9, 10, 20])
    assert ops.sorted_index(haystack, needles).tolist() == [-1, 0, 2, -1, -1]
    assert torch.equal(
        ops.sorted_index(haystack, needles), reference.sorted_index_reference(haystack, needles)
    )
    assert ops.sorted_index(torch.tensor([], dtype=torch.long), needles).tolist() == [-1] * 5
    with pytest.raises(RuntimeError, match="not ascending"):
        ops.sorted_index(haystack, torch.tensor([3, 1]))
