"""Every worked example in the recsys modules runs (the data package's and metrics' are in test_data.py)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "compact",
    "config",
    "dsl",
    "neumf",
    "output",
    "pep",
    "plots",
    "tables",
    "train",
)  # models: test_models.py


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"sparseapps.recsys.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
