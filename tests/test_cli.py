import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparseapps.cli import info, main


def test_info_reports_versions_threads_and_data(capsys) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["threads"] >= 1
    assert data["packages"]["torch"]
    assert "kernels" in data and "data" in data
    assert info()["sparseapps"] == data["sparseapps"]


def test_core_demo_writes_table_results_and_plot(tmp_path: Path) -> None:
    assert main(["demo", "--core-only", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "core" / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows)[:5] == ["dense", "static", "set", "rigl", "rigl-compact"]
    # compact storage runs the same algorithm: same nonzeros, the same accuracy up to float rounding
    assert rows["rigl-compact"]["weights_nonzero"] == rows["rigl"]["weights_nonzero"]
    assert abs(rows["rigl-compact"]["accuracy_mean"] - rows["rigl"]["accuracy_mean"]) <= 1 / 450
    assert (tmp_path / "core" / "accuracy.png").stat().st_size > 1000
    assert "rigl-compact" in (tmp_path / "core" / "table.txt").read_text()


def test_digits_run_on_compact_storage_equals_the_masked_run() -> None:
    from sparseapps.demo import DigitsRun, train_digits

    masked, compact = (
        train_digits(DigitsRun(method="rigl", hidden=64, epochs=4, update_interval=20, storage=storage))
        for storage in ("masked", "compact")
    )
    assert compact["topology_updates"] == masked["topology_updates"] > 0
    assert compact["weights_nonzero"] == masked["weights_nonzero"]
    assert max(abs(a - b) for a, b in zip(compact["curve"], masked["curve"], strict=True)) <= 1 / 450
    with pytest.raises(ValueError, match="storage"):
        DigitsRun(storage="sparse")


def test_bad_arguments_exit_non_zero(tmp_path: Path) -> None:
    assert main(["demo", "--core-only", "--seeds", "0", "--out", str(tmp_path)]) == 2


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "sparseapps", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "sparseapps" in done.stdout


def test_a_refused_file_or_directory_is_one_error_line_not_a_traceback(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import sparseapps.cli as cli
    from sparseapps.core.io import CorruptFileError

    def refuse(args) -> int:
        raise CorruptFileError(f"{tmp_path / 'checkpoint.pt'} is damaged")

    monkeypatch.setattr(cli, "_dispatch", refuse)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'checkpoint.pt'} is damaged\n"

    def interrupt(args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupt)
    assert main(["info"]) == 130
    assert "run the same command again" in capsys.readouterr().err
