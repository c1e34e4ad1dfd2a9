"""Condensed kernels with the rest of the system: the DST engine, the build and load paths, the GPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sparseapps.core.kernels import CondenseConfig, Planner, condense, kernel_status, library
from sparseapps.core.kernels.formats import mask_stats
from sparseapps.core.kernels.planner import Candidate

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("preset", ["srigl", "rigl"])
def test_trained_mlp_gives_same_predictions_after_condense(preset: str) -> None:
    from sparseapps.core import DynamicSparsity, SparsityConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = SparsityConfig.preset(preset, sparsity=0.8).replace(update_interval=5)
    sparsity = DynamicSparsity(model, optimizer, config, total_steps=30)
    inputs = torch.randn(256, 20)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    for step in range(30):
        batch = slice(step * 16 % 256, step * 16 % 256 + 16)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
        optimizer.step()
    masked = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_mask")]
    assert masked, "the engine should leave weight_mask buffers on the Linear layers"
    if preset == "srigl":
        assert all(mask_stats(m.weight_mask).constant_fan_in for m in masked)
    model.eval()
    fast = condense(model, CondenseConfig(planner="cost_model"))
    sparsity.remove()
    for batch_size in (1, 5, 64):
        x = inputs[:batch_size]
        with torch.no_grad():
            want = model(x)
        got = fast(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_reference_path_when_kernels_are_disabled() -> None:
    result = run_python(
        """
        import torch
        from torch import nn
        from sparseapps.core.kernels import CondenseConfig, condense, kernel_status
        status = kernel_status()
        assert status["compiled"] is False and status["state"] == "disabled", status
        layer = nn.Linear(40, 30)
        layer.register_buffer("weight_mask", torch.rand(30, 40) < 0.2)
        fast = condense(nn.Sequential(layer), CondenseConfig(planner="cost_model"))
        x = torch.randn(4, 40)
        want = nn.functional.linear(x, layer.weight * layer.weight_mask, layer.bias)
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
        print("reference ok")
        """,
        SPARSEAPPS_KERNELS="reference",
    )
    assert result.returncode == 0, result.stderr
    assert "reference ok" in result.stdout


def test_stale_or_missing_library_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(library.DISABLE_VARIABLE, raising=False)
    monkeypatch.setattr(library, "LIBRARY_FILE", tmp_path / "missing.so")
    state = library._try_compiled()
    assert (state.compiled, state.state) == (False, "not built") and library.BUILD_COMMAND in state.reason
    fake = tmp_path / "lib.so"
    fake.write_bytes(b"not a library")
    info = tmp_path / "build_info.json"
    info.write_text(json.dumps({"torch": "0.0", "sources": library.source_digest()}))
    monkeypatch.setattr(library, "LIBRARY_FILE", fake)
    monkeypatch.setattr(library, "INFO_FILE", info)
    state = library._try_compiled()
    assert state.state == "stale" and "torch" in state.reason
    info.write_text(json.dumps(library.fingerprint()))
    state = library._try_compiled()
    assert state.state == "failed" and "loading" in state.reason


def test_build_failure_exits_nonzero_with_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from torch.utils import cpp_extension

    from sparseapps.core.kernels import build

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert build.main([]) == 1
    err = capsys.readouterr().err
    assert "build failed" in err and "ninja" in err and "reference" in err


def test_kernel_status_names_the_build_command() -> None:
    status = kernel_status()
    assert status["build_command"] == "python -m sparseapps.core.kernels.build"
    json.dumps(status)  # reportable as is by `sparseapps info`


def test_planner_cache_round_trip(tmp_path: Path) -> None:
    cache = tmp_path / "plans.json"
    layer = nn.Linear(8, 4)
    mask = torch.ones(4, 8, dtype=torch.bool)
    stats = mask_stats(mask)
    candidates = [
        Candidate(form="dense", path="dense", module=layer),
        Candidate(form="other", path="dense", module=layer),
    ]
    planner = Planner(method="measure", repeats=2, cache_path=str(cache))
    with torch.no_grad():
        choice = planner.choose(candidates, stats, (1, 3), lambda b: torch.randn(b, 8))
    assert set(choice) == {1, 3}
    saved = json.loads(cache.read_text())
    assert len(saved) == 4 and all(v > 0 for v in saved.values())
    again = Planner(method="measure", cache_path=str(cache))
    calls = []
    with torch.no_grad():
        again.choose(candidates, stats, (1, 3), lambda b: calls.append(b) or torch.randn(b, 8))
    assert calls == []  # answered from the cache, nothing timed
    with pytest.raises(ValueError, match="method"):
        Planner(method="guess")


def test_triton_kernel_under_interpreter() -> None:
    pytest.importorskip("triton")
    result = run_python(
        """
        import torch
        from sparseapps.core.kernels import gpu, reference
        torch.manual_seed(0)
        for n, width, rows, k in ((5, 40, 7, 6), (33, 70, 50, 1), (1, 300, 17, 40)):
            x = torch.randn(n, width)
            values = torch.randn(rows, k)
            indices = torch.stack([torch.randperm(width)[:k] for _ in range(rows)]).to(torch.int16)
            got = gpu.condensed_rows_triton(x, values, indices)
            want = reference.condensed_linear_reference(x, values, indices, None, None, rows)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        print("triton ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "triton ok" in result.stdout


def test_triton_csr_and_sddmm_kernels_under_interpreter() -> None:
    """The compact layers' GPU kernels (CSR rows of any fan-in, empty rows included, and the SDDMM weight gradient)
    against the reference twins, on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    result = run_python(
        """
        import torch
        from sparseapps.core.kernels import gpu, reference
        from sparseapps.core.compact import CompactLinear
        torch.manual_seed(0)
        for n, width, rows, density in ((5, 40, 7, 0.3), (33, 70, 50, 0.05), (1, 300, 17, 0.5), (40, 20, 9, 0.0)):
            mask = torch.rand(rows, width) < density
            mask[0] = False
            layer = CompactLinear(torch.randn(rows, width) * mask, mask, None)
            x, dy = torch.randn(n, width), torch.randn(n, rows)
            for index in (layer.col_indices, layer.col_indices.int()):
                values = layer.values.detach()
                got = gpu.csr_rows_triton(x, layer.row_ptr, values, index)
                want = reference.csr_linear_reference(x, layer.row_ptr, values, index, None, None, rows)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                got = gpu.csr_sddmm_triton(x, dy, layer.row_ptr, index)
                torch.testing.assert_close(got, reference.csr_sddmm_reference(x, dy, layer.row_ptr, index), rtol=1e-5, atol=1e-5)
        print("triton csr ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "triton csr ok" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compact_rigl_on_gpu_matches_the_cpu_run() -> None:
    """A compact RigL run on the GPU (Triton kernels) takes the CPU run's topology and stays within float32 rounding."""
    from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact

    runs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
        config = SparsityConfig.preset("rigl", sparsity=0.9, seed=0, storage="compact", update_interval=10)
        model = to_compact(model, config).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = DynamicSparsity(model, optimizer, config, total_steps=60)
        generator = torch.Generator().manual_seed(1)
        for _ in range(60):
            x = torch.randn(32, 64, generator=generator).to(device)
            y = torch.randint(0, 10, (32,), generator=generator).to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        runs[device] = {fqn: t.dense_weight().cpu() for fqn, t in engine.tensors.items()}
    for fqn, weight in runs["cpu"].items():
        assert torch.equal(weight != 0, runs["cuda"][fqn] != 0), fqn
        torch.testing.assert_close(runs["cuda"][fqn], weight, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_condense_on_gpu_matches_masked_dense() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 512).cuda()
    mask = torch.zeros(512, 256, dtype=torch.bool)
    for row in range(512):
        mask[row, torch.randperm(256)[:26]] = True
    layer.register_buffer("weight_mask", mask.cuda())
    for form in ("condensed", "csr", "auto"):
        fast = condense(nn.Sequential(layer), CondenseConfig(form=form, repeats=3))
        for batch in (1, 64):
            x = torch.randn(batch, 256, device="cuda")
            want = nn.functional.linear(x, layer.weight * layer.weight_mask, layer.bias)
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-4)
