"""N:M structure (``sparseapps.core.nm``): the rule by hand, the config, the engine in both storages, the exports."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, condense, nm, rules, to_compact
from sparseapps.core.compact import topology as compact_topology
from sparseapps.core.config import ConfigMismatchError
from sparseapps.core.kernels import CondenseConfig, CondensedLinear
from sparseapps.core.kernels.formats import mask_stats
from sparseapps.core.masks import draw_mask
from tests.models import tiny_mlp

PATTERNS = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8)]


def bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, n_in: int, after_step: Any = None
) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, n_in, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


# a random N:M mask and random drop / grow scores, for the updates' property tests
UPDATE_CASES = settings(max_examples=40, deadline=None)(
    given(
        pattern=st.sampled_from(PATTERNS),
        rows=st.integers(1, 5),
        groups=st.integers(1, 4),
        fraction=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**16),
    )
)


def random_case(
    pattern: tuple[int, int], rows: int, groups: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, m = pattern
    generator = torch.Generator().manual_seed(seed)
    mask = nm.random_mask((rows, groups * m), n, m, generator)
    return (
        mask,
        torch.rand(rows, groups * m, generator=generator),
        torch.rand(rows, groups * m, generator=generator),
    )


def nm_engine(
    n_m: tuple[int, int] = (2, 4),
    storage: str = "masked",
    preset: str = "rigl",
    hidden: int = 16,
    **overrides: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, DynamicSparsity]:
    n, m = n_m
    config = SparsityConfig.preset(
        preset, sparsity=1 - n / m, n_m=n_m, seed=0, storage=storage, **{"update_interval": 2, **overrides}
    )
    torch.manual_seed(0)
    model: nn.Module = tiny_mlp(n_in=16, hidden=hidden)
    if storage == "compact":
        model = to_compact(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, DynamicSparsity(model, optimizer, config, total_steps=20)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(nm, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- the pure rule
@pytest.mark.parametrize(
    ("n_m", "shape", "match"),
    [
        ((2, 4, 1), None, r"must be a pair"),
        ((0, 4), None, r"n_m\[0\] \(n\) must be an integer >= 1 and <= 4, got 0"),
        ((5, 4), None, r"n_m\[0\] \(n\) must be an integer >= 1 and <= 4, got 5"),
        ((2, 0), None, r"n_m\[1\] \(m\) must be an integer >= 1, got 0"),
        ((2, 4), (8, 10), r"fan-in 10"),
        ((2, 4), (8,), r"fan-in 0"),
    ],
)
def test_check_n_m_names_the_bad_value(n_m: Any, shape: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nm.check_n_m(n_m, shape)


def test_top_n_of_m_by_hand_with_ties_to_the_lower_position() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 3.0, 2.0]])
    assert nm.top_n_of_m(scores, 2, 4).int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0]]
    assert nm.top_n_of_m(scores, 1, 2).int().tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]


def test_is_n_m_counts_every_group() -> None:
    assert nm.is_n_m(bools([[1, 1, 0, 0, 0, 1, 0, 1]]), 2, 4)
    assert not nm.is_n_m(bools([[1, 1, 1, 0, 0, 1, 0, 0]]), 2, 4)  # 3 + 1: right total, wrong groups
    conv = torch.zeros(2, 2, 2, 2, dtype=torch.bool)  # fan-in 8, groups over the flattened [in, kh, kw]
    conv.view(2, 8)[:, [0, 1, 4, 6]] = True
    assert nm.is_n_m(conv, 2, 4)


def test_nm_update_by_hand() -> None:
    mask = bools([[1, 1, 0, 0, 0, 1, 1, 0]])
    drop = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 9.0, 0.0]])
    grow = torch.tensor([[0.0, 0.3, 0.8, 0.1, 0.9, 0.7, 0.0, 0.2]])
    # the two weakest (positions 1 and 5) go; group 0 grows position 2 (0.8), group 1 position 4 (0.9)
    assert nm.nm_update(mask, drop, grow, 2, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]
    # a just-dropped entry is no candidate, even with the best grow score of its group (RigL's rule)
    grow_back = torch.tensor([[0.0, 0.95, 0.8, 0.1, 0.9, 0.99, 0.0, 0.2]])
    assert nm.nm_update(mask, drop, grow_back, 2, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]
    grow_last = torch.tensor([[0.0, 0.95, 0.1, 0.8, 0.2, 0.99, 0.0, 0.9]])
    assert nm.nm_update(mask, drop, grow_last, 2, 2, 4).int().tolist() == [[1, 0, 0, 1, 0, 0, 1, 1]]
    # the tensor-wide drop may empty one group; that group regrows its two fresh places, the other is untouched
    drop_one_group = torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.0, 7.0, 8.0, 0.0]])
    assert nm.nm_update(mask, drop_one_group, grow, 2, 2, 4).int().tolist() == [[0, 0, 1, 1, 0, 1, 1, 0]]
    assert torch.equal(nm.nm_update(mask, drop, grow, 0, 2, 4), mask)


def test_nm_update_by_hand_across_rows_and_for_n_above_half_of_m() -> None:
    # 3:4, two rows of one group: row 0 loses 2 entries but has one fresh place (3), so it also regrows the better
    # of its two dropped entries (0: 0.5 over 1: 0.4); row 1 loses none
    mask = bools([[1, 1, 1, 0], [0, 1, 1, 1]])
    drop = torch.tensor([[0.1, 0.2, 5.0, 0.0], [0.0, 6.0, 7.0, 8.0]])
    grow = torch.tensor([[0.5, 0.4, 0.0, 0.9], [0.9, 0.0, 0.0, 0.0]])
    new = nm.nm_update(mask, drop, grow, 2, 3, 4)
    assert new.int().tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]


def test_nm_update_refuses_a_mask_that_is_not_n_m_and_a_bad_count() -> None:
    scores = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"not 2:4"):
        nm.nm_update(bools([[1, 1, 1, 0]]), scores, scores, 0, 2, 4)
    with pytest.raises(ValueError, match=r"n_drop must be in \[0, nnz=2\], got 3"):
        nm.nm_update(bools([[1, 1, 0, 0]]), scores, scores, 3, 2, 4)


@UPDATE_CASES
def test_nm_update_keeps_n_m_and_drops_the_lowest(
    pattern: tuple[int, int], rows: int, groups: int, fraction: float, seed: int
) -> None:
    n, m = pattern
    mask, drop, grow = random_case(pattern, rows, groups, seed)
    nnz = int(mask.sum())
    n_drop = round(fraction * nnz)
    new = nm.nm_update(mask, drop, grow, n_drop, n, m)
    assert nm.is_n_m(new, n, m) and int(new.sum()) == nnz
    lowest = rules.select_top(drop, mask, n_drop, largest=False)  # only these may go
    assert not bool((mask & ~new & ~lowest).any())
    if 2 * n <= m:  # every group has room for what it lost: no dropped entry comes back
        assert int((mask & ~new).sum()) == n_drop
    else:
        assert int((mask & ~new).sum()) <= n_drop


def test_nm_swap_update_by_hand() -> None:
    mask = bools([[1, 1, 0, 0, 0, 1, 1, 0]])
    drop = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 9.0, 0.0]])
    grow = torch.tensor([[0.0, 0.0, 0.8, 0.1, 0.9, 0.0, 0.0, 0.2]])
    # one swap: the best incoming score (0.9, group 1) wins; its group's weaker active entry (5: 2.0) leaves,
    # although group 0 holds the tensor's weakest entry (1: 1.0)
    assert nm.nm_swap_update(mask, drop, grow, 1, 2, 4).int().tolist() == [[1, 1, 0, 0, 1, 0, 1, 0]]
    # two swaps: 0.9 in group 1, then 0.8 in group 0 (before group 1's second best, 0.2)
    assert nm.nm_swap_update(mask, drop, grow, 2, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]
    # three: group 1 also swaps its second best in (7: 0.2) for its second weakest (6: 9.0)
    assert nm.nm_swap_update(mask, drop, grow, 3, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 0, 1]]
    assert torch.equal(nm.nm_swap_update(mask, drop, grow, 0, 2, 4), mask)
    # a group swaps at most min(n, m - n) entries: four swaps turn every group over, more are capped
    flipped = [[0, 0, 1, 1, 1, 0, 0, 1]]
    assert nm.nm_swap_update(mask, drop, grow, 4, 2, 4).int().tolist() == flipped
    assert nm.nm_swap_update(mask, drop, grow, 9, 2, 4).int().tolist() == flipped
    # 3:4 swaps one entry per group
    three = bools([[1, 1, 1, 0], [0, 1, 1, 1]])
    scores = torch.tensor([[0.1, 0.2, 5.0, 0.0], [0.0, 6.0, 7.0, 8.0]])
    assert nm.nm_swap_update(three, scores, 1 - scores, 2, 3, 4).int().tolist() == [
        [0, 1, 1, 1],
        [1, 0, 1, 1],
    ]


def test_nm_swap_update_refuses_a_mask_that_is_not_n_m_and_a_negative_count() -> None:
    scores = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"not 2:4: a group does not hold exactly 2"):
        nm.nm_swap_update(bools([[1, 0, 0, 0]]), scores, scores, 0, 2, 4)
    with pytest.raises(ValueError, match=r"n_drop must be >= 0, got -1"):
        nm.nm_swap_update(bools([[1, 1, 0, 0]]), scores, scores, -1, 2, 4)
    with pytest.raises(ValueError, match=r"expected scores of the mask's shape \(1, 4\)"):
        nm.nm_swap_update(bools([[1, 1, 0, 0]]), torch.zeros(1, 8), scores, 1, 2, 4)


@UPDATE_CASES
def test_nm_swap_update_keeps_n_m_and_takes_the_best_incoming_swaps(
    pattern: tuple[int, int], rows: int, groups: int, fraction: float, seed: int
) -> None:
    n, m = pattern
    mask, drop, grow = random_case(pattern, rows, groups, seed)
    nnz = int(mask.sum())
    per_group = min(n, m - n)
    n_drop = round(fraction * nnz)
    swaps = min(n_drop, per_group * rows * groups)
    new = nm.nm_swap_update(mask, drop, grow, n_drop, n, m)
    assert nm.is_n_m(new, n, m) and int(new.sum()) == nnz
    grown, dropped = new & ~mask, mask & ~new
    assert int(grown.sum()) == int(dropped.sum()) == swaps
    # the incoming entries are the tensor's best swaps: each group offers its per_group best inactive entries
    offered = nm.groups(grow.masked_fill(mask, -1.0), m).sort(dim=-1, descending=True).values[..., :per_group]
    best = offered.flatten().topk(swaps).values
    assert torch.equal(grow[grown].sort().values, best.sort().values)
    # in every group, the leaving entries are its weakest active ones
    for g_new, g_old, g_drop in zip(
        nm.groups(new, m).reshape(-1, m),
        nm.groups(mask, m).reshape(-1, m),
        nm.groups(drop, m).reshape(-1, m),
        strict=True,
    ):
        left, stayed = g_old & ~g_new, g_old & g_new
        if left.any() and stayed.any():
            assert float(g_drop[left].max()) <= float(g_drop[stayed].min())


# ---------------------------------------------------------------------------------------------- the config
def test_config_round_trips_and_sets_the_distribution() -> None:
    config = SparsityConfig.preset("rigl", sparsity=0.5, n_m=[2, 4])
    assert config.n_m == (2, 4) and config.distribution == "uniform" and config.density == 0.5
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["n_m"] == [2, 4]
    assert SparsityConfig().n_m is None
    # the update rule: growth-led swaps for ranked growth, drop-led for random growth (SET), or as given
    assert (
        config.n_m_rule == "swap"
        and SparsityConfig.preset("set", sparsity=0.5, n_m=(2, 4)).n_m_rule == "drop"
    )
    assert SparsityConfig.preset("rigl", sparsity=0.5, n_m=(2, 4), n_m_rule="drop").n_m_rule == "drop"
    with pytest.raises(ValueError, match=r"n_m_rule must be one of 'auto', 'drop', 'swap', got 'best'"):
        SparsityConfig.preset("rigl", sparsity=0.5, n_m=(2, 4), n_m_rule="best")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sparsity": 0.9, "n_m": (2, 4)}, r"sparsity 1 - n/m = 0.5, got sparsity=0.9; pass sparsity=0.5"),
        ({"sparsity": 0.5, "n_m": (2, 4), "method": "gmp", "grow": "none"}, r"got method='gmp'"),
        ({"sparsity": 0.5, "n_m": (2, 4), "constant_fan_in": True}, r"constant_fan_in=True"),
        ({"sparsity": 0.5, "n_m": (2, 4), "redistribution": "momentum"}, r"redistribution='momentum'"),
        ({"sparsity": 0.5, "n_m": (2, 4), "random_grow_fraction": 0.5}, r"random_grow_fraction=0.5"),
        ({"sparsity": 0.5, "n_m": (3, 2)}, r"n_m\[0\] \(n\) must be an integer >= 1 and <= 2, got 3"),
        ({"sparsity": 0.5, "n_m": (2,)}, r"must be a pair"),
    ],
)
def test_config_refuses_what_cannot_keep_n_m(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparsityConfig.preset("rigl", **overrides)


def test_draw_mask_is_n_m_and_checks_the_budget() -> None:
    config = SparsityConfig(sparsity=0.75, n_m=(1, 4))
    mask = draw_mask((3, 8), 6, config, torch.Generator().manual_seed(0))
    assert nm.is_n_m(mask, 1, 4)
    assert torch.equal(mask, draw_mask((3, 8), 6, config, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"gives a tensor of shape \(3, 8\) 6 nonzeros, got a budget of 7"):
        draw_mask((3, 8), 7, config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"fan-in 10"):
        draw_mask((3, 10), 6, config, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_names_a_tensor_whose_fan_in_cannot_hold_n_m_and_exclude_keeps_it_dense() -> None:
    config = SparsityConfig.preset("rigl", sparsity=0.5, n_m=(2, 4))
    model = tiny_mlp(n_in=10, hidden=16)
    with pytest.raises(ValueError, match=r"'0.weight' of shape \(16, 10\) has fan-in 10; keep it dense"):
        DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), config, 10)
    engine = DynamicSparsity(
        model, torch.optim.SGD(model.parameters(), lr=0.1), config.replace(exclude=("0.weight",)), 10
    )
    assert sorted(engine.masks) == ["2.weight", "4.weight"]


def test_engine_refuses_initial_masks_that_are_not_n_m() -> None:
    config = SparsityConfig.preset("static", sparsity=0.5, n_m=(2, 4))
    model = nn.Sequential(nn.Linear(8, 2))
    good = bools([[1, 1, 0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0]])
    bad = bools([[1, 1, 1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 1, 0, 1, 0]])
    engine = DynamicSparsity(
        model, torch.optim.SGD(model.parameters(), lr=0.1), config, 10, initial_masks={"0.weight": good}
    )
    assert torch.equal(engine.masks["0.weight"], good)
    with pytest.raises(ValueError, match=r"initial mask of '0.weight' is not 2:4: groups of 4 hold \[1, 3\]"):
        DynamicSparsity(
            model, torch.optim.SGD(model.parameters(), lr=0.1), config, 10, initial_masks={"0.weight": bad}
        )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # the two weakest entries (1: 1.0, 5: 2.0) leave; each group regrows its best fresh place (3, 7)
        ("drop", [[1, 0, 0, 1, 0, 0, 1, 1]]),
        # the two best inactive gradients (3: 0.85, 2: 0.8) come in; both in group 0, whose two entries leave
        ("swap", [[0, 0, 1, 1, 0, 1, 1, 0]]),
    ],
)
def test_engine_update_by_hand(rule: str, expected: list[list[int]]) -> None:
    """Magnitude drop, dense-gradient growth, no tie noise: the rules' worked examples through the engine."""
    layer = nn.Linear(8, 1, bias=False)
    weights = [5.0, 1.0, 0.0, 0.0, 0.0, 2.0, 9.0, 0.0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = SparsityConfig.preset(
        "rigl",
        sparsity=0.5,
        n_m=(2, 4),
        n_m_rule=rule,
        update_interval=1,
        drop_fraction=0.5,
        drop_schedule="constant",
        end_fraction=1.0,
        tie_noise=0.0,
    )
    initial = bools([[1, 1, 0, 0, 0, 1, 1, 0]])
    engine = DynamicSparsity(model, optimizer, config, total_steps=5, initial_masks={"0.weight": initial})
    x = torch.tensor([[0.0, 0.3, 0.8, 0.85, 0.1, 0.7, 0.0, 0.2]])  # the dense gradient of sum(w . x) is x
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    assert engine.masks["0.weight"].int().tolist() == expected
    kept = [w if was and now else 0.0 for w, was, now in zip(weights, initial[0], expected[0], strict=True)]
    assert layer.weight.detach().tolist() == [kept]  # grown at zero


CONFIGS = {
    "rigl": {},
    "set": {},
    "random_growth": {"grow": "random"},  # magnitude drop, uniform growth
    "rigl_swap": {"n_m_rule": "swap"},  # growth-led swaps
    "static": {},
}


@settings(max_examples=20, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    name=st.sampled_from(sorted(CONFIGS)),
    widths=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    storage=st.sampled_from(["masked", "compact"]),
)
def test_n_m_and_nnz_hold_after_every_update(
    pattern: tuple[int, int], name: str, widths: tuple[int, int], storage: str
) -> None:
    n, m = pattern
    n_in, hidden = widths[0] * m, widths[1] * m
    preset = "rigl" if name in ("random_growth", "rigl_swap") else name
    overrides = {"update_interval": 2, "end_fraction": 1.0, **CONFIGS[name]} if preset != "static" else {}
    config = SparsityConfig.preset(
        preset, sparsity=1 - n / m, n_m=pattern, seed=3, storage=storage, **overrides
    )
    torch.manual_seed(0)
    model: nn.Module = tiny_mlp(n_in=n_in, hidden=hidden)
    if storage == "compact":
        model = to_compact(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = DynamicSparsity(model, optimizer, config, total_steps=10)
    budgets = {fqn: t.budget for fqn, t in engine.tensors.items()}
    assert budgets == {fqn: t.numel * n // m for fqn, t in engine.tensors.items()}

    def check() -> None:
        for fqn, t in engine.tensors.items():
            assert nm.is_n_m(t.mask, n, m), fqn
            assert int(t.mask.sum()) == budgets[fqn], fqn
            assert bool((t.dense_weight()[~t.mask] == 0).all()), fqn

    check()
    train(model, optimizer, 10, n_in, check)
    assert len(engine.history) == (4 if config.dynamic else 0)  # steps 2, 4, 6, 8
    if config.dynamic and n < m:
        assert sum(t["grown"] for record in engine.history for t in record["tensors"].values()) > 0


@pytest.mark.parametrize("rule", ["drop", "swap"])
def test_both_storages_make_the_same_n_m_updates(rule: str) -> None:
    """Compact layers take the dense views (a reason is given) and draw and update the masked run's masks."""
    runs = {storage: nm_engine((2, 4), storage, n_m_rule=rule) for storage in ("masked", "compact")}
    assert (
        compact_topology.dense_view_reason(runs["compact"][2]) == "n_m=(2, 4) keeps per-group budgets (N:M)"
    )
    for fqn, t in runs["masked"][2].tensors.items():  # to_compact's initial masks are the engine's, N:M
        assert torch.equal(t.mask, runs["compact"][2].tensors[fqn].mask)
    for model, optimizer, _ in runs.values():
        train(model, optimizer, 12, 16)
    masked, compact = runs["masked"][2], runs["compact"][2]
    assert masked.history == compact.history and len(masked.history) == 6
    for fqn, t in masked.tensors.items():
        assert torch.equal(t.mask, compact.tensors[fqn].mask) and nm.is_n_m(t.mask, 2, 4)


def test_growth_regions_are_refused_at_the_update() -> None:
    model, optimizer, engine = nm_engine()
    engine.set_growth_region({"0.weight": torch.ones(16, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"growth regions .* regions set for \['0.weight'\]"):
        train(model, optimizer, 2, 16)


def test_checkpoint_round_trip_keeps_the_structure() -> None:
    model, optimizer, engine = nm_engine()
    train(model, optimizer, 4, 16)
    state = engine.state_dict()
    assert state["config"]["n_m"] == [2, 4]
    fresh_model, _, fresh = nm_engine()
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    for fqn, t in engine.tensors.items():
        assert torch.equal(fresh.tensors[fqn].mask, t.mask)


def test_a_checkpoint_from_before_the_rule_field_resumes_only_under_its_drop_rule() -> None:
    """Checkpoints written before ``n_m_rule`` existed ran the drop rule: today's default (swap for RigL) is refused
    with the field named, and ``n_m_rule="drop"`` resumes them."""
    model, optimizer, engine = nm_engine(n_m_rule="drop")
    train(model, optimizer, 4, 16)
    state = engine.state_dict()
    del state["config"]["n_m_rule"]  # as an older version wrote it
    _, _, today = nm_engine()
    with pytest.raises(ConfigMismatchError, match=r"'n_m_rule': \('drop', 'swap'\)"):
        today.load_state_dict(state)
    _, _, as_before = nm_engine(n_m_rule="drop")
    as_before.load_state_dict(state)
    for fqn, t in engine.tensors.items():
        assert torch.equal(as_before.tensors[fqn].mask, t.mask)
    # configurations without N:M read back unchanged
    assert SparsityConfig.from_dict(SparsityConfig.preset("rigl").to_dict()).n_m_rule == "auto"


# ---------------------------------------------------------------------------------------------- exports
def test_condense_picks_the_condensed_layout_and_matches_the_masked_model() -> None:
    model, optimizer, engine = nm_engine((2, 8), hidden=32)
    train(model, optimizer, 6, 16)
    for t in engine.tensors.values():
        stats = mask_stats(t.mask)
        assert stats.constant_fan_in and stats.max_fan_in == t.mask.shape[1] // 4
    fast = condense(model, CondenseConfig(form="condensed", planner="cost_model"))
    assert [type(fast[i]) for i in (0, 2, 4)] == [CondensedLinear] * 3
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_semi_structured_export_says_why_not() -> None:
    weight = torch.randn(16, 16)
    not_2_4 = torch.zeros(16, 16, dtype=torch.bool)
    not_2_4[:, :3] = True
    with pytest.raises(ValueError, match=r"the mask is not 2:4: a group of 4 consecutive inputs holds 3"):
        nm.to_semi_structured(weight, not_2_4)
    with pytest.raises(ValueError, match=r"2-D \[out, in\] with in a multiple of 4, got shape \(16, 6\)"):
        nm.to_semi_structured(torch.randn(16, 6), torch.ones(16, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must share a shape"):
        nm.to_semi_structured(weight, not_2_4[:, :8])
    with pytest.raises(ValueError, match=r"expected an nn.Linear with a weight_mask in Sequential, got none"):
        nm.to_semi_structured_model(nn.Sequential(nn.Linear(4, 4)))
    two_four = nm.random_mask((16, 16), 2, 4, torch.Generator().manual_seed(0))
    assert nm.semi_structured_reason(two_four, "cpu") == (
        "semi-structured sparse tensors need a CUDA device, got device 'cpu'"
    )
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
            nm.to_semi_structured(weight, two_four)
        model, _, _ = nm_engine((2, 4))
        with pytest.raises(RuntimeError, match=r"cannot export '0' to a semi-structured sparse tensor"):
            nm.to_semi_structured_model(model)


@pytest.mark.gpu
def test_semi_structured_export_runs_on_sparse_tensor_cores() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA device of capability >= 8.0")
    model, optimizer, _ = nm_engine((2, 4), hidden=64)
    train(model, optimizer, 4, 16)
    masked = model[2]
    sparse = nm.to_semi_structured(masked.weight, masked.weight_mask)
    assert torch.equal(sparse.to_dense().cpu(), (masked.weight * masked.weight_mask).detach().half())
    exported = nm.to_semi_structured_model(nn.Sequential(model[2]))  # 64 -> 64: shapes cuSPARSELt takes
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = F.linear(
            x.half().cuda(), (masked.weight * masked.weight_mask).half().cuda(), masked.bias.half().cuda()
        )
        torch.testing.assert_close(exported(x.half().cuda()), want, rtol=1e-2, atol=1e-2)
