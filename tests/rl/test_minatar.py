"""MinAtar suite (issue 19): environments, the CNN extractor, tiny DQN runs dense and sparse, the script's quick run
and the summary's registered comparisons on hand-made cells."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from sparseapps.rl.callback import DynamicSparsityCallback
from sparseapps.rl.cells import cells_on_disk
from sparseapps.rl.minatar import (
    GAMES,
    MinAtarCNN,
    cell_name,
    estimate_core_hours,
    make_minatar_env,
    minatar_dqn,
    run_cell,
    sparsity_callback,
)
from tests.scripts import assert_runs_resumes_and_summarizes, script_module

pytest.importorskip("minatar")


# ---------------------------------------------------------------------------------------------- environments
def test_every_game_is_made_with_channels_last_bool_observations() -> None:
    channels = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
    for name in GAMES:
        env = make_minatar_env(name, seed=0)
        observation, _ = env.reset()
        assert observation.shape == (10, 10, channels[name]) and observation.dtype == np.bool_
        assert env.spec is not None and env.spec.id == GAMES[name]
        env.close()


def test_seeded_env_repeats_its_episode() -> None:
    def rollout() -> list[Any]:
        env = make_minatar_env("space_invaders", seed=3)
        env.reset(seed=3)
        frames = [env.step(i % env.action_space.n)[0].copy() for i in range(30)]
        env.close()
        return frames

    assert all(np.array_equal(a, b) for a, b in zip(rollout(), rollout(), strict=True))


def test_bad_game_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'pong'.*asterix, breakout, freeway, seaquest, space_invaders"):
        make_minatar_env("pong")
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_minatar_env("breakout", max_episode_steps=0)


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sparseapps.rl.minatar as module

    monkeypatch.setattr(module, "_registered", False)
    monkeypatch.setattr(gym, "registry", {})  # as if nothing were registered yet
    monkeypatch.setitem(sys.modules, "minatar", None)  # makes "import minatar.gym" fail
    monkeypatch.setitem(sys.modules, "minatar.gym", None)
    with pytest.raises(ImportError, match="'minatar' is needed"):
        make_minatar_env("breakout")


def test_episodes_are_cut_at_max_episode_steps() -> None:
    env = make_minatar_env("freeway", seed=0, max_episode_steps=5)
    env.reset()
    truncated = [env.step(0)[3] for _ in range(5)]
    assert truncated == [False] * 4 + [True]


# ---------------------------------------------------------------------------------------------- extractor
def test_extractor_permutes_channels_last_to_channels_first() -> None:
    space = gym.spaces.Box(0.0, 1.0, shape=(10, 10, 4), dtype=bool)
    torch.manual_seed(0)
    extractor = MinAtarCNN(space)
    assert extractor.features_dim == 16 * 8 * 8 and extractor.conv.in_channels == 4
    with torch.no_grad():
        extractor.conv.weight.zero_()
        extractor.conv.bias.zero_()
        extractor.conv.weight[5, 2, 1, 1] = 1.0  # filter 5 copies channel 2 at the kernel's centre
    observation = torch.zeros(1, 10, 10, 4)
    observation[0, 4, 7, 2] = 1.0  # row 4, column 7, channel 2
    features = extractor(observation).reshape(16, 8, 8)
    # the 3x3 valid convolution centred on (4, 7) is output position (3, 6)
    assert features.sum() == 1.0 and features[5, 3, 6] == 1.0


def test_extractor_refuses_a_flat_space() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, C\].*\(8,\)"):
        MinAtarCNN(gym.spaces.Box(0.0, 1.0, shape=(8,)))


def test_dqn_network_shapes() -> None:
    model = minatar_dqn(make_minatar_env("seaquest", seed=0), seed=0, buffer_size=100)
    weights = {n: tuple(p.shape) for n, p in model.q_net.named_parameters() if n.endswith("weight")}
    assert weights == {
        "features_extractor.conv.weight": (16, 10, 3, 3),
        "q_net.0.weight": (128, 1024),
        "q_net.2.weight": (model.action_space.n, 128),
    }
    observation = torch.as_tensor(model.env.reset()).float()
    assert model.q_net(observation).shape == (1, model.action_space.n)


# ---------------------------------------------------------------------------------------------- methods
def test_sparse_methods_share_the_graesser_schedule_and_differ_in_growth() -> None:
    assert sparsity_callback("dense", 0.9) is None
    configs = {m: sparsity_callback(m, 0.95).config for m in ("static", "set", "rigl")}  # type: ignore[union-attr]
    assert {m: (c.method, c.grow) for m, c in configs.items()} == {
        "static": ("static", "none"),
        "set": ("dst", "random"),
        "rigl": ("dst", "gradient"),
    }
    assert all(c.sparsity == 0.95 and c.distribution == "erk" for c in configs.values())
    for config in (configs["set"], configs["rigl"]):
        assert (config.drop, config.drop_fraction, config.drop_schedule) == ("magnitude", 0.5, "cosine")
        assert (config.update_interval, config.end_fraction) == (1000, 0.75)
    with pytest.raises(ValueError, match="'pruning'"):
        sparsity_callback("pruning", 0.9)
    with pytest.raises(ValueError, match="sparsity"):
        sparsity_callback("rigl", 1.0)
    assert cell_name("breakout", "rigl", 0.95) == "breakout/rigl-95"
    assert cell_name("breakout", "dense", 0.0) == "breakout/dense"


def test_core_hours_arithmetic() -> None:
    # 200 runs x 100k steps / 1000 steps per CPU second = 20,000 s
    assert math.isclose(estimate_core_hours(200, 100_000, 1000.0), 20_000 / 3600)
    with pytest.raises(ValueError, match="steps_per_second"):
        estimate_core_hours(1, 1, 0.0)


TINY: dict[str, Any] = {"learning_starts": 50, "buffer_size": 400}


def test_tiny_dense_run() -> None:
    threads = torch.get_num_threads()
    result = run_cell("breakout", "dense", 0.0, 0, 300, threads=threads + 1, **TINY)
    assert result["timesteps"] == 300 and result["sparsity"] == 0.0
    assert result["threads"] == threads + 1 and torch.get_num_threads() == threads  # restored after the cell
    assert result["parameters"] == {"weights": 16 * 4 * 9 + 1024 * 128 + 128 * 3,
                                    "nonzero_weights": 16 * 4 * 9 + 1024 * 128 + 128 * 3,
                                    "biases": 16 + 128 + 3}  # fmt: skip
    assert [step for step, _ in result["curve"]] == list(range(30, 301, 30))
    assert len(result["final_returns"]) == 20 and "density" not in result
    json.dumps(result)


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_tiny_sparse_run_keeps_masks_at_the_configured_density(method: str) -> None:
    result = run_cell("breakout", method, 0.95, 1, 300, **TINY)
    assert math.isclose(result["density"]["q_net"], 0.05, abs_tol=1e-3)
    rows = result["sparsity_report"]["q_net"]["tensors"]
    fqns = {row["fqn"] for row in rows}
    assert fqns == {"features_extractor.conv.weight", "q_net.0.weight", "q_net.2.weight"}  # the head too
    nnz = sum(row["nnz"] for row in rows)
    assert abs(nnz - 0.05 * result["parameters"]["weights"]) <= 3  # ERK rounds per layer
    assert result["parameters"]["nonzero_weights"] <= nnz  # masked weights are exactly zero
    assert result["topology_updates"]["q_net"] == 0  # 250 gradient steps: the first update is at 1000
    assert 0.0 < result["training_flops"]["ratio"] < 0.2
    json.dumps(result)


def test_rigl_moves_the_conv_and_hidden_masks_and_the_target_follows() -> None:
    """The suite's RigL on a shorter interval (every 30 gradient steps) so that updates happen in 250 env steps."""
    callback = sparsity_callback("rigl", 0.9)
    assert callback is not None
    callback = DynamicSparsityCallback(callback.config.replace(update_interval=30), dense_output_layers=False)
    env = make_minatar_env("breakout", seed=2)
    model = minatar_dqn(env, seed=2, learning_starts=50, buffer_size=250, train_freq=1)
    model.learn(250, callback=callback)
    engine = callback.engines["q_net"]
    assert len(engine.history) >= 3 and math.isclose(engine.density, 0.1, abs_tol=1e-3)
    moved = {fqn for update in engine.history for fqn, t in update["tensors"].items() if t["grown"] > 0}
    # ERK at 90% leaves Breakout's 3 x 128 head dense (its density would exceed 1): nothing to move there
    assert moved == {"features_extractor.conv.weight", "q_net.0.weight"}
    assert {t.fqn: t.density for t in engine.report().rows}["q_net.2.weight"] == 1.0
    online = dict(model.q_net.named_modules())
    target = dict(model.q_net_target.named_modules())
    for fqn in ("features_extractor.conv", "q_net.0", "q_net.2"):
        mask = online[fqn].weight_mask if hasattr(online[fqn], "weight_mask") else None
        assert mask is not None, fqn
        assert torch.equal(mask, target[fqn].weight_mask), fqn
        assert torch.all(online[fqn].weight[mask == 0] == 0), fqn
        assert torch.all(target[fqn].weight[mask == 0] == 0), fqn


# ---------------------------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench_minatar") as module:
        yield module


def test_quick_script_runs_resumes_and_summarizes(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--games", "breakout", "--methods", "static", "rigl"]
    argv += ["--sparsities", "0.9", "--budget", "200"]
    files = [f"breakout/{m}-90/seed{s}.json" for m in ("rigl", "static") for s in (0, 1)]
    comparison = "breakout: breakout/rigl-90 vs breakout/static-90 (final_return)"
    assert_runs_resumes_and_summarizes(bench, argv, tmp_path, files, comparison, monkeypatch)
    kept = tmp_path / "kept"
    assert bench.main(["--out", str(tmp_path), "--export", str(kept)]) == {"exported": 4}
    copies = cells_on_disk(kept)
    assert len(copies) == 4 and not any("episodes" in cell for cell in copies)
    originals = cells_on_disk(tmp_path)
    assert [{k: v for k, v in c.items() if k != "episodes"} for c in originals] == copies
    # a suite pointed at the copies reads them back (run_cell still refuses to train) and summarizes them
    summary = bench.main([*argv[:2], str(kept), *argv[3:]])
    assert summary["n_cells"] == 4
    assert {row["comparison"]: row["seeds"] for row in summary["comparisons"]}[comparison] == [0, 1]


def test_cell_selection(bench: ModuleType) -> None:
    args = bench.parse_args(["--cells", "breakout/rigl-9*/300", "space_invaders/dense/30[01]"])
    assert bench.planned_cells(args) == [
        ("breakout", "rigl", 0.9, 300),
        ("breakout", "rigl", 0.95, 300),
        ("breakout", "rigl", 0.99, 300),
        ("space_invaders", "dense", 0.0, 300),
        ("space_invaders", "dense", 0.0, 301),
    ]
    with pytest.raises(ValueError, match="no cell matches"):
        bench.planned_cells(bench.parse_args(["--cells", "pong/*/*"]))
    with pytest.raises(ValueError, match="games"):
        bench.parse_args(["--games", "pong"])


def _cell(game: str, method: str, sparsity: float, seed: int, final_return: float) -> dict[str, Any]:
    return {
        "game": game,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "cell": cell_name(game, method, sparsity),
        "final_return": final_return,
        "parameters": {"nonzero_weights": 100},
        "train_seconds": 1.0,
    }


def test_summary_on_hand_made_cells(bench: ModuleType) -> None:
    # rigl - static at 90%: differences 1, 2, 3 -> mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.464, df 2
    cells = [_cell("breakout", "static", 0.9, s, r) for s, r in zip((0, 1, 2), (1.0, 2.0, 3.0), strict=True)]
    cells += [_cell("breakout", "rigl", 0.9, s, r) for s, r in zip((0, 1, 2), (2.0, 4.0, 6.0), strict=True)]
    cells += [_cell("breakout", "set", 0.9, s, r) for s, r in zip((0, 1, 2), (1.0, 2.0, 3.0), strict=True)]
    cells += [_cell("breakout", "dense", 0.0, s, r) for s, r in zip((0, 1), (2.0, 4.0), strict=True)]
    summary = bench.summarize(cells)
    static = summary["cells"]["breakout/static-90"]
    assert static["mean_final_return"] == 2.0 and math.isclose(
        static["ci95"], 4.302653 / math.sqrt(3), rel_tol=1e-5
    )
    rows = {(r["method"], r["baseline"]): r for r in summary["comparisons"]}
    rigl_static = rows[("breakout/rigl-90", "breakout/static-90")]
    assert rigl_static["differences"] == [1.0, 2.0, 3.0] and rigl_static["mean"] == 2.0
    assert math.isclose(rigl_static["p"], 0.074180, rel_tol=1e-4)  # 2 * t.sf(3.4641, 2)
    set_static = rows[("breakout/set-90", "breakout/static-90")]
    assert set_static["differences"] == [0.0, 0.0, 0.0] and set_static["p"] == 1.0
    rigl_dense = rows[("breakout/rigl-90", "breakout/dense")]
    assert rigl_dense["seeds"] == [0, 1] and rigl_dense["differences"] == [0.0, 0.0]  # paired on common seeds
    # Holm over the three tested: p (0.0742, 1, 1) -> (3 x 0.0742, 1, 1)
    assert math.isclose(rigl_static["p_holm"], 3 * rigl_static["p"], rel_tol=1e-9)
    assert rigl_static["verdict"] == "no difference shown"
    assert len(summary["comparisons"]) == 3  # one game, one sparsity
