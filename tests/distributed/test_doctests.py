"""The worked examples in the distributed modules' docstrings are run."""

import doctest
import importlib

import pytest

MODULES = ["sparseapps.core.distributed", "sparseapps.recsys.distributed", "sparseapps.continual.distributed"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
