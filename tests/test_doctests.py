"""The docstring examples of the library's pure modules are tests too."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sdpo_unsloth.config",
    "sdpo_unsloth.teacher",
    "sdpo_unsloth.rewards.protocol",
    "sdpo_unsloth.tasks.addition",
    "sdpo_unsloth.tasks.gym",
    "sdpo_unsloth.tasks.humaneval",
    "sdpo_unsloth.loss",
    "sdpo_unsloth.rewards.code",
    "sdpo_unsloth.sandbox",
    "sdpo_unsloth.faults",
    "sdpo_unsloth.preconditions",
    "sdpo_unsloth.cli",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
