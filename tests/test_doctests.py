"""The docstring examples of the library's modules are tests too: every module of the package is walked."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sdpo_unsloth

SKIP = {"sdpo_unsloth.cli.__main__"}  # it runs the command line when imported
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(sdpo_unsloth.__path__, prefix="sdpo_unsloth.")
    if info.name not in SKIP
)


def test_the_walk_finds_the_modules_with_examples():
    assert {
        "sdpo_unsloth.config",
        "sdpo_unsloth.teacher",
        "sdpo_unsloth.cli.commands",
        "sdpo_unsloth.loss",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
