from collections.abc import Iterator
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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one CPU thread for the test, restored after it: the tiny SB3 and continual models run fastest so,
    and the machine is shared. A test module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
