"""The ``Examples:`` sections of the compression package run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lightning_optx.compression",
    "lightning_optx.compression.base",
    "lightning_optx.compression.powersgd",
    "lightning_optx.compression.topk",
    "lightning_optx.compression.sign",
    "lightning_optx.compression.cast",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
