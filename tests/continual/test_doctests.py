"""The docstring examples of sparseapps.continual run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sparseapps.continual",
    "sparseapps.continual.benchmarks",
    "sparseapps.continual.capacity",
    "sparseapps.continual.checkpoint",
    "sparseapps.continual.config",
    "sparseapps.continual.isolation",
    "sparseapps.continual.layers",
    "sparseapps.continual.models",
    "sparseapps.continual.plots",
    "sparseapps.continual.plugin",
    "sparseapps.continual.streams",
    "sparseapps.continual.train",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
