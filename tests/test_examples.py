"""The examples and notebooks run end to end on a tiny local model (CPU, offline), so they cannot rot.

Examples run as subprocesses (a fresh interpreter, so their import order is the real one) with the
tiny model, one optimizer step and small budgets; each must exit 0 and write the student adapter.
Notebooks run headlessly through nbclient with a papermill-style cell injected after the cell tagged
`parameters`, and with `SDPO_NOTEBOOK_CI=1` so their install cell installs nothing. Needs
`nbclient`, `nbformat` and `ipykernel` (skipped without them).
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ROOT / "notebooks"
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "SDPO_UNSLOTH_BACKEND": "transformers",
    "SDPO_NOTEBOOK_CI": "1",
    "CUDA_VISIBLE_DEVICES": "",  # the CPU settings, even on a GPU machine
}
TIMEOUT_S = 300

# Per example: tiny budgets on top of --model/--max-steps/--output-dir.
EXAMPLE_ARGS = {
    "basic_sdpo.py": ["--train-size", "8", "--eval-size", "4", "--max-completion-length", "4"],
    "sdpo_with_unsloth.py": ["--train-size", "8", "--eval-size", "4", "--max-completion-length", "6"],
    "sdpo_rich_feedback.py": ["--eval-size", "4", "--max-completion-length", "6", "--task-types", "loops"],
}
NOTEBOOK_PARAMS = {
    "quickstart_addition.ipynb": {"N_PROBLEMS": 16, "EVAL_SIZE": 4, "MAX_COMPLETION_LENGTH": 4},
    "unsloth_reasoning.ipynb": {"N_PROBLEMS": 16, "EVAL_SIZE": 4, "MAX_COMPLETION_LENGTH": 6},
    "rich_feedback_code.ipynb": {"EVAL_SIZE": 4, "MAX_COMPLETION_LENGTH": 6},
}


def run_env() -> dict[str, str]:
    return {**os.environ, **ENV}


def test_every_example_and_notebook_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_ARGS)
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NOTEBOOK_PARAMS)


# ------------------------------------------------------------------------------------------ examples


def load_example(script: str, monkeypatch):
    """Import an example as a module (not as __main__): in-process, so no second interpreter start.

    CUDA is hidden so that, on a GPU machine, the unsloth example does not import unsloth into a test
    process that has already imported trl.
    """
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(EXAMPLE_ARGS))
def test_example_help_names_the_common_options(script, capsys, monkeypatch):
    module = load_example(script, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--max-steps", "--output-dir", "Qwen/Qwen2.5-0.5B-Instruct", "embedded"):
        assert option in text, (script, option)
    defaults = module.parse_args([])
    assert defaults.model == "Qwen/Qwen2.5-0.5B-Instruct" and defaults.max_steps > 1


@pytest.mark.parametrize("script", sorted(EXAMPLE_ARGS))
def test_example_trains_and_saves_the_student_adapter(script, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, str(EXAMPLES / script), "--model", tiny_model_dir, "--max-steps", "1"]
    command += ["--output-dir", str(output), *EXAMPLE_ARGS[script]]
    done = subprocess.run(
        command, capture_output=True, text=True, env=run_env(), timeout=TIMEOUT_S, cwd=tmp_path
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16
    from safetensors.torch import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert keys and not any("sdpo_teacher" in key for key in keys)  # the student only
    log = done.stdout + done.stderr
    assert "sdpo/distill_loss" in log  # the training metrics were printed
    assert "->" in log and str(adapter) in log  # before -> after, and where the adapter went
    if script != "sdpo_with_unsloth.py":
        assert "note: no CUDA GPU" in log  # says it switched to CPU settings
    else:
        assert "transformers + peft backend" in log  # the one-line fallback note


@pytest.mark.parametrize("script", sorted(EXAMPLE_ARGS))
def test_example_doctests_pass(script, monkeypatch):
    module = load_example(script, monkeypatch)
    failures, attempted = doctest.testmod(module, verbose=False)
    assert failures == 0
    if script == "sdpo_with_unsloth.py":
        assert attempted > 0  # ThinkThenAnswerReward's examples ran


def test_unsloth_example_patches_before_importing_sdpo_unsloth():
    """The seed's order: `from unsloth import FastLanguageModel, PatchFastRL`, PatchFastRL(...), then sdpo_unsloth."""
    tree = ast.parse((EXAMPLES / "sdpo_with_unsloth.py").read_text())
    order = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("unsloth", "sdpo_unsloth", "trl"):
            order.append((node.lineno, node.module))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PatchFastRL":
            order.append((node.lineno, "PatchFastRL()"))
    assert [name for _, name in sorted(order)] == ["unsloth", "PatchFastRL()", "sdpo_unsloth", "trl"]


# ------------------------------------------------------------------------------------------ notebooks


def parameters_cell_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_PARAMS))
def test_notebook_is_committed_clean(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    params = nb.cells[parameters_cell_index(nb)].source
    assert 'MODEL = "Qwen/Qwen2.5-0.5B-Instruct"' in params and "MAX_STEPS" in params
    install = code[0].source
    assert "SDPO_NOTEBOOK_CI" in install and "trl>=1.14,<1.15" in install
    assert "transformers>=5.0,<=5.17.0" in install and "datasets>=3.0,<5" in install
    assert all(cell.source.strip() for cell in nb.cells)
    body = "\n".join(cell.source for cell in code)
    assert "sdpo_unsloth.train(" in body and "from sdpo_unsloth import" in body  # the public API only
    assert "export(result.adapter_dir" in body
    assert not re.search(r"sdpo_unsloth[\w.]*\._|import _", body), "private names of the kit"


@pytest.mark.parametrize("name", sorted(NOTEBOOK_PARAMS))
def test_notebook_runs_headless(name, tiny_model_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    index = parameters_cell_index(nb)
    values = {
        "MODEL": tiny_model_dir,
        "MAX_STEPS": 1,
        "OUTPUT_DIR": str(tmp_path / "run"),
        **NOTEBOOK_PARAMS[name],
    }
    unknown = set(values) - assigned_names(nb.cells[index].source)
    assert not unknown, f"{name}: not parameters of the notebook: {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    injected.metadata["tags"] = ["injected-parameters"]  # papermill's convention
    nb.cells.insert(index + 1, injected)

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # keep ipykernel's inline backend: the plot is an output
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{str(exc)[-4000:]}")

    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "model.safetensors").is_file()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "skipping installs" in text and "before ->" in text
    assert any("image/png" in out.get("data", {}) for out in outputs), "the plot cell drew nothing"
