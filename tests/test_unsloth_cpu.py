"""The real unsloth package in its CPU mode (no GPU): our bootstrap must cope with it.

CI installs unsloth with `.ci/install-unsloth-cpu`; elsewhere these tests skip. Each runs in a fresh
interpreter, because importing unsloth patches transformers for the whole process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed"
)


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SDPO_UNSLOTH_BACKEND"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_seed_import_order_on_cpu_falls_back_to_transformers():
    out = run(
        """
        from unsloth import FastLanguageModel  # the seed's first line; PatchFastRL does not exist in CPU mode
        import unsloth
        print("PatchFastRL" in dir(unsloth))
        import sdpo_unsloth, trl
        backend = sdpo_unsloth.bootstrap()
        print(backend.name, backend.device)
        print(trl.GRPOTrainer in sdpo_unsloth.SDPOTrainer.__mro__)
        """
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-3:] == ["False", "transformers cpu", "True"]
    assert "imported before unsloth" not in out.stderr


def test_wrong_import_order_warns_with_the_real_package():
    out = run(
        """
        import trl, transformers
        from sdpo_unsloth.bootstrap import check_import_order
        print(check_import_order())
        """
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['trl', 'transformers']"
    assert "put `import sdpo_unsloth` (or `import unsloth`) first" in out.stderr


def test_explicit_unsloth_backend_on_cpu_is_a_clear_error():
    out = run("import sdpo_unsloth; sdpo_unsloth.bootstrap('unsloth')")
    assert out.returncode != 0
    assert "backend='unsloth' needs a CUDA GPU" in out.stderr
