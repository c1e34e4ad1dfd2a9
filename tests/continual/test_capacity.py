"""Capacity plans by hand: equal, redistribute and free policies, the first layer's fair share, empty layers."""

from __future__ import annotations

from typing import Any

import pytest

from sparseapps.continual.capacity import plan_capacity
from sparseapps.continual.config import IsolationConfig
from sparseapps.core import SparsityConfig


def _config(
    sparsity: float, distribution: str = "uniform", *, dense_first_layer: bool = False, **isolation: Any
):
    core = SparsityConfig(
        sparsity=sparsity, distribution=distribution, grow="random", dense_first_layer=dense_first_layer
    )
    return IsolationConfig(sparsity=core, **isolation)


def test_equal_plan_is_the_target_for_every_task():
    target, plan = plan_capacity({"a": (10, 10), "b": (4, 10)}, 4, _config(0.75))
    assert target == {"a": 25, "b": 10}
    assert plan == [{"a": 25, "b": 10}] * 4


def test_equal_plan_rounds_down_a_rounding_overflow():
    # 0.2 * 16384 = 3276.8 rounds to 3277, and 5 x 3277 > 16384: the target is rounded down to 16384 // 5.
    target, _ = plan_capacity({"a": (256, 64), "b": (256, 256)}, 5, _config(0.8))
    assert target == {"a": 3276, "b": 13107}


def test_equal_plan_refuses_more_tasks_than_the_capacity():
    with pytest.raises(ValueError, match=r"capacity: .* a: 6 x 20 = 120 > 100 .*capacity='redistribute'"):
        plan_capacity({"a": (10, 10)}, 6, _config(0.8))


def test_erk_dense_layer_needs_a_policy():
    # ERK makes the small layer dense (density 1), which no second task could share.
    shapes = {"small": (4, 3), "big": (64, 64)}
    with pytest.raises(ValueError, match=r"small: 2 x 12 = 24 > 12 .*distribution='uniform'"):
        plan_capacity(shapes, 2, _config(0.7, "erk"))
    target, plan = plan_capacity(shapes, 2, _config(0.7, "erk", capacity="redistribute"))
    assert target["small"] == 12
    budget = sum(target.values())
    assert plan[0]["small"] == 6  # its fair share of 12 between 2 tasks
    assert sum(plan[0].values()) == budget  # the surplus moved to the big layer
    assert plan[1] == {"small": 6, "big": budget - 6}


def test_redistribute_shares_equally_when_targets_exceed_the_network():
    target, plan = plan_capacity({"a": (4, 10)}, 3, _config(0.5, capacity="redistribute"))
    assert target == {"a": 20}
    assert plan == [{"a": 13}, {"a": 13}, {"a": 14}]
    assert sum(p["a"] for p in plan) == 40


def test_free_plan_takes_the_density_of_what_is_free():
    _, plan = plan_capacity({"a": (10, 10)}, 3, _config(0.5, capacity="free"))
    # 0.5 * 100, then 0.5 * 50, then 0.5 * 25 (12.5 rounds to even)
    assert [p["a"] for p in plan] == [50, 25, 12]
    with pytest.raises(ValueError, match=r"got none for task #1 .*\['small'\]"):
        plan_capacity({"small": (4, 3), "big": (64, 64)}, 2, _config(0.7, "erk", capacity="free"))


def test_dense_first_layer_gives_the_fair_share():
    target, plan = plan_capacity(
        {"first": (10, 10), "rest": (10, 10)}, 4, _config(0.9, dense_first_layer=True)
    )
    assert target == {"first": 25, "rest": 10}
    assert plan[3] == target


def test_strict_isolation_refuses_an_empty_layer_and_transfer_allows_it():
    shapes = {"a": (2, 2), "b": (30, 30)}
    with pytest.raises(ValueError, match=r"at least one weight .* got none for task #0 .*\['a'\]"):
        plan_capacity(shapes, 5, _config(0.5, capacity="redistribute"))
    _, plan = plan_capacity(shapes, 5, _config(0.5, capacity="redistribute", forward_transfer=True))
    assert plan[0]["a"] == 0 and sum(p["a"] for p in plan) == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"n_tasks must be an integer >= 1 and <= 255, got 0"):
        plan_capacity({"a": (2, 2)}, 0, _config(0.5))
    with pytest.raises(ValueError, match=r"shapes must name at least one isolated layer"):
        plan_capacity({}, 1, _config(0.5))
