"""Bad inputs get one clear error, before anything loads: config files, `train()`'s numbers, paths, data rows,
checkpoints (CPU, offline)."""

from __future__ import annotations

import shutil

import pytest

from sdpo_unsloth import cli

# ------------------------------------------------------------------------------------------ config files


def _config_kwargs(tmp_path, text: str, name: str = "run.yaml") -> dict:
    config = tmp_path / name
    config.write_text(text)
    parser, names = cli.build_parser()
    return cli._train_kwargs(parser.parse_args(["train", "--config", str(config)]), names)


def test_config_values_take_the_flag_types(tmp_path):
    # PyYAML reads 2e-4 (no decimal point) as the string '2e-4'; train() compared it with a float after loading.
    kwargs = _config_kwargs(
        tmp_path,
        "learning_rate: 2e-4\nmax_steps: '3'\nexport_formats: lora\ntime_budget: 11h30m\n"
        "distillation_topk: full\nsdpo_config:\n  teacher_update_rate: 1e-2\n",
    )
    assert kwargs["learning_rate"] == 2e-4 and isinstance(kwargs["learning_rate"], float)
    assert kwargs["max_steps"] == 3 and kwargs["export_formats"] == ("lora",)
    assert kwargs["time_budget"] == "11h30m" and kwargs["distillation_topk"] == "full"
    assert kwargs["sdpo_config"].teacher_update_rate == 0.01


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: abc", "`learning_rate` in {} must be a number (e.g. 2.0e-4), got 'abc'."),
        ("max_steps: 2.5", "`max_steps` in {} must be an integer or null, got 2.5."),
        ("teacher_mode: EMA", "`teacher_mode` in {} must be one of 'ema', 'frozen', 'live', 'trust_region'"),
        (
            "export_formats: [lora, onnx]",
            "`export_formats` in {} may hold lora, merged_16bit, gguf; got ['onnx']",
        ),
        ("progress: 3", "`progress` in {} must be true or false, got 3."),
    ],
)
def test_bad_config_values_name_the_key_and_type(tmp_path, text, message):
    with pytest.raises(cli.UserError) as error:  # the CLI prints it as one line, exit status 2
        _config_kwargs(tmp_path, text)
    assert message.format(tmp_path / "run.yaml") in str(error.value)


# ------------------------------------------------------------------------------------------ train()'s numbers


@pytest.fixture
def nothing_loads(monkeypatch):
    """train() fails the test if it gets as far as choosing a backend (the first thing that loads)."""
    from sdpo_unsloth import api

    def loaded(*args, **kwargs):
        raise AssertionError("train() started loading before rejecting the argument")

    monkeypatch.setattr(api, "bootstrap", loaded)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"max_steps": -1},
            "`max_steps` must be an integer >= 1 (optimizer steps; there is no epoch mode), got -1.",
        ),
        ({"max_steps": 0}, "`max_steps` must be an integer >= 1"),
        ({"learning_rate": -1e-3}, "`learning_rate` must be a number > 0 (e.g. 2e-4), got -0.001."),
        ({"learning_rate": float("nan")}, "`learning_rate` must be a number > 0"),
        ({"temperature": 0.0}, "`temperature` must be a number > 0 (sampling needs one, e.g. 1.0"),
        ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size` must be an integer >= 1"),
        ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps` must be an integer >= 1"),
        ({"max_completion_length": 0}, "`max_completion_length` must be an integer >= 1"),
        ({"lora_r": 0}, "`lora_r` must be an integer >= 1 (the LoRA rank, e.g. 16), got 0."),
        ({"lora_alpha": -4}, "`lora_alpha` must be an integer >= 1"),
        ({"eval_batch_size": 0}, "`eval_batch_size` must be an integer >= 1"),
        ({"save_steps": -3}, "`save_steps` must be an integer >= 0 (0 or None: no checkpoints), got -3."),
        ({"seed": "7"}, "`seed` must be an integer >= 0, got '7'; pass seed=7, not the string '7'."),
        ({"num_generations": "4"}, "pass num_generations=4, not the string '4'."),
        ({"num_generations": 1}, "`num_generations` must be an integer >= 2"),
        (
            {"max_steps": 2.0},
            "`max_steps` must be an integer >= 1 (optimizer steps; there is no epoch mode), got 2.0.",
        ),
        ({"max_steps": True}, "`max_steps` must be an integer >= 1"),
        ({"eval_size": -1}, "`eval_size` must be an integer >= 0 (0 skips evaluation), got -1."),
        (
            {"export_formats": "lora"},
            "`export_formats` must be a list of formats, got the string 'lora'; pass ['lora'].",
        ),
    ],
)
def test_bad_numbers_are_rejected_before_loading(tmp_path, nothing_loads, arguments, message):
    from sdpo_unsloth.api import UsageError, train

    with pytest.raises(UsageError) as error:
        train(
            "no-model",
            [{"prompt": "1+1="}],
            lambda prompts, completions, **_: [0.0],
            str(tmp_path),
            **arguments,
        )
    assert message in str(error.value)


def test_an_empty_batch_is_not_a_valid_group_size():
    from sdpo_unsloth.preconditions import group_size_error

    # per_device_train_batch_size=0 made 0 completions per step, which every num_generations "divided"
    assert group_size_error(0, 2, 4) is not None and group_size_error(4, 0, 2) is not None


# ------------------------------------------------------------------------------------------ resume


def _rows(n: int = 24) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"{i % 5}+{i // 5}="}], "answer": str(i)} for i in range(n)
    ]


def _digit(prompts, completions, **_):
    return [float(any(ch.isdigit() for ch in str(c))) for c in completions]


TINY = {
    "max_steps": 2,
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 4,
    "lora_r": 4,
    "eval_size": 0,
    "progress": False,
    "plot": False,
    "preflight": False,
    "export_formats": (),
    "seed": 7,
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A 2-step run with a checkpoint after each step (checkpoint-1, checkpoint-2)."""
    from sdpo_unsloth.api import train

    out = tmp_path_factory.mktemp("resume") / "run"
    train(tiny_model_dir, _rows(), _digit, str(out), save_steps=1, **TINY)
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _damage(folder, name: str, content: bytes | None) -> None:
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("trainer_state.json", b"{trunc", "trainer_state.json is unreadable (JSONDecodeError"),
        ("adapter_model.safetensors", b"\0" * 10, "adapter_model.safetensors is unreadable"),
        ("adapter_model.safetensors", None, "it has no adapter_model.safetensors"),
        ("optimizer.pt", b"garbage", "optimizer.pt is unreadable (not a torch file)"),
        ("optimizer.pt", None, "it has no optimizer.pt"),  # resumed silently with a fresh optimizer
    ],
)
def test_a_damaged_checkpoint_names_itself_and_the_previous_one(run_copy, name, content, message):
    from sdpo_unsloth.train_config import _resume_target

    checkpoints = run_copy / "checkpoints"
    _damage(checkpoints / "checkpoint-2", name, content)
    with pytest.raises(ValueError) as error:
        _resume_target(True, checkpoints)
    text = str(error.value)
    assert text.startswith(f"cannot resume from {checkpoints / 'checkpoint-2'}: {message}")
    assert f"resume={str(checkpoints / 'checkpoint-1')!r}" in text
    assert _resume_target(str(checkpoints / "checkpoint-1"), checkpoints) == str(checkpoints / "checkpoint-1")


def test_a_damaged_only_checkpoint_says_there_is_no_older_one(run_copy):
    from sdpo_unsloth.train_config import _resume_target

    checkpoints = run_copy / "checkpoints"
    shutil.rmtree(checkpoints / "checkpoint-1")
    _damage(checkpoints / "checkpoint-2", "trainer_state.json", b"{trunc")
    with pytest.raises(ValueError, match="there is no older checkpoint to resume from"):
        _resume_target(True, checkpoints)


def test_resuming_with_another_lora_rank_or_model_is_refused(run_copy, tiny_model_dir, tmp_path, monkeypatch):
    from conftest import make_tiny_model, make_tiny_tokenizer

    from sdpo_unsloth.api import UsageError, train
    from sdpo_unsloth.train_config import _resume_target

    checkpoint = run_copy / "checkpoints" / "checkpoint-2"
    loads = []
    monkeypatch.setattr("sdpo_unsloth.model.load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    with pytest.raises(UsageError) as error:
        train(
            tiny_model_dir,
            _rows(),
            _digit,
            str(run_copy),
            **{**TINY, "lora_r": 8, "max_steps": 3, "resume": True},
        )
    assert str(error.value).startswith(
        f"checkpoint {checkpoint} was trained with lora_r=4 (this run: 8), lora_alpha=4 (this run: 8); resume with "
        "the same settings"
    )
    bigger = tmp_path / "bigger"
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer), hidden=64).save_pretrained(bigger)
    tokenizer.save_pretrained(bigger)
    with pytest.raises(
        UsageError, match=f"was trained with base model {tiny_model_dir} \\(this run: {bigger}\\)"
    ):
        train(str(bigger), _rows(), _digit, str(run_copy), **{**TINY, "max_steps": 3, "resume": True})
    assert loads == []  # refused before the model loaded
    moved = tmp_path / "moved"  # the same model in another folder resumes
    shutil.copytree(tiny_model_dir, moved)
    assert _resume_target(True, run_copy / "checkpoints", model=str(moved), lora_r=4) == str(checkpoint)


# ------------------------------------------------------------------------------------------ model path


def test_a_missing_model_folder_is_named(tmp_path, nothing_loads):
    from sdpo_unsloth.api import UsageError, train
    from sdpo_unsloth.model import load_model

    missing = tmp_path / "models" / "moved"
    message = f"`model` folder {missing} does not exist ({tmp_path} does; was it moved or misspelt?)"
    with pytest.raises(UsageError) as error:  # was HF's "Repo id must be in the form 'repo_name'..."
        train(str(missing), [{"prompt": "1+1="}], _digit, str(tmp_path / "out"))
    assert str(error.value).startswith(message)
    with pytest.raises(UsageError, match="does not exist"):
        load_model("./no/such/model", backend="transformers")


# ------------------------------------------------------------------------------------------ dataset rows


def _resolve(dataset, rewards="addition", **options):
    from sdpo_unsloth.data import resolve_inputs

    return resolve_inputs(dataset, rewards, None, 0, rows_needed=8, seed=1, **options)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (  # was pyarrow's "cannot mix list and non-list, non-null values"
            [{"prompt": _chat("1+1=")}] * 3 + [{"prompt": "2+2="}],
            "`dataset` mixes prompt forms: row 0 is chat messages but row 3 is plain text; use one form",
        ),
        (
            [{"prompt": "1+1="}, {"prompt": None}],
            "`dataset` row 1 has no prompt (None: an empty cell, or a row without a 'prompt' key).",
        ),
        (  # was a KeyError inside TRL, mid-training
            [{"prompt": _chat("1+1=")}, {"prompt": [{"role": "user", "text": "2+2="}]}],
            "`dataset` row 1 has message 0 {'role': 'user', 'text': '2+2='}, which lacks a 'role' or a 'content'",
        ),
        (
            [{"prompt": {"role": "user", "content": "1+1="}}],
            "`dataset` row 0 has one message (a dict) as its prompt; wrap it in a list",
        ),
    ],
)
def test_bad_prompts_name_their_row(rows, message):
    from sdpo_unsloth.api import UsageError

    with pytest.raises(UsageError) as error:
        _resolve(rows * 2)
    assert str(error.value).startswith(message)


def test_bad_prompts_in_files_name_the_row_and_line(tmp_path):
    from sdpo_unsloth.api import UsageError

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"prompt": "1+1="}\n\n{"prompt": "2+2="}\n{not json}\n')
    with pytest.raises(UsageError) as error:  # was a JSONDecodeError at "line 1", not naming the file
        _resolve(str(jsonl))
    assert str(error.value).startswith(f"line 4 of {jsonl} is not valid JSON (Expecting property name")
    jsonl.write_text('{"prompt": "1+1="}\n\n{"prompt": [{"role": "user", "content": "2+2="}]}\n')
    with pytest.raises(
        UsageError, match=f"row 0 \\(line 1 of {jsonl}\\) is plain text but row 1 \\(line 3 of"
    ):
        _resolve(str(jsonl))
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "prompt,answer\n1+1=,2\n,4\n"
    )  # a blank cell: was "You need to specify either text or ..."
    with pytest.raises(UsageError, match="`dataset` row 1 has no prompt"):
        _resolve(str(csv))


def test_the_trainer_checks_prompts_too():
    from datasets import Dataset

    from sdpo_unsloth.preconditions import InputError, check_dataset

    with pytest.raises(InputError, match="`train_dataset` row 1 has no prompt"):
        check_dataset(Dataset.from_list([{"prompt": "a"}, {"prompt": None}]))


def test_a_malformed_code_tests_row_is_named_before_training():
    import json

    from sdpo_unsloth.api import UsageError

    good = json.dumps([{"function": "f", "args": [1], "expected": 2}])
    rows = [{"prompt": f"Write f(x) returning x+1. Case {i}", "tests": good} for i in range(24)]
    rows[10]["tests"] = '[{"function": "f", "args": 1, "expected": 2}]'  # args not a list
    with pytest.raises(UsageError) as error:  # was "row 0" (the batch position), ~10 s into a 20-step run
        _resolve(rows, "code")
    assert str(error.value).startswith("`dataset` row 10, column 'tests': function test case 0 needs")
    with pytest.raises(
        UsageError, match="`dataset` has no 'tests' column, which the reward code_execution runs"
    ):
        _resolve([{"prompt": "x"}] * 4, "code")


def test_numpy_numbers_and_tool_call_messages_are_valid_input():
    """Numbers from a sweep (numpy scalars) are numbers; an assistant message that calls a tool has no content."""
    import numpy as np

    from sdpo_unsloth.preconditions import check_prompts
    from sdpo_unsloth.train_config import check_arguments

    check_arguments(
        {"max_steps": np.int64(30), "learning_rate": np.float32(2e-4), "temperature": np.float64(0.7)}
    )
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
    }
    check_prompts([[{"role": "user", "content": "2*3?"}, call, {"role": "tool", "content": "6"}]])
    with pytest.raises(
        ValueError, match="lacks a 'role' or a 'content'"
    ):  # without the tool call it still fails
        check_prompts([[{"role": "user", "content": "2*3?"}, {"role": "assistant", "content": None}]])
