"""The worked examples in the core's docstrings are run, so they cannot drift from the code."""

import doctest
import importlib
import pkgutil

import pytest

import sparseapps.core

# Every module of the core, found by walking the package, so a new module's examples run without being listed.
MODULES = sorted(
    ["sparseapps.core"]
    + [info.name for info in pkgutil.walk_packages(sparseapps.core.__path__, "sparseapps.core.")]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if result.attempted == 0:
        pytest.skip(f"{name} has no docstring example")
