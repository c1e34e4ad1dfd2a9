"""PEP: the hand chain rule, the search on a tiny split, the retrain's fixed mask, results, resume and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparseapps.recsys.data import BPRSampler, InteractionSplit
from sparseapps.recsys.dsl import DSLConfig, SparseEmbeddings
from sparseapps.recsys.models import ModelConfig, Recommender, build_model
from sparseapps.recsys.pep import (
    PEPConfig,
    SearchResult,
    ThresholdSearch,
    keep_largest_margins,
    search_masks,
    soft_threshold,
    threshold_gradients,
    threshold_shape,
)
from sparseapps.recsys.train import (
    CHECKPOINT,
    PEP_CHECKPOINT,
    TrainConfig,
    config_differences,
    make_optimizer,
    train,
)

from .test_train import run_cli, write_inter

# On the tiny split these settings make the search reach density 0.25 by itself in about seven epochs.
SEARCH = dict(lr=0.05, reg_weight=0.2, pep_threshold_init=-4.0)


def tiny_config(**changes: object) -> TrainConfig:
    values: dict[str, object] = dict(
        dataset="synthetic-ml-100k",
        method="pep",
        density=0.25,
        dim=8,
        epochs=16,
        batch_size=256,
        ks=(5, 10),
        selection_metric="recall@10",
        pep_search_fraction=1.0,
        **SEARCH,
    )
    values.update(changes)
    return TrainConfig(**values)  # type: ignore[arg-type]


def tiny_search(
    split: InteractionSplit, model_name: str = "mf", **changes: object
) -> tuple[Recommender, SearchResult]:
    config = tiny_config(model=model_name, layers=1, **changes)
    torch.manual_seed(config.seed)
    model = build_model(config.model_config(), split.n_users, split.n_items, split.train)
    sampler = BPRSampler(split, batch_size=config.batch_size, seed=config.seed)
    result = search_masks(
        model,
        make_optimizer(model, config.lr),
        sampler,
        config.pep_config(),
        lr=config.lr,
        reg_weight=config.reg_weight,
        planned_steps=config.epochs * len(sampler),
    )
    return model, result


@pytest.mark.parametrize("granularity", ["row", "dimension", "global"])
def test_hand_chain_rule_equals_autograd(granularity: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.3
    shape = threshold_shape(granularity, 6, 5)
    threshold = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 3).requires_grad_(True)
    grad = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    weight_leaf = weight.clone().requires_grad_(True)
    (soft_threshold(weight_leaf, threshold) * grad).sum().backward()
    grad_weight, grad_threshold = threshold_gradients(weight, threshold.detach(), grad)
    assert grad_threshold.shape == threshold.shape
    torch.testing.assert_close(grad_weight, weight_leaf.grad)
    torch.testing.assert_close(grad_threshold, threshold.grad)
    pruned = weight.abs() <= torch.sigmoid(threshold.detach())
    assert bool(pruned.any()) and bool((soft_threshold(weight, threshold.detach())[pruned] == 0).all())


def test_keep_largest_margins_fills_or_trims_to_the_budget_across_tables() -> None:
    weights = {"a": torch.tensor([[0.9, -0.05], [0.3, 0.0]]), "b": torch.tensor([[-0.6, 0.15]])}
    thresholds = {"a": torch.full((2, 1), -2.0), "b": torch.full((1, 1), 0.0)}  # g = 0.119 and 0.5
    # margins: a [[0.781, -0.069], [0.181, -0.119]], b [[0.1, -0.35]]; three entries survive the thresholds
    trimmed = keep_largest_margins(weights, thresholds, 2)
    assert trimmed["a"].tolist() == [[True, False], [True, False]] and trimmed["b"].tolist() == [
        [False, False]
    ]
    filled = keep_largest_margins(weights, thresholds, 4)
    assert filled["a"].tolist() == [[True, True], [True, False]] and filled["b"].tolist() == [[True, False]]
    with pytest.raises(ValueError, match="nnz must be in \\[0, 6\\], got 7"):
        keep_largest_margins(weights, thresholds, 7)


@pytest.mark.parametrize("model_name", ["mf", "lightgcn"])
def test_search_raises_thresholds_until_the_target_density(
    tiny_split: InteractionSplit, model_name: str
) -> None:
    model, result = tiny_search(tiny_split, model_name)
    history = result.summary["search_history"]
    assert result.done and result.summary["reached_target"] is True
    assert result.summary["pruned_by_magnitude"] == 0
    assert history[-1]["mean_threshold"] > history[0]["mean_threshold"] > torch.sigmoid(torch.tensor(-4.0))
    assert history[-1]["density"] <= 0.25 < history[0]["density"]
    (mask,) = result.masks.values()
    assert int(mask.sum()) == result.summary["target_nnz"] == round(0.25 * (40 + 60) * 8)
    torch.manual_seed(0)  # the search rewinds the tables to their values at step 0
    fresh = build_model(ModelConfig(model=model_name, dim=8, layers=1), 40, 60, tiny_split.train)
    torch.testing.assert_close(model.tables.stacked(), fresh.tables.stacked(), rtol=0, atol=0)


def test_a_budget_too_short_trims_by_magnitude_and_says_so(tiny_split: InteractionSplit) -> None:
    _, result = tiny_search(tiny_split, pep_threshold_init=-15.0, pep_search_fraction=0.1)
    summary = result.summary
    assert summary["reached_target"] is False and summary["search_steps"] == summary["max_search_steps"]
    assert summary["pruned_by_magnitude"] == summary["nnz_found"] - summary["target_nnz"] > 0
    assert int(next(iter(result.masks.values())).sum()) == summary["target_nnz"]


def test_retrain_keeps_the_found_mask_fixed_and_masked_entries_zero(tiny_split: InteractionSplit) -> None:
    model, result = tiny_search(tiny_split)
    initial = model.tables.stacked().detach().clone()
    optimizer = make_optimizer(model, 0.05)
    sparse = SparseEmbeddings(
        model, optimizer, DSLConfig(density=0.25, method="static"), 100, initial_masks=result.masks
    )
    (fqn, mask), (weight, engine_mask) = (
        next(iter(result.masks.items())),
        next(sparse.engine.masked_parameters()),
    )
    assert torch.equal(engine_mask, mask) and fqn in sparse.engine.masks
    torch.testing.assert_close(weight[mask], initial[mask], rtol=0, atol=0)  # rewound, then masked
    sampler = BPRSampler(tiny_split, batch_size=256, seed=0)
    for users, positives, negatives in list(sampler.iter_epoch(0)) * 3:
        optimizer.zero_grad(set_to_none=True)
        model.loss(users, positives, negatives, reg_weight=0.02).backward()
        optimizer.step()
        assert bool((weight[~mask] == 0).all()) and torch.equal(engine_mask, mask)
    assert sparse.nnz == result.summary["target_nnz"]
    assert not torch.equal(weight[mask], initial[mask])
    with pytest.raises(ValueError, match="initial_masks need method 'static' or 'dsl'"):
        SparseEmbeddings(model, optimizer, DSLConfig(method="prune"), 100, initial_masks=result.masks)


def test_train_writes_results_with_the_exact_budget(tiny_split: InteractionSplit, tmp_path: Path) -> None:
    results = train(tiny_config(), tmp_path / "run", progress=False, split=tiny_split)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["config"]["method"] == "pep"
    assert written["parameters"] == results["parameters"] == round(0.25 * (40 + 60) * 8)
    assert written["pep"]["reached_target"] is True and written["pep"]["granularity"] == "row"
    assert 0 <= written["pep"]["valid_at_mask"]["recall@10"] <= 1
    assert written["pep"]["search_epochs"] == len(written["pep"]["search_history"]) > 1
    assert written["selection"]["settle_epoch"] == 0 and written["serving"]["max_abs_difference"] < 1e-5
    for name in (CHECKPOINT, PEP_CHECKPOINT, "compact.pt"):
        assert (tmp_path / "run" / name).stat().st_size > 0


@pytest.mark.parametrize("cut", [2, 9])  # inside the search (its 6-epoch budget), inside the retrain
def test_resume_inside_either_phase_continues_bit_for_bit(
    tiny_split: InteractionSplit, tmp_path: Path, cut: int
) -> None:
    config = tiny_config(epochs=6, model="lightgcn", layers=1)
    straight = train(config, None, progress=False, split=tiny_split)
    partial = train(config, tmp_path, progress=False, split=tiny_split, stop_after=cut)
    assert partial["finished"] is False
    assert (tmp_path / CHECKPOINT).exists() is (cut > straight["pep"]["search_epochs"])
    resumed = train(config, tmp_path, resume=True, progress=False, split=tiny_split)
    assert resumed["test"] == straight["test"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["pep"]["search_history"] == straight["pep"]["search_history"]
    with pytest.raises(ValueError, match=r"another configuration.*'pep_threshold_init': \(-4\.0, -5\.0\)"):
        train(
            config.replace(pep_threshold_init=-5.0), tmp_path, resume=True, progress=False, split=tiny_split
        )


def test_cli_trains_pep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_inter(tmp_path / "tiny.inter")
    argv = [
        "recsys", "train", "--dataset", str(data), "--method", "pep", "--density", "0.25", "--dim", "8",
        "--epochs", "3", "--batch-size", "128", "--ks", "5", "10", "--selection-metric", "recall@10",
        "--pep-granularity", "dimension", "--out", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    assert run_cli(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["pep"]["granularity"] == "dimension" and results["parameters"] == round(0.25 * 70 * 8)
    assert "mf pep density 0.25: test recall@10" in capsys.readouterr().out
    assert run_cli([*argv, "--pep-granularity", "field"]) == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PEPConfig(density=0.0), "density must be a finite number in (0, 1], got 0.0"),
        (lambda: PEPConfig(granularity="field"), "granularity must be one of 'row', 'dimension', 'global'"),
        (lambda: PEPConfig(threshold_init=float("nan")), "threshold_init must be a finite number, got nan"),
        (
            lambda: PEPConfig(search_fraction=1.5),
            "search_fraction must be a finite number in (0, 1], got 1.5",
        ),
        (
            lambda: PEPConfig(threshold_weight_decay=-1.0),
            "threshold_weight_decay must be a finite number >= 0, got -1.0",
        ),
        (lambda: threshold_shape("feature_dim", 3, 4), "granularity must be one of"),
        (
            lambda: TrainConfig(method="pep", density=1.5),
            "density must be a finite number in (0, 1], got 1.5",
        ),
        (lambda: TrainConfig(method="pep", pep_granularity="field"), "pep_granularity must be one of"),
        (lambda: TrainConfig(method="pep", pep_search_fraction=0.0), "pep_search_fraction must be a finite"),
    ],
)
def test_bad_input_is_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make()  # type: ignore[operator]


def test_search_refuses_a_foreign_state_and_bad_arguments(tiny_split: InteractionSplit) -> None:
    model = build_model(ModelConfig(dim=8), 40, 60)
    optimizer = make_optimizer(model, 0.01)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        ThresholdSearch(model, optimizer, PEPConfig(), lr=0.01, max_steps=0)
    search = ThresholdSearch(model, optimizer, PEPConfig(density=0.5), lr=0.01, max_steps=10)
    state = search.state_dict()
    search.detach()
    other = ThresholdSearch(model, optimizer, PEPConfig(density=0.25), lr=0.01, max_steps=10)
    with pytest.raises(ValueError, match="target_nnz=400, this search 200"):
        other.load_state_dict(state)


def test_configs_saved_before_the_pep_fields_still_resume() -> None:
    config = TrainConfig(method="pep")
    saved = {k: v for k, v in config.to_dict().items() if not k.startswith("pep_")}
    assert config_differences(saved, config) == {}  # a missing field counts as its default
    assert config_differences(saved, config.replace(pep_granularity="global")) == {
        "pep_granularity": ("row", "global")
    }


def test_pep_settings_do_not_block_the_resume_of_other_methods() -> None:
    saved = TrainConfig(method="dsl", pep_threshold_init=-3.0).to_dict()
    assert config_differences(saved, TrainConfig(method="dsl")) == {}
    assert config_differences(saved, TrainConfig(method="pep")) == {
        "method": ("dsl", "pep"),
        "pep_threshold_init": (-3.0, -6.0),
    }
    assert config_differences(saved, TrainConfig(method="dsl", density=0.5)) == {"density": (0.2, 0.5)}
