"""sparseapps.core.extreme: the synthetic extreme-classification task, the constant fan-in output layer and its
entry-path SRigL updates (against the engine's dense-view SRigL), training, and scripts/bench_extreme.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, extreme
from sparseapps.core.extreme import (
    ExtremeConfig,
    ExtremeTask,
    OutputFanInUpdates,
    build_model,
    constant_fan_in_output,
    fan_in_entry_update,
    make_extreme_data,
    train_extreme,
)
from tests.scripts import script_module

SMALL = ExtremeTask(n_classes=60, n_train=3000, n_test=600, cluster_size=10, noise=0.05, seed=3)


# ------------------------------------------------------------------------------------------------ the task
def test_same_seed_same_task_and_another_seed_another() -> None:
    a, b, c = (make_extreme_data(task) for task in (SMALL, SMALL, ExtremeTask(**{**vars(SMALL), "seed": 4})))
    for name, value in vars(a).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(b, name)), name
    assert not torch.equal(a.train_labels, c.train_labels)
    assert not torch.equal(a.prototypes, c.prototypes)
    x1, y1 = a.batch("train", torch.tensor([5, 7]))
    x2, y2 = b.batch("train", torch.tensor([7, 5]))
    assert torch.equal(x1, x2.flip(0)) and torch.equal(y1, y2.flip(0))  # features depend on the example only


def test_zipf_probabilities_by_hand_and_counts_follow_them() -> None:
    data = make_extreme_data(ExtremeTask(n_classes=4, n_train=60_000, n_test=10, cluster_size=2))
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4  # 25 / 12
    expected = [1 / (harmonic * rank) for rank in (1, 2, 3, 4)]  # 0.48, 0.24, 0.16, 0.12
    assert data.probabilities.tolist() == pytest.approx(expected, abs=1e-12)
    counts = data.train_counts()
    assert counts.sum() == 60_000 and counts.tolist() == sorted(counts.tolist(), reverse=True)
    assert (counts.double() / 60_000).tolist() == pytest.approx(expected, abs=0.01)
    assert data.head_classes() == 2  # 0.48 < 0.5 <= 0.72
    assert data.train_labels.dtype == data.test_labels.dtype == torch.int32
    assert data.train_latent.dtype == torch.float32 and data.train_latent.shape == (60_000, 32)


def test_classes_form_clusters_of_the_stated_size() -> None:
    task = ExtremeTask(n_classes=95, n_train=10, n_test=10, cluster_size=10, cluster_spread=0.1, seed=1)
    data = make_extreme_data(task)
    sizes = torch.bincount(data.cluster_of.long()).tolist()
    assert task.n_clusters == 10 and sorted(sizes) == [5, *[10] * 9]
    # every prototype is nearest to its own cluster's center, and far closer to its cluster mates than to others
    assert torch.equal(torch.cdist(data.prototypes, data.centers).argmin(1), data.cluster_of.long())
    distance = torch.cdist(data.prototypes, data.prototypes)
    same = data.cluster_of[:, None] == data.cluster_of[None, :]
    off_diagonal = ~torch.eye(95, dtype=torch.bool)
    assert distance[same & off_diagonal].mean() * 5 < distance[~same].mean()


def test_examples_lie_around_their_prototype() -> None:
    data = make_extreme_data(SMALL)
    residual = data.train_latent - data.prototypes[data.train_labels.long()]
    assert residual.std().item() == pytest.approx(SMALL.noise, rel=0.05)
    x, _ = data.batch("test", torch.arange(3))
    assert torch.allclose(x, data.test_latent[:3] @ data.projection)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_classes": 1}, "n_classes >= 2, got 1"),
        ({"n_classes": 10, "cluster_size": 11}, "cluster_size in \\[1, n_classes=10\\], got 11"),
        ({"noise": -0.5}, "noise >= 0 \\(finite\\), got -0.5"),
        ({"n_train": 0}, "n_train >= 1, got 0"),
    ],
)
def test_task_errors_name_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExtremeTask(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"method": "srigl_entries", "sparsity": 1.0},
            "sparsity in \\(0, 1\\) for method 'srigl_entries', got 1.0",
        ),
        ({"method": "rigl", "sparsity": 0.0}, "got 0.0"),
        ({"method": "magic"}, "method among .* got 'magic'"),
        ({"lr": float("nan")}, "lr > 0, got nan"),
        ({"steps": 0}, "steps >= 1, got 0"),
    ],
)
def test_config_errors_name_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExtremeConfig(**fields)  # type: ignore[arg-type]


def test_a_sparsity_that_leaves_a_class_no_weight_is_refused() -> None:
    config = ExtremeConfig(method="srigl_entries", sparsity=0.99, hidden=16)
    with pytest.raises(ValueError, match=r"sparsity=0.99 gives no weight to each of 60 classes of 16 inputs"):
        build_model(SMALL, config)


def test_a_non_finite_loss_names_the_step() -> None:
    data = make_extreme_data(SMALL)
    data.train_latent[:] = float("nan")
    with pytest.raises(ValueError, match="non-finite loss nan at step 0"):
        train_extreme(data, ExtremeConfig(method="dense", hidden=8, steps=2))


# ------------------------------------------------------------------------------------ constant fan-in layer
def test_initial_output_layer_is_compact_with_constant_fan_in() -> None:
    model, optimizer, updates = build_model(
        SMALL, ExtremeConfig(method="srigl_entries", sparsity=0.75, hidden=16)
    )
    layer = model.output
    assert isinstance(layer, extreme.CompactLinear) and isinstance(updates, OutputFanInUpdates)
    assert layer.row_ptr.diff().tolist() == [4] * 60 and layer.nnz == 240
    assert [p for group in optimizer.param_groups for p in group["params"]][-2] is layer.values


def test_entry_update_by_hand_with_a_dropped_entry_grown_again() -> None:
    """Row 0 loses its smallest weight (0.1 at column 2) and regrows it: kept, value and all."""
    w = torch.tensor([[0.0, 3.0, 0.1, 0.0], [2.0, 0.0, 0.0, -5.0]])
    layer = extreme.CompactLinear(w, w != 0)
    dy, x = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 9.0, 1.0]])  # row 0: |g| = [0, 0, 9, 1]
    kept, grown = fan_in_entry_update(layer, (dy, x), n_drop=1)
    assert kept.tolist() == [0, 1, 2, 3] and grown.tolist() == []
    dy = torch.tensor([[1.0, 1.0]])  # row 1: |g| = [0, 0, 9, 1] too
    kept, grown = fan_in_entry_update(layer, (dy, x), n_drop=2)  # drops 0.1 (grown again) and 2.0
    assert kept.tolist() == [0, 1, 3] and grown.tolist() == [1 * 4 + 2]


def test_entry_update_refuses_rows_of_unequal_fan_in() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    with pytest.raises(ValueError, match="constant fan-in, got rows of 1 to 2 entries"):
        fan_in_entry_update(extreme.CompactLinear(w, w != 0), (torch.ones(1, 2), torch.ones(1, 2)), 1)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.output = layer


@pytest.mark.parametrize(("seed", "batch"), [(0, 6), (1, 6), (2, 20)])
def test_entry_updates_match_the_engines_dense_view_srigl(seed: int, batch: int) -> None:
    """Same layer, same batches: the engine's SRigL (dense views; the output layer is never ablated) and
    OutputFanInUpdates keep the same topology, values and Adam state through several updates (batch 6: the
    layer captures the gradient as factors; batch 20: as the product)."""
    config = SparsityConfig.preset(
        "srigl", sparsity=0.75, storage="compact", update_interval=3, seed=seed, tie_noise=0.0
    )
    layer = constant_fan_in_output(nn.Linear(16, 40), config, torch.Generator().manual_seed(seed))
    twin = copy.deepcopy(layer)
    opt_entries = torch.optim.Adam(layer.parameters(), lr=0.05)
    updates = OutputFanInUpdates(layer, opt_entries, config, total_steps=20, block_rows=7)
    holder = _Holder(twin)
    opt_engine = torch.optim.Adam(holder.parameters(), lr=0.05)
    engine = DynamicSparsity(holder, opt_engine, config, total_steps=20)
    assert extreme.dense_view_reason(engine).startswith("SRigL's neuron ablation")
    generator = torch.Generator().manual_seed(100 + seed)
    for _ in range(12):
        x, target = (
            torch.randn(batch, 16, generator=generator),
            torch.randint(40, (batch,), generator=generator),
        )
        for model, optimizer in ((layer, opt_entries), (twin, opt_engine)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
    assert len(updates.history) == len(engine.history) == 4  # steps 3, 6, 9, 12 (< 0.75 * 20)
    assert all(u["dropped"] > 0 for u in updates.history)
    assert layer.row_ptr.diff().tolist() == [4] * 40
    assert torch.equal(layer.row_ptr, twin.row_ptr) and torch.equal(layer.col_indices, twin.col_indices)
    assert torch.allclose(layer.values, twin.values, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(
            opt_entries.state[layer.values][key], opt_engine.state[twin.values][key], atol=1e-6
        )


def test_fan_in_stays_constant_through_training_with_updates() -> None:
    data = make_extreme_data(SMALL)
    config = ExtremeConfig(
        method="srigl_entries", sparsity=0.75, hidden=32, steps=80, lr=0.01, update_interval=10
    )
    result = train_extreme(data, config)
    assert result.topology_updates == 5  # steps 10 .. 50 (< 0.75 * 80)
    assert result.fan_in_min == result.fan_in_max == 8 and result.empty_classes == 0
    assert result.output_nnz == 60 * 8 and result.sparsity == pytest.approx(0.75)
    assert result.update_path.startswith("active entries")


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("method", ["srigl_entries", "dense", "rigl"])
def test_a_tiny_run_learns_far_above_chance(method: str) -> None:
    """60 classes: uniform guessing 1/60, always the most frequent class ~0.21 (Zipf(1))."""
    data = make_extreme_data(SMALL)
    config = ExtremeConfig(method=method, sparsity=0.75, hidden=32, steps=150, lr=0.01, update_interval=25)
    result = train_extreme(data, config)
    assert float(data.probabilities[0]) < 0.22
    assert result.top1 > 0.7 and result.top5 >= result.top1 and math.isfinite(result.final_loss)
    assert result.head_top1 > 0.7
    if method == "rigl":
        assert result.update_path == "active entries" and result.topology_updates > 0


# ------------------------------------------------------------------------------------------------ the script
@pytest.mark.slow  # 11 fresh processes: ~1 min on an idle core, 5 on the shared 2-core machine
def test_quick_script_run_writes_the_memory_and_accuracy_tables(tmp_path: Path) -> None:
    with script_module("bench_extreme") as bench:
        args = [
            "--quick",
            "--classes",
            "600",
            "--small-classes",
            "200",
            "--steps",
            "30",
            "--memory-steps",
            "6",
        ]
        assert bench.main([*args, "--n-train", "2000", "--n-test", "300", "--out", str(tmp_path)]) == 0
        parsed = bench.parse_args(["--quick"])
        assert parsed.seeds == 2 and parsed.hidden == 64 and parsed.memory_cap_mb == 4000.0
        with pytest.raises(ValueError, match="seeds >= 2"):
            bench.parse_args(["--seeds", "1"])
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["role"], r["method"], r["n_classes"]) for r in report["rows"]}
    assert rows == {
        ("memory", "dense", 600),
        ("memory", "srigl", 600),
        ("memory", "rigl", 600),
        ("accuracy", "srigl_entries", 600),
        ("accuracy", "dense", 200),
        ("accuracy", "srigl_entries", 200),
        ("accuracy", "rigl", 200),
    }
    for run in report["runs"]:
        assert run["peak_rss_process_mb"] >= run["rss_after_data_mb"] > 0
        if run["method"].startswith("srigl"):
            assert run["fan_in_min"] == run["fan_in_max"] == round(0.05 * 64)
    assert len(report["goals"]) == 4
    text = (tmp_path / "results.md").read_text()
    assert "## Memory (cap: 4,000 MB" in text and "| srigl_entries | 600 |" in text
    assert (tmp_path / "peaks.png").stat().st_size > 0
