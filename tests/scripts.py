"""Scripts of ``scripts/`` imported as modules, for tests of their pieces."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` as the module ``name``, registered in ``sys.modules`` while in use (dataclasses look
    their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def assert_runs_resumes_and_summarizes(
    bench: ModuleType, argv: list[str], out: Path, files: list[str], comparison: str, monkeypatch: Any
) -> None:
    """The contract of the cell-by-cell benchmark scripts (``bench_plasticity``, ``bench_minatar``): ``argv`` writes
    exactly ``files`` (one JSON per cell) under ``out``, a plot, and a summary whose ``comparison`` row pairs seeds 0 and 1;
    run again, it trains nothing and reads every cell back; ``--summarize`` reads them alone; the same folder
    refuses a run with other settings."""
    import pytest

    summary = bench.main(argv)
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.json")) == files
    assert summary["n_cells"] == len(files) and (out / "summary.md").exists()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    rows = {row["comparison"]: row for row in summary["comparisons"]}
    assert rows[comparison]["seeds"] == [0, 1]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(bench, "run_cell", refuse)
    assert bench.main(argv)["n_cells"] == len(files)  # resumed: every cell read back
    assert bench.main(["--summarize", "--out", str(out)])["n_cells"] == len(files)
    with pytest.raises(ValueError, match="other settings"):
        bench.main([a for a in argv if a != "--quick"] + ["--seeds", "0"])
