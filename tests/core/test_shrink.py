"""Structured pruning that shrinks layers: hand-computed criteria, shrunk == masked, merging, slimming, errors."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import shrink as shrink_module
from sparseapps.core.mnist1d import make_mnist1d_cnn
from sparseapps.core.shrink import (
    UNIT_CRITERIA,
    UnitGroup,
    find_unit_groups,
    mask_units,
    merge_similar_units,
    merge_units_,
    prune_units,
    score_units,
    select_units,
    shrink,
    slimming_penalty,
)
from tests.scripts import script_module


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hand_mlp() -> nn.Sequential:
    """``[B, 1] -> [B, 1]``: units ``relu(x), relu(2x), relu(-x)``, read with weights ``1, -1, 3``."""
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 3.0]]))
        model[2].bias.zero_()
    return model


HAND_BATCHES = [(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1))]  # activations [1, 2, 0] and [2, 4, 0]


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def _bn_cnn() -> nn.Sequential:
    """``[B, 2, 12] -> [B, 3]``: conv-BN-ReLU twice, flatten (6 channels x 5 positions), linear head."""
    return nn.Sequential(
        nn.Conv1d(2, 5, 3, bias=False),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Conv1d(5, 6, 3, stride=2),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4, 3),
    )


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.weight.uniform_(-1.0, 1.0)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


# ---------------------------------------------------------------------------------------------- groups
def test_groups_follow_registration_order_with_norms_and_flatten() -> None:
    assert find_unit_groups(_mlp()) == [
        UnitGroup(producer="0", consumer="2"),
        UnitGroup(producer="2", consumer="4"),
    ]
    assert find_unit_groups(_bn_cnn()) == [
        UnitGroup(producer="0", consumer="3", norm="1"),
        UnitGroup(producer="3", consumer="7", norm="4"),
    ]
    assert find_unit_groups(make_mnist1d_cnn(4)) == [
        UnitGroup(producer="conv1", consumer="conv2"),
        UnitGroup(producer="conv2", consumer="conv3"),
        UnitGroup(producer="conv3", consumer="head"),
    ]


def test_unsupported_layers_are_named_by_their_fqn() -> None:
    with pytest.raises(ValueError, match=r"layer '1\.1' \(LayerNorm\) is not supported"):
        find_unit_groups(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))))
    with pytest.raises(ValueError, match=r"layer '1' \(Conv1d with groups=2\) is not supported"):
        find_unit_groups(nn.Sequential(nn.Conv1d(2, 4, 1), nn.Conv1d(4, 4, 1, groups=2)))
    with pytest.raises(ValueError, match="BatchNorm '0' follows no Linear or Conv layer"):
        find_unit_groups(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"'0' \(4 units\) does not feed '1' \(5 inputs\)"):
        score_units(nn.Sequential(nn.Linear(2, 4), nn.Linear(5, 1)), "l1")


def test_explicit_group_of_unknown_module_is_refused() -> None:
    with pytest.raises(ValueError, match="consumer 'head' is not a module of the model"):
        score_units(_mlp(), "l1", groups=[UnitGroup(producer="0", consumer="head")])


# ---------------------------------------------------------------------------------------------- criteria
def test_registry_lists_the_criteria_with_their_papers() -> None:
    assert set(UNIT_CRITERIA) >= {"l1", "bn_scale", "taylor", "activation_mean", "activation_variance"}
    assert all(entry.reference for entry in UNIT_CRITERIA.values())
    assert UNIT_CRITERIA["bn_scale"].scope == "global" and UNIT_CRITERIA["l1"].scope == "layer"


def test_l1_removes_the_unit_with_the_smallest_incoming_weights() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.1, -0.2], [-2.0, 3.0]]))
    torch.testing.assert_close(score_units(model, "l1")["0"], torch.tensor([2.0, 0.3, 5.0]))
    small = prune_units(model, "l1", 1 / 3)
    torch.testing.assert_close(small[0].weight, model[0].weight[[0, 2]])
    torch.testing.assert_close(small[2].weight, model[2].weight[:, [0, 2]])


def test_taylor_equals_the_hand_computed_first_order_change() -> None:
    # outputs -1 and -2, targets 0: dl_n/dout = 2 * out = -2, -4; dl_n/da = that * [1, -1, 3]
    # a * g per example: [-2, 4, 0] and [-8, 16, 0]; |.| averaged over the two examples: [5, 10, 0]
    scores = score_units(_hand_mlp(), "taylor", batches=HAND_BATCHES, loss_fn=F.mse_loss)
    torch.testing.assert_close(scores["0"], torch.tensor([5.0, 10.0, 0.0]))


def test_activation_mean_and_variance_on_a_fixed_batch() -> None:
    model = _hand_mlp()
    mean = score_units(model, "activation_mean", batches=HAND_BATCHES)["0"]
    variance = score_units(model, "activation_variance", batches=HAND_BATCHES)["0"]
    torch.testing.assert_close(mean, torch.tensor([1.5, 3.0, 0.0]))
    torch.testing.assert_close(variance, torch.tensor([0.25, 1.0, 0.0]))


def test_taylor_on_convolutions_averages_over_positions_and_leaves_grads_alone() -> None:
    model = make_mnist1d_cnn(4)
    x, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    scores = score_units(model, "taylor", batches=[(x, y)], loss_fn=F.cross_entropy)
    assert all(p.grad is None for p in model.parameters()) and model.training
    h = torch.relu(model.conv2(torch.relu(model.conv1(x.unsqueeze(1)))))
    a = torch.relu(model.conv3(h)).detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(model.head(a.flatten(1)), y, reduction="sum"), a)
    torch.testing.assert_close(scores["conv3"], (a * g).mean(2).abs().mean(0))


def test_bn_scale_ranks_channels_across_layers() -> None:
    model = _bn_cnn()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, -0.01, 0.5, 0.02, -0.7]))
        model[4].weight.copy_(torch.tensor([0.03, 1.0, -0.8, 0.6, 0.001, 0.4]))
    plan = select_units(score_units(model, "bn_scale"), 4 / 11, scope="global")
    assert plan["0"].tolist() == [True, False, True, False, True]
    assert plan["3"].tolist() == [False, True, True, True, False, True]
    with pytest.raises(
        ValueError,
        match=r"'bn_scale' needs a BatchNorm with affine=True after every producer, got none after \['0', '2'\]",
    ):
        score_units(_mlp(), "bn_scale")


def test_slimming_penalty_gradient_is_lambda_times_sign_of_gamma() -> None:
    model = _bn_cnn()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0, -0.1]))
    lam = 1e-4
    penalty = slimming_penalty(model, lam)
    penalty.backward()
    for index in (1, 4):
        gamma = model[index].weight
        torch.testing.assert_close(gamma.grad, lam * torch.sign(gamma.detach()), rtol=0, atol=0)
    assert float(penalty.detach()) == pytest.approx(lam * (3.6 + 6.0))
    with pytest.raises(ValueError, match="needs BatchNorm1d/2d layers"):
        slimming_penalty(_mlp(), lam)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -1"):
        slimming_penalty(model, -1)


# ---------------------------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("criterion", ["l1", "taylor", "activation_mean", "activation_variance"])
def test_shrunk_mlp_equals_the_masked_original(criterion: str) -> None:
    model, x = _mlp(), torch.randn(32, 6)
    batches = [(x, torch.randint(0, 3, (32,)))]
    scores = score_units(model, criterion, batches=batches, loss_fn=F.cross_entropy)
    plan = select_units(scores, 0.5)
    small, masked = shrink(model, plan), mask_units(model, plan)
    assert [small[0].out_features, small[2].in_features, small[2].out_features, small[4].in_features] == [
        5,
        5,
        4,
        4,
    ]
    torch.testing.assert_close(small(x), masked(x))
    assert not torch.allclose(masked(x), model(x))
    assert _parameters(small) == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3 < _parameters(model)


def test_shrunk_mnist1d_cnn_equals_the_masked_original_through_the_flatten() -> None:
    model, x = make_mnist1d_cnn(6), torch.randn(16, 40)
    plan = {
        "conv1": torch.tensor([True, False, True, True, False, True]),
        "conv3": torch.tensor([False, True, False, False, True, True]),
    }
    small, masked = shrink(model, plan), mask_units(model, plan)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.conv2.out_channels) == (4, 4, 6)
    assert (small.conv3.out_channels, small.head.in_features) == (3, 3 * 5)
    torch.testing.assert_close(small(x), masked(x))
    assert _parameters(small) < _parameters(model)
    assert model.conv1.out_channels == 6  # the original is untouched


@pytest.mark.parametrize("train_mode", [False, True])
def test_shrunk_batchnorm_cnn_equals_the_masked_original(train_mode: bool) -> None:
    model, x = _bn_cnn(), torch.randn(8, 2, 12)
    _randomize_norms(model)
    plan = select_units(score_units(model, "bn_scale"), 0.5)
    small, masked = shrink(model, plan), mask_units(model, plan)
    small.train(train_mode)
    masked.train(train_mode)
    torch.testing.assert_close(small(x), masked(x))
    assert small[1].running_mean.shape == (small[0].out_channels,) == (small[1].weight.shape[0],)
    assert small[7].in_features == small[3].out_channels * 4
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in small.parameters())


@pytest.mark.parametrize("criterion", sorted(UNIT_CRITERIA))
def test_prune_units_shrinks_by_every_criterion(criterion: str) -> None:
    model, x = _bn_cnn(), torch.randn(8, 2, 12)
    _randomize_norms(model)
    small = prune_units(
        model, criterion, 0.4, batches=[(x, torch.randint(0, 3, (8,)))], loss_fn=F.cross_entropy
    )
    assert small(x).shape == (8, 3) and _parameters(small) < _parameters(model)


def test_selection_and_plan_errors_are_clear() -> None:
    model = _mlp()
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"ratio must be a finite number in \[0, 1\), got {ratio}"):
            prune_units(model, "l1", ratio)
    with pytest.raises(ValueError, match=r"layers \['b'\] would lose all their units at ratio 0.5"):
        select_units({"a": torch.tensor([5.0, 6.0, 7.0]), "b": torch.tensor([0.1])}, 0.5, scope="global")
    with pytest.raises(ValueError, match="criterion must be one of"):
        prune_units(model, "l2", 0.5)
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_units(model, "taylor", 0.5)
    with pytest.raises(ValueError, match="needs a loss_fn"):
        prune_units(model, "taylor", 0.5, batches=[(torch.randn(2, 6), torch.zeros(2))])
    with pytest.raises(ValueError, match=r"plan\['0'\] must be a bool tensor of shape \[10\]"):
        shrink(model, {"0": torch.ones(9, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"plan\['0'\] keeps none of the 10 units"):
        shrink(model, {"0": torch.zeros(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"plan names producers \['4'\]"):
        shrink(model, {"4": torch.ones(3, dtype=torch.bool)})


def test_ratio_zero_keeps_every_unit() -> None:
    model, x = _mlp(), torch.randn(4, 6)
    small = prune_units(model, "l1", 0.0)
    assert _parameters(small) == _parameters(model)
    torch.testing.assert_close(small(x), model(x))


# ---------------------------------------------------------------------------------------------- merging
def test_merging_identical_neurons_keeps_the_function_and_drops_parameters() -> None:
    model = _mlp().double()
    with torch.no_grad():
        model[0].weight[7] = model[0].weight[2]
        model[0].bias[7] = model[0].bias[2]
        model[2].weight[5] = model[2].weight[1]
        model[2].bias[5] = model[2].bias[1]
    x = torch.randn(64, 6, dtype=torch.float64)
    merged = merge_similar_units(model, 0.1)  # one unit of 10, then one of 8
    assert (merged[0].out_features, merged[2].out_features) == (9, 7)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    assert _parameters(merged) == _parameters(model) - (6 + 1 + 8) - (9 + 1 + 3)


def test_merge_units_picks_the_least_salient_pair_and_adds_outgoing_weights() -> None:
    incoming = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [5.0, 5.0]])
    outgoing = torch.tensor([[[1.0], [2.0], [1.0], [1.0]], [[1.0], [0.0], [1.0], [3.0]]])
    # saliency[i, j] = mean(a_j ** 2) * ||w_i - w_j|| ** 2: removing 2 into 1 costs 1 * 0.01, 1 into 2: 2 * 0.01
    keep = merge_units_(incoming, outgoing, 1)
    assert keep.tolist() == [True, True, False, True]
    torch.testing.assert_close(outgoing[:, :, 0], torch.tensor([[1.0, 3.0, 0.0, 1.0], [1.0, 1.0, 0.0, 3.0]]))


def test_merging_refuses_batchnorm_groups() -> None:
    with pytest.raises(
        ValueError, match=r"does not merge units normalized by a BatchNorm, got norms \['1', '4'\]"
    ):
        merge_similar_units(_bn_cnn(), 0.5)


# ---------------------------------------------------------------------------------------------- examples
def test_docstring_examples_run() -> None:
    result = doctest.testmod(shrink_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- benchmark
def _random_mnist1d(root: str | None, *, num_samples: int) -> tuple[torch.Tensor, ...]:
    """MNIST-1D's shapes with random values: the script's plumbing without generating the data set."""
    labels = torch.arange(num_samples) % 10
    return torch.randn(num_samples, 40), labels, torch.randn(256, 40), labels[:256]


def test_bench_structured_quick_run_writes_every_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--tasks", "mlp", "bn-cnn-slim", "--ratios", "0.5", "--mnist1d_samples", "300",
            "--out", str(out)]  # fmt: skip
    with script_module("bench_structured") as bench:
        monkeypatch.setattr(bench, "load_mnist1d", _random_mnist1d)
        bench.main(argv)
        variants = bench.variants(bench.parse_args(argv))
        methods = bench.METHODS
    assert [label for label, _, _ in variants] == [
        "mlp",
        "bn-cnn-slim (lambda 0.0001)",
        "bn-cnn-slim (lambda 0.01)",
    ]
    result = json.loads((out / "results.json").read_text())
    points = {(p["task"], p["method"]): p for p in result["points"]}
    skipped = {
        (r["task"], r["method"]) for r in result["runs"] if "skipped" in r
    }  # bn_scale may empty a layer
    expected = {(label, method) for label, task, _ in variants for method in ("dense", *methods[task])}
    assert set(points) | skipped == expected and skipped <= {(label, "bn_scale") for label, _, _ in variants}
    pruned = [p for p in points.values() if p["method"] != "dense"]
    assert all(p["parameters_fraction"] < 0.6 and p["flops_fraction"] < 0.6 for p in pruned)
    assert all(p["time_ratio_b1"] > 0 and p["time_ratio_b256"] > 0 for p in pruned)
    table = (out / "results.md").read_text()
    assert result["machine"]["cpu"] in table and "bench_structured.py --quick" in table
    assert (
        "## bn-cnn-slim (lambda 0.01)" in table and "| merge | 50% |" in table and "median |gamma|" in table
    )
