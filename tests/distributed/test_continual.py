"""The isolation plugin under Avalanche's distributed support: two gloo processes, DDP-wrapped model."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import continual_workers as workers
from tests.distributed.launch import run_distributed


def test_isolation_plugin_under_avalanche_ddp_keeps_ranks_identical_and_forgets_nothing() -> None:
    zero, one = run_distributed(workers.train)
    assert "error" not in zero and "error" not in one, (zero.get("traceback"), one.get("traceback"))
    assert zero["distributed"] and one["distributed"] and zero["supports_distributed"]
    assert zero["updates"] == one["updates"] > 3
    # a check at start, after every topology update and after each of the 5 tasks, all passed
    assert zero["checks"] == one["checks"] == 1 + zero["updates"] + 5
    for fqn in zero["owners"]:
        assert torch.equal(zero["owners"][fqn], one["owners"][fqn])
        assert torch.equal(zero["weights"][fqn], one["weights"][fqn])
    for result in (zero["result"], one["result"]):
        assert result["bwt"] == 0.0 and result["bwt_exact_zero"]
        assert result["acc"] > 0.8


@pytest.mark.slow  # the same check as tests/distributed/test_core.py's, through the plugin
def test_configuration_mismatch_names_the_rank() -> None:
    for result in run_distributed(workers.mismatched):
        assert result["error"] == "RankMismatchError"
        assert "rank 1 differs from rank 0 in {'sparsity.sparsity': (0.8, 0.85)" in result["message"]


def test_divergent_masks_name_the_rank_and_layer() -> None:
    for result in run_distributed(workers.corrupted):
        assert result["error"] == "MaskDivergenceError"
        assert (
            "rank 1 has other masks or ownership than rank 0 for ['module.backbone.1 mask']"
            in result["message"]
        ), result["message"]
