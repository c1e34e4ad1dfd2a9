"""IsolationConfig contains the core's SparsityConfig; ContinualRun checks its settings; one wording for errors."""

from __future__ import annotations

import pytest

from sparseapps.continual.config import ContinualRun, IsolationConfig, continual_sparsity
from sparseapps.core import SparsityConfig


def test_a_float_is_the_continual_default_at_that_sparsity():
    config = IsolationConfig(sparsity=0.8)
    assert config.sparsity == continual_sparsity(0.8) == SparsityConfig(sparsity=0.8, grow="random")
    assert IsolationConfig().sparsity == continual_sparsity(0.9)


def test_config_round_trips_through_a_plain_dict():
    config = IsolationConfig(
        sparsity=SparsityConfig.preset("set", sparsity=0.9, update_interval=7),
        capacity="free",
        forward_transfer=True,
    )
    values = config.to_dict()
    assert values["sparsity"]["drop"] == "signed_magnitude" and values["capacity"] == "free"
    assert IsolationConfig.from_dict(values) == config
    assert config.replace(capacity="redistribute").sparsity is config.sparsity


def test_engine_config_leaves_the_first_layer_to_the_capacity_plan():
    config = IsolationConfig(sparsity=SparsityConfig(sparsity=0.8, grow="momentum", dense_first_layer=True))
    engine = config.engine_config()
    assert (
        not engine.dense_first_layer and engine.seed == 0
    )  # the isolation's generator replaces the engine's
    assert (engine.grow, engine.sparsity) == ("momentum", 0.8)
    assert config.replace(sparsity=config.sparsity.replace(seed=5)).engine_config().seed == 5


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, r"sparsity must be a finite number in \[0, 1\), got 1.0"),
        ({"sparsity": "0.9"}, TypeError, r"sparsity must be a SparsityConfig or a float, got '0.9'"),
        ({"sparsity": 0.0}, ValueError, r"sparsity.sparsity must be > 0 with capacity='equal'"),
        ({"capacity": "grow"}, ValueError, r"capacity must be one of .* got 'grow'"),
        ({"forward_transfer": 1}, TypeError, r"forward_transfer must be True or False, got 1"),
        ({"init_scale": "xavier"}, ValueError, r"init_scale must be one of 'sparse', 'dense', got 'xavier'"),
        (
            {"sparsity": SparsityConfig.preset("gmp", sparsity=0.9)},
            ValueError,
            r"sparsity.method must be one of 'dst', 'static', got 'gmp'",
        ),
        (
            {"sparsity": SparsityConfig.preset("snfs", sparsity=0.9)},
            ValueError,
            r"sparsity.redistribution must be 'none' in continual isolation .* got 'momentum'",
        ),
        (
            {"sparsity": SparsityConfig.preset("srigl", sparsity=0.9)},
            ValueError,
            r"sparsity.constant_fan_in must be False .* got True",
        ),
        (
            {"sparsity": SparsityConfig.preset("rigl", sparsity=0.5, n_m=(2, 4))},
            ValueError,
            r"sparsity.n_m must be None in continual isolation .* got \(2, 4\)",
        ),
        (
            {"sparsity": SparsityConfig(include=("backbone.*",))},
            ValueError,
            r"sparsity.include must be \(\) in continual isolation",
        ),
        (
            {"sparsity": SparsityConfig(grow="cosine")},
            ValueError,
            r"sparsity.grow must be a criterion that does not read layer activations .* got 'cosine'",
        ),
    ],
)
def test_config_rejects_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        IsolationConfig(**changes)


def test_core_names_and_validation_apply_to_the_sparsity_config():
    with pytest.raises(ValueError, match=r"grow must be one of .* got 'growth'"):
        SparsityConfig(grow="growth")
    assert IsolationConfig(sparsity=SparsityConfig(method="static", grow="none")).sparsity.grow == "none"
    assert IsolationConfig(sparsity=0.0, capacity="free").sparsity.density == 1.0


def test_run_defaults_keep_the_command_line_update_interval():
    isolation = ContinualRun().isolation
    assert (isolation.sparsity.update_interval, isolation.sparsity.grow) == (20, "random")
    settings = ContinualRun().settings()
    assert settings["isolation"]["sparsity"]["module_types"] == ["linear", "conv", "embedding"]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"benchmark": "split-digit"}, ValueError, r"benchmark must be one of .* got 'split-digit'"),
        ({"model": "rnn"}, ValueError, r"model must be one of 'mlp', 'cnn', got 'rnn'"),
        ({"hidden": ()}, ValueError, r"hidden must be a non-empty tuple of positive integers, got \(\)"),
        ({"lr": 0.0}, ValueError, r"lr must be a finite number > 0, got 0.0"),
        ({"device": "gpu:x"}, ValueError, r"device must be a torch device .* got 'gpu:x'"),
        ({"isolation": {"sparsity": 0.9}}, TypeError, r"isolation must be an IsolationConfig, got dict"),
        ({"task_agnostic": "yes"}, TypeError, r"task_agnostic must be True or False, got 'yes'"),
        ({"epochs": 0}, ValueError, r"epochs must be an integer >= 1, got 0"),
    ],
)
def test_run_settings_are_validated(changes, error, match):
    with pytest.raises(error, match=match):
        ContinualRun(**changes)
