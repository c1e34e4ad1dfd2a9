"""The worked examples in the core's docstrings are run, so they cannot drift from the code."""

import doctest
import importlib

import pytest

MODULES = [
    "sparseapps.core",
    "sparseapps.core.config",
    "sparseapps.core.distributions",
    "sparseapps.core.random_state",
    "sparseapps.core.redistribution",
    "sparseapps.core.rules",
    "sparseapps.core.scores",
    "sparseapps.core.scoring",
    "sparseapps.core.schedules",
    "sparseapps.core.structured",
    "sparseapps.core.validation",
    "sparseapps.core.accounting",
    "sparseapps.core.engine",
    "sparseapps.core.finite",
    "sparseapps.core.io",
    "sparseapps.core.masks",
    "sparseapps.core.options",
    "sparseapps.core.compact",
    "sparseapps.core.compact.convert",
    "sparseapps.core.compact.layer",
    "sparseapps.core.compact.embedding",
    "sparseapps.core.criteria",
    "sparseapps.core.obs",
    "sparseapps.core.kernels.formats",
    "sparseapps.core.kernels.reference",
    "sparseapps.core.stats",
    "sparseapps.core.compact.topology",
    "sparseapps.core.sparsegpt",
    "sparseapps.core.shrink",
    "sparseapps.core.supermask",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example to run"
    assert result.failed == 0
