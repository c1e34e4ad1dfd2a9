from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sb3_logdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SB3's ``learn`` without a TensorBoard folder makes an empty ``/tmp/SB3-<time>`` directory for its logger
    and never removes it. Point it at the test's own temporary directory instead; subprocesses inherit it."""
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "sb3_logger"))
