"""Core engine under DDP with two gloo processes: identical masks at every update, single-process results."""

from __future__ import annotations

import pytest
import torch

from sparseapps.core import DynamicSparsity
from sparseapps.core.distributed import DistributedSparsity, fingerprint, require_process_group
from tests.distributed import core_workers as workers
from tests.distributed.launch import run_distributed


def assert_same_snapshots(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for first, second in zip(a, b, strict=True):
        assert first.keys() == second.keys()
        for fqn in first:
            assert torch.equal(first[fqn], second[fqn]), fqn


# CI runs RigL; the SET case and the broadcast/unseeded variants run with -m slow.
@pytest.mark.parametrize("preset", ["rigl", pytest.param("set", marks=pytest.mark.slow)])
def test_ddp_masks_identical_and_match_single_process(preset: str) -> None:
    ranks = run_distributed(workers.train_ddp, preset, "verify")
    assert all("error" not in r for r in ranks), ranks
    single = workers.train_single(preset)
    zero, one = ranks
    assert zero["updates"] == one["updates"] == single["updates"] >= 5
    # every update was checked across ranks (plus the check at attach), and the gathered masks agree
    assert zero["checks"] == one["checks"] == single["updates"] + 1
    assert_same_snapshots(zero["snapshots"], one["snapshots"])
    for name in zero["state"]:
        assert torch.equal(zero["state"][name], one["state"][name]), name
    # same global batch in one process: same topology, weights and loss within float tolerance
    assert_same_snapshots(zero["snapshots"], single["snapshots"])
    for name, value in single["state"].items():
        torch.testing.assert_close(zero["state"][name].float(), value.float(), atol=1e-4, rtol=1e-4)
    assert abs(zero["final_loss"] - single["final_loss"]) <= 0.01 * abs(single["final_loss"])


def test_divergent_masks_are_detected_and_name_the_rank() -> None:
    ranks = run_distributed(workers.corrupt_rank1, "verify")
    for result in ranks:
        assert result["error"] == "MaskDivergenceError"
        assert "rank 1 has other masks than rank 0 for ['0.weight']" in result["message"]


@pytest.mark.slow
def test_broadcast_sync_overrides_divergent_masks() -> None:
    zero, one = run_distributed(workers.corrupt_rank1, "broadcast")
    assert "error" not in zero and "error" not in one, (zero, one)
    assert len(zero["snapshots"]) >= 5
    assert_same_snapshots(zero["snapshots"], one["snapshots"])


def test_configuration_mismatch_names_the_rank() -> None:
    for result in run_distributed(workers.mismatched_config):
        assert result["error"] == "RankMismatchError"
        assert "rank 1 differs from rank 0" in result["message"]
        assert "'sparsity': (0.8, 0.7)" in result["message"]


@pytest.mark.slow
def test_unseeded_engines_start_from_rank0_state() -> None:
    zero, one = run_distributed(workers.unseeded)
    assert "error" not in zero and "error" not in one, (zero, one)
    assert_same_snapshots(zero["snapshots"], one["snapshots"])
    for name in zero["state"]:
        assert torch.equal(zero["state"][name], one["state"][name]), name


def test_missing_process_group_is_a_clear_error() -> None:
    model = workers.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"no torch\.distributed process group"):
        require_process_group()
    engine = DynamicSparsity(model, optimizer, workers.make_config("rigl"), total_steps=10)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedSparsity(engine)
    with pytest.raises(RuntimeError, match=r"no torch\.distributed process group"):
        DistributedSparsity.attach(model, optimizer, workers.make_config("rigl"), 10)


def test_bad_sync_mode_names_the_value() -> None:
    model = workers.make_model()
    engine = DynamicSparsity(
        model, torch.optim.SGD(model.parameters(), lr=0.1), workers.make_config("set"), 10
    )
    with pytest.raises(ValueError, match="got 'gather'"):
        DistributedSparsity(engine, sync="gather")  # type: ignore[arg-type]


def test_fingerprint_separates_shape_and_content() -> None:
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = True
    assert fingerprint(mask) == fingerprint(mask.clone())
    assert fingerprint(mask) != fingerprint(mask.reshape(6, 4))
    other = mask.clone()
    other[3, 5] = True
    assert fingerprint(mask) != fingerprint(other)
    assert fingerprint(torch.ones(3)) != fingerprint(torch.ones(3) * 2)
