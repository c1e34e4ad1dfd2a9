"""Kernel parameters chosen by measurement, cached per CPU model (``sparseapps.core.kernels.tuning``)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
from sparseapps.core.kernels import library, tuning

pytestmark = pytest.mark.skipif(not library.ensure_loaded().compiled, reason="compiled kernels not loaded")


def _current() -> tuple[int, int]:
    info = library.kernel_status()
    return int(info["tile_bytes"]), int(info["gather_max_batch"])


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setattr(tuning, "cache_file", lambda: path)
    before = _current()
    yield path
    torch.ops.sparseapps._configure("", before[1], before[0])


def test_tune_picks_a_candidate_and_leaves_the_library_configured_with_it(cache: Path) -> None:
    threads = torch.get_num_threads()
    result = tuning.tune(rounds=1)
    assert torch.get_num_threads() == threads
    assert result.tile_bytes in tuning.TILE_BYTES and result.gather_max_batch in tuning.GATHER_MAX_BATCH
    assert _current() == (result.tile_bytes, result.gather_max_batch)
    assert result.cpu == tuning.cpu_model() and result.library.startswith(result.cpu)
    candidates = len(tuning.TILE_BYTES) * len(tuning.GATHER_MAX_BATCH)
    grow = result.measured.pop("grow_select 2048x2048 b64")
    assert all(len(per) == candidates for per in result.measured.values())
    assert (
        len(grow) == len(tuning.GROW_BLOCK_ENTRIES) and result.grow_block_entries in tuning.GROW_BLOCK_ENTRIES
    )
    assert f"block={result.grow_block_entries >> 10}K" in grow
    assert 0.0 < result.cpu_share <= 1.0


def test_an_entry_measured_under_load_is_applied_and_says_so(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not replaced behind the user's back: other values change the kernels' summation order (resume bitwise)."""
    isa = library.kernel_status()["isa"]
    loaded = {"tile_bytes": 256 << 10, "gather_max_batch": 1, "cpu_share": 0.6}
    cache.write_text(json.dumps({tuning._key(isa): loaded}))
    monkeypatch.setattr(tuning, "tune", lambda **_: pytest.fail("measured although an entry was cached"))
    status = tuning.apply_tuning()
    assert status["source"] == "cache" and status["measured_under_load"] and _current() == (256 << 10, 1)
    loaded["cpu_share"] = 0.97
    cache.write_text(json.dumps({tuning._key(isa): loaded}))
    assert not tuning.apply_tuning()["measured_under_load"]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_first_use_inside_no_grad_or_inference_measures(cache: Path, mode: str) -> None:
    """The library may first load inside an evaluation; the workloads need autograd all the same."""
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        result = tuning.tune(rounds=1)
    assert result.tile_bytes in tuning.TILE_BYTES


def test_a_failed_measurement_keeps_the_defaults_and_does_not_raise(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _current()

    def broken(**_: object) -> tuning.Tuning:
        torch.ops.sparseapps._configure("", 4, 128 << 10)  # left half-way through the candidates
        raise RuntimeError("boom")

    monkeypatch.setattr(tuning, "tune", broken)
    status = tuning.apply_tuning()
    assert status["source"] == "defaults" and status["reason"] == "tuning failed: boom"
    assert _current() == before and not cache.exists()


def test_a_cached_entry_is_applied_without_measuring(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isa = library.kernel_status()["isa"]
    cache.write_text(json.dumps({tuning._key(isa): {"tile_bytes": 256 << 10, "gather_max_batch": 1}}))
    monkeypatch.setattr(tuning, "tune", lambda **_: pytest.fail("measured although an entry was cached"))
    assert tuning.apply_tuning()["source"] == "cache"
    assert _current() == (256 << 10, 1)


def test_another_cpu_model_or_a_damaged_cache_is_measured_and_saved(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.write_text(json.dumps({"Some Other CPU | avx2 | 0": {"tile_bytes": 1, "gather_max_batch": 1}}))
    monkeypatch.setattr(tuning, "tune", lambda **_: _fake_result())
    assert tuning.apply_tuning()["source"] == "measured"
    saved = json.loads(cache.read_text())
    assert "Some Other CPU | avx2 | 0" in saved and len(saved) == 2  # the other machine's entry is kept
    cache.write_text("{not json")
    assert tuning.apply_tuning()["source"] == "measured"
    assert json.loads(cache.read_text())[_fake_result().library]["tile_bytes"] == 512 << 10


def test_tuning_off_keeps_the_defaults(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.TUNE_VARIABLE, "off")
    monkeypatch.setattr(tuning, "tune", lambda **_: pytest.fail("measured although tuning is off"))
    status = tuning.apply_tuning()
    assert status["source"] == "defaults" and not cache.exists()


def _fake_result() -> tuning.Tuning:
    isa = library.kernel_status()["isa"]
    return tuning.Tuning(
        cpu=tuning.cpu_model(),
        isa=isa,
        library=tuning._key(isa),
        tile_bytes=512 << 10,
        gather_max_batch=2,
        measured={},
        seconds=0.0,
    )


def test_the_command_prints_one_line_that_says_when_it_was_measured_under_load(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for share, said in ((0.63, True), (0.97, False)):
        monkeypatch.setattr(tuning, "tune", lambda share=share, **_: replace(_fake_result(), cpu_share=share))
        assert tuning.main([]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and "tile_bytes=512K gather_max_batch=2" in lines[0]
        assert ("measured under load: this thread got 63% of a core" in lines[0]) == said


def test_a_checkpoint_records_the_kernel_parameters_and_a_resume_under_others_warns() -> None:
    """The knobs set the compact kernels' summation order: a resume under other values is not bitwise, and says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = SparsityConfig.preset("rigl", sparsity=0.8, storage="compact", update_interval=2, seed=0)
    model = to_compact(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = DynamicSparsity(model, optimizer, config, total_steps=10)
    model(torch.randn(8, 32)).sum().backward()
    optimizer.step()
    state = engine.state_dict()
    assert state["kernels"] == library.loaded_parameters() and state["kernels"]["isa"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.load_state_dict(state)  # the same parameters: silent
    other = {**state, "kernels": {**state["kernels"], "tile_bytes": 1}}
    with pytest.warns(UserWarning, match=r"kernel parameters .*'tile_bytes': 1.* not bitwise identical"):
        engine.load_state_dict(other)
    with warnings.catch_warnings():  # checkpoints of earlier versions hold none: nothing to compare
        warnings.simplefilter("error")
        engine.load_state_dict({key: value for key, value in state.items() if key != "kernels"})
