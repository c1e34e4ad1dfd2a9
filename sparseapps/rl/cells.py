"""The cell store of the registered RL suites (``scripts/bench_plasticity.py``, ``scripts/bench_minatar.py``).

A suite is a grid of cells (environment, method, seed, ...); each cell trains one agent and writes one JSON file,
``<out>/<group>/<cell>/seed<k>.json``, holding the settings it ran with. A suite resumes by reading back the cells
whose file exists, and refuses one written with other settings (or unreadable) instead of mixing it in.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> path = out / "env" / "method" / "seed0.json"
    >>> run_or_read(path, {"steps": 10}, lambda: {"settings": {"steps": 10}, "return": 1.0})
    ({'settings': {'steps': 10}, 'return': 1.0}, True)
    >>> run_or_read(path, {"steps": 10}, lambda: {"never": "called"})
    ({'settings': {'steps': 10}, 'return': 1.0}, False)
    >>> [cell["return"] for cell in cells_on_disk(out)]
    [1.0]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparseapps.core.io import write_atomic, write_json

__all__ = ["cells_on_disk", "export_cells", "read_cell", "run_or_read", "write_summary"]


def read_cell(path: Path, expected_settings: dict[str, Any]) -> dict[str, Any]:
    """A finished cell, checked against the settings it should have been run with (compared as JSON stores them).

    Raises:
        ValueError: the file is unreadable or not JSON, or holds other settings; the message names the file.
    """
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not a readable cell result ({error}); remove it to rerun the cell"
        ) from None
    expected = json.loads(json.dumps(expected_settings))
    if result.get("settings") != expected:
        raise ValueError(
            f"{path} was run with other settings than this suite's ({result.get('settings')} vs "
            f"{expected}); use another --out or remove it"
        )
    return result


def run_or_read(
    path: Path, settings: dict[str, Any], train: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """``(result, trained)``: the cell read back from ``path`` if it exists (:func:`read_cell`), else ``train()``'s
    result, written to ``path`` atomically."""
    if path.exists():
        return read_cell(path, settings), False
    result = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result, True


def cells_on_disk(out: Path) -> list[dict[str, Any]]:
    """Every cell result under ``out`` (``<out>/*/*/seed*.json``), in path order."""
    return [json.loads(path.read_text()) for path in sorted(out.glob("*/*/seed*.json"))]


def export_cells(out: Path, destination: Path, drop: tuple[str, ...] = ()) -> int:
    """Copies every cell under ``out`` to the same place under ``destination`` without the keys ``drop`` (e.g. a
    suite's per-episode training logs, to keep a repository's copy small); returns how many. The copies keep their
    settings, so a suite pointed at them resumes after them.

    Example:
        >>> import tempfile
        >>> out, kept = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = run_or_read(out / "g" / "m" / "seed1.json", {}, lambda: {"settings": {}, "log": [1, 2], "r": 3})
        >>> export_cells(out, kept, drop=("log",)), cells_on_disk(kept)
        (1, [{'settings': {}, 'r': 3}])
    """
    paths = sorted(out.glob("*/*/seed*.json"))
    for path in paths:
        cell = {key: value for key, value in json.loads(path.read_text()).items() if key not in drop}
        target = destination / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, cell)
    return len(paths)


def write_summary(
    out: Path,
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[list[dict[str, Any]], Path], None],
) -> dict[str, Any]:
    """Summarizes every cell under ``out`` into ``summary.json``, ``summary.md`` (printed) and ``summary.png``;
    returns the summary.

    Raises:
        SystemExit: ``out`` holds no cell result.
    """
    results = cells_on_disk(out)
    if not results:
        raise SystemExit(f"no cell results under {out}")
    summary = summarize(results)
    write_json(out / "summary.json", summary)
    text = markdown(summary)
    write_atomic(out / "summary.md", text.encode())
    plot(results, out / "summary.png")
    print(text)
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {out / 'summary.png'}")
    return summary
