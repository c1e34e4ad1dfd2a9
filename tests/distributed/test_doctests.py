"""The worked examples in the distributed modules' docstrings are run."""

import doctest
import importlib

import pytest

# sparseapps.continual.distributed has no runnable example (it needs torchrun); tests/distributed/test_continual.py
# runs its plugin across two processes instead.
MODULES = ["sparseapps.core.distributed", "sparseapps.recsys.distributed"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example to run"
    assert result.failed == 0
