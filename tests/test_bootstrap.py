"""Import order and backend choice, each in a fresh interpreter so sys.modules starts clean."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest


def run(code: str, tmp_path, *, stub_unsloth: bool = False, env: dict[str, str] | None = None):
    environment = {k: v for k, v in os.environ.items() if k != "SDPO_UNSLOTH_BACKEND"}
    environment.update(env or {})
    if stub_unsloth:  # a stand-in that is importable, so the check knows unsloth is installed
        (tmp_path / "unsloth").mkdir(exist_ok=True)
        (tmp_path / "unsloth" / "__init__.py").write_text("")
        environment["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{environment.get('PYTHONPATH', '')}"
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_import_is_cheap(tmp_path):
    out = run(
        """
        import sys, sdpo_unsloth
        print(sorted(m for m in ("torch", "trl", "transformers", "peft", "unsloth") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_cli_and_the_entry_modules_import_no_trainer_library_before_the_backend(tmp_path):
    """The CLI builds its parser from train()'s signature, importing api and what api imports; a module-level
    `from transformers import ...` there (checkpoints.py had one) imported transformers and peft before unsloth
    for every CLI run on a GPU, and `doctor` then blamed the user's import order."""
    out = run(
        """
        import sys
        import sdpo_unsloth.api, sdpo_unsloth.model, sdpo_unsloth.preflight, sdpo_unsloth.exporter
        from sdpo_unsloth.cli.parser import build_parser
        build_parser()
        print(sorted(m for m in ("trl", "transformers", "peft", "unsloth") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_looking_up_train_leaves_the_backend_to_its_argument(tmp_path):
    """`sdpo_unsloth.train` (and preflight, load_model, export) looked up by name chose the backend in auto mode
    (unsloth on a GPU), so their own backend="transformers" then raised "cannot switch"."""
    out = run(
        """
        import sdpo_unsloth
        from sdpo_unsloth.bootstrap import current_backend
        functions = [sdpo_unsloth.train, sdpo_unsloth.preflight, sdpo_unsloth.load_model, sdpo_unsloth.export]
        print(current_backend(), all(callable(f) for f in functions))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None True"


def test_wrong_import_order_warns_once_with_the_fix(tmp_path):
    out = run(
        """
        import transformers, peft
        from sdpo_unsloth.bootstrap import check_import_order
        print(check_import_order())
        print(check_import_order())
        """,
        tmp_path,
        stub_unsloth=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['transformers', 'peft']", "['transformers', 'peft']"]
    assert out.stderr.count("imported before unsloth") == 1
    assert "transformers, peft imported before unsloth" in out.stderr
    assert "put `import sdpo_unsloth` (or `import unsloth`) first" in out.stderr


def test_right_import_order_is_silent(tmp_path):
    out = run(
        """
        import unsloth, transformers
        from sdpo_unsloth.bootstrap import check_import_order
        print(check_import_order())
        """,
        tmp_path,
        stub_unsloth=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and "imported before unsloth" not in out.stderr


def test_auto_picks_transformers_on_cpu_and_the_trainer_subclasses_trl(tmp_path):
    out = run(
        """
        import sdpo_unsloth, trl
        backend = sdpo_unsloth.bootstrap()
        print(backend.name, backend.device)
        print(trl.GRPOTrainer in sdpo_unsloth.SDPOTrainer.__bases__)  # the (patched) GRPOTrainer of this run
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["transformers cpu", "True"]
    assert "imported before unsloth" not in out.stderr


def test_unsloth_backend_without_gpu_is_a_clear_error(tmp_path):
    out = run("import sdpo_unsloth; sdpo_unsloth.bootstrap('unsloth')", tmp_path, stub_unsloth=True)
    assert out.returncode != 0
    assert "backend='unsloth' needs a CUDA GPU" in out.stderr and "backend='transformers'" in out.stderr


def test_environment_override_and_bad_value(tmp_path):
    out = run(
        "import sdpo_unsloth; print(sdpo_unsloth.bootstrap().reason)",
        tmp_path,
        env={"SDPO_UNSLOTH_BACKEND": "transformers"},
    )
    assert out.stdout.strip() == "requested", out.stderr
    out = run("import sdpo_unsloth; sdpo_unsloth.bootstrap('cuda')", tmp_path)
    assert "`backend` must be one of auto, unsloth, transformers, got 'cuda'" in out.stderr
    misspelt = {"SDPO_UNSLOTH_BACKEND": "Transformers"}
    out = run("import sdpo_unsloth; sdpo_unsloth.bootstrap()", tmp_path, env=misspelt)
    assert (
        "the environment variable SDPO_UNSLOTH_BACKEND must be one of" in out.stderr
    )  # names where it came from
    out = run("from sdpo_unsloth.cli import main; main(['doctor'])", tmp_path, env=misspelt)
    assert "SDPO_UNSLOTH_BACKEND='Transformers' is not a backend" in out.stdout, out.stderr
    out = run(
        "from sdpo_unsloth.cli import main; main(['doctor'])",
        tmp_path,
        env={"SDPO_UNSLOTH_BACKEND": "transformers"},
    )
    assert "backend        transformers (SDPO_UNSLOTH_BACKEND)" in out.stdout, out.stderr


def test_backend_cannot_switch_after_the_first_choice(tmp_path):
    out = run(
        """
        import sdpo_unsloth
        sdpo_unsloth.bootstrap('transformers')
        sdpo_unsloth.bootstrap('unsloth')
        """,
        tmp_path,
    )
    assert out.returncode != 0 and "cannot switch to 'unsloth'" in out.stderr


def test_grpo_trainer_hooks_we_override_still_exist():
    """A TRL upgrade that renames or reshapes these hooks must fail here, loudly."""
    from trl import GRPOTrainer

    expected = {
        "_generate_and_score_completions": ["self", "inputs"],
        "_compute_loss": ["self", "model", "inputs"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_save": ["self", "output_dir", "state_dict"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params, name


@pytest.mark.parametrize(
    "attribute",
    [
        "temperature",
        "num_generations",
        "reward_weights",
        "chat_template_kwargs",
        "epsilon_low",
        "epsilon_high",
        "_metrics",
        "_tokenizer",
    ],
)
def test_grpo_trainer_sets_the_attributes_we_read(attribute):
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer.__init__)
    assert f"self.{attribute} =" in source or f"self.{attribute}:" in source
