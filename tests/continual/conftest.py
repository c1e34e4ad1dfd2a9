"""Fixtures every continual test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every continual test runs on one thread (tests/conftest.py's ``one_thread``)."""
