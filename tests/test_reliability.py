"""Colab-proof runs (issue 15): real SIGKILLs, atomic checkpoints, the time budget, a hanging reward, a full
disk, and bad inputs, each through `sdpo-unsloth train` on a tiny model.

Every run is a fresh process forked from one multiprocessing forkserver that imported the trainer once
(`reliability_child.py`), so a run costs ~1-2 s instead of ~10 s of imports; kills are real SIGKILLs
of that process. Equality of the final student and teacher adapters with an uninterrupted run of the
same seed is checked with `torch.testing.assert_close(rtol=0, atol=0)`: resumed runs are bitwise equal.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
FAULT = "SDPO_UNSLOTH_TEST_FAULT"
SLEEP = "RELIABILITY_REWARD_SLEEP"
FILES = ("adapter_model.safetensors", "sdpo_teacher.safetensors")


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    import reliability_child  # preloaded in the forkserver

    reliability_child.run_cli(argv, env, log)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reliability")
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a in range(5)
        for b in range(5)
    ]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def fork(workspace):
    """run(name, *flags, env=...) -> (exit code, log text): one CLI run in a forked process."""
    old = os.environ.get("PYTHONPATH")
    # The forkserver is a fresh `python -c`: it finds the worktree and this folder through PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), old]))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["reliability_child"])

    def run(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
        process = ctx.Process(target=_child, args=(argv, env or {}, str(log)))
        process.start()
        process.join(180)
        if process.is_alive():
            process.kill()
            pytest.fail(f"run {argv} did not finish in 180 s; log: {log}")
        return process.exitcode, log.read_text()

    yield run
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def train_argv(workspace: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--model", model, "--dataset", str(workspace / "data.jsonl")),
        *("--rewards", f"{ROOT / 'tests' / 'reliability_child.py'}:HasDigit", "--output-dir", str(out)),
        *("--max-steps", str(STEPS), "--num-generations", "4", "--per-device-train-batch-size", "4"),
        *("--gradient-accumulation-steps", "1", "--max-completion-length", "6", "--learning-rate", "0.05"),
        *("--lora-r", "4", "--eval-size", "0", "--save-steps", "2", "--export-formats", "lora"),
        *("--no-progress", "--no-plot", "--no-preflight", "--seed", "7"),  # generate calls: training only
        *extra,
    ]


def final_weights(out: Path, checkpoints: Path | None = None) -> dict[str, dict]:
    from safetensors.torch import load_file

    folder = (checkpoints or out / "checkpoints") / f"checkpoint-{STEPS}"
    assert (folder / "trainer_state.json").is_file(), f"no complete final checkpoint in {folder.parent}"
    return {name: load_file(folder / name) for name in FILES}


def assert_same_weights(out: Path, reference: dict[str, dict], checkpoints: Path | None = None) -> None:
    import torch

    weights = final_weights(out, checkpoints)
    for name in FILES:
        assert weights[name].keys() == reference[name].keys()
        for key, value in weights[name].items():
            torch.testing.assert_close(value, reference[name][key], rtol=0, atol=0, msg=f"{name}:{key}")


def steps_of(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def reference(fork, workspace, tiny_model_dir):
    out = workspace / "reference"
    code, log = fork(train_argv(workspace, tiny_model_dir, out), workspace / "reference.log")
    assert code == 0, log
    from safetensors.torch import load_file

    weights = final_weights(out)
    for name in FILES:  # steps 3-4 moved both adapters: equal final weights are not a trivial match
        middle = load_file(out / "checkpoints" / "checkpoint-2" / name)
        moved = max(float((weights[name][k] - middle[k]).abs().max()) for k in middle)
        print(f"reference {name}: max |checkpoint-4 - checkpoint-2| = {moved:.4g}")  # docs/reliability.md
        assert moved > 1e-4, name
    return weights


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("generate:3", 2),  # mid-sampling of step 3
        ("backward:3", 2),  # inside step 3's backward pass
        ("save:4", 2),  # inside the final save, after the teacher adapter was written
        ("publish:4", 2),  # every file of checkpoint-4 written, not yet renamed
        ("save:2", None),  # inside the first save: nothing complete yet, resume starts over
        ("drive-save:4", 2),  # checkpoints in a folder outside output_dir (a mounted Drive), killed mid-save
    ],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    fork, workspace, tiny_model_dir, reference, fault, resumes_from
):
    out = workspace / f"kill-{fault.replace(':', '-')}"
    checkpoints = out / "checkpoints"
    argv = train_argv(workspace, tiny_model_dir, out)
    if fault.startswith("drive-"):
        fault, checkpoints = fault.removeprefix("drive-"), workspace / "drive" / "MyDrive" / "run"
        argv += ["--checkpoint-dir", str(checkpoints)]
    code, log = fork(argv, out.with_suffix(".log"), {FAULT: f"{fault}:kill"})
    assert code == -signal.SIGKILL, log
    assert checkpoints == out / "checkpoints" or not (out / "checkpoints").exists()
    assert steps_of(checkpoints) == ([resumes_from] if resumes_from else [])  # only complete ones are visible
    assert not (out / "adapter").exists()

    code, log = fork([*argv, "--resume"], out.with_suffix(".resumed.log"))
    assert code == 0, log
    result = json.loads((out / "train_result.json").read_text())
    expected = str(checkpoints / f"checkpoint-{resumes_from}") if resumes_from else None
    assert result["resumed_from"] == expected
    assert not (checkpoints / ".sdpo-staging").exists()
    assert_same_weights(out, reference, checkpoints)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(fork, workspace, tiny_model_dir, reference):
    out = workspace / "disk-full"
    argv = train_argv(workspace, tiny_model_dir, out, "--save-steps", "1")
    code, log = fork(argv, out.with_suffix(".log"), {FAULT: "save:2:enospc"})
    errors = [line for line in log.splitlines() if line.startswith("sdpo-unsloth:")]
    assert code == 1 and len(errors) == 1, log
    assert "writing checkpoint-2" in errors[0] and "the disk is full" in errors[0]
    assert f"{out / 'checkpoints' / 'checkpoint-1'} is intact" in errors[0]
    assert steps_of(out / "checkpoints") == [1]
    assert not (out / "checkpoints" / ".sdpo-staging").exists()

    code, log = fork([*argv, "--resume"], out.with_suffix(".resumed.log"))
    assert code == 0, log
    assert_same_weights(out, reference)


def test_time_budget_stops_with_a_checkpoint_and_the_printed_command_resumes(
    fork, workspace, tiny_model_dir, reference
):
    out = workspace / "budget"
    budget = 3.0
    argv = train_argv(workspace, tiny_model_dir, out, "--time-budget", f"{budget}s")
    # Each step sleeps 0.8 s in the reward, so the 4 steps alone (3.2 s) exceed the 3 s budget on any machine: at
    # 0.4 s an idle machine ran all 4 steps inside the budget and nothing stopped.
    env = {SLEEP: "0.8"}
    sessions = []
    for session in range(5):
        code, log = fork(argv, out.parent / f"budget-{session}.log", env)
        assert code == 0, log
        lines = log.splitlines()
        seconds = json.loads(lines[-1])["seconds"]
        state = json.loads((out / "train_result.json").read_text())
        sessions.append((seconds, state["stopped_early"]))
        resume = [line.removeprefix("to resume: ") for line in lines if line.startswith("to resume: ")]
        if not resume:
            break
        assert seconds < budget, f"session {session} ran {seconds:.2f} s past its budget: {log}"
        stopped = int(state["stopped_early"].split("after step ")[1].split("/")[0])
        assert state["last_checkpoint"] == str(out / "checkpoints" / f"checkpoint-{stopped}")
        assert (out / "checkpoints" / f"checkpoint-{stopped}" / "sdpo_teacher.safetensors").is_file()
        assert (out / "adapter" / "adapter_model.safetensors").is_file()  # exported what was asked
        command = shlex.split(resume[0])
        assert command[:2] == ["sdpo-unsloth", "train"] and command[-1] == "--resume"
        argv = command[1:]
    print(f"time-budget sessions (seconds, stop): {sessions}")  # shown with -s; docs/reliability.md
    assert len(sessions) >= 2, f"the budget never stopped the run: {sessions}"
    assert sessions[-1][1] is None, sessions
    assert_same_weights(out, reference)


def test_hanging_reward_stops_with_an_error_and_saves_nothing_broken(fork, workspace, tiny_model_dir):
    out = workspace / "hang"
    argv = train_argv(workspace, tiny_model_dir, out, "--save-steps", "1", "--reward-timeout", "1")
    started = time.monotonic()
    code, log = fork(argv, out.with_suffix(".log"), {SLEEP: "30:3"})  # the 3rd call hangs for 30 s
    assert time.monotonic() - started < 25, "the run waited for the hung reward"
    errors = [line for line in log.splitlines() if line.startswith("sdpo-unsloth:")]
    assert code == 2 and len(errors) == 1, log
    assert "reward 'HasDigit' did not return within 1 s" in errors[0]
    assert steps_of(out / "checkpoints") == [1, 2]  # steps 1 and 2 saved; step 3 never ran its update
    assert not (out / "checkpoints" / ".sdpo-staging").exists()


@pytest.fixture(scope="module")
def bad_models(workspace, tiny_model_dir):
    """A copy of the tiny model whose tokenizer has no chat template."""
    import shutil

    folders = {}
    for name, drop in (("no-template", ("chat_template",)),):
        folder = workspace / name
        shutil.copytree(tiny_model_dir, folder)
        for file in folder.glob("*.jinja"):
            if "chat_template" in drop:
                file.unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for key in drop:
            config.pop(key, None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        folders[name] = str(folder)
    return folders


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", r"`dataset` is empty"),
        ("no-prompt", r"no 'prompt' column \(columns: \['question', 'answer'\]\); rename"),
        (
            "long-prompt",
            r"prompt \d+ is \d+ tokens; with max_completion_length 6 it needs max_seq_length >= \d+",
        ),
        ("no-template", r"prompts are chat messages but the tokenizer \(\w+\) has no chat template"),
        ("group", r"num_generations \(3\) must divide .* = 4, .* num_generations can be 2, 4"),
        ("unwritable", r"`output_dir` .* cannot be created: .* is a file, not a folder"),
        ("budget", r"`time_budget` must be a positive duration such as 11h30m"),
    ],
)
def test_bad_inputs_fail_before_training_with_one_line(
    fork, workspace, tiny_model_dir, bad_models, case, message
):
    import re

    folder = workspace / f"bad-{case}"
    folder.mkdir()
    model, extra = tiny_model_dir, []
    data = workspace / "data.jsonl"
    if case in ("empty", "no-prompt"):
        data = folder / "data.json"
        data.write_text("[]" if case == "empty" else json.dumps([{"question": "1+1", "answer": "2"}]))
    elif case == "long-prompt":
        extra = ["--max-seq-length", "20"]
    elif case in bad_models:
        model = bad_models[case]
    elif case == "group":
        extra = ["--num-generations", "3"]
    elif case == "budget":
        extra = ["--time-budget", "soon"]
    out = folder / "run"
    if case == "unwritable":
        (folder / "file").write_text("")
        out = folder / "file" / "run"
    argv = train_argv(workspace, model, out, *extra)
    argv[argv.index("--dataset") + 1] = str(data)
    code, log = fork(argv, folder / "log")
    errors = [line for line in log.splitlines() if line.startswith("sdpo-unsloth:")]
    assert code == 2 and len(errors) == 1, log
    assert errors[0].startswith("sdpo-unsloth: error: ") and re.search(message, errors[0]), errors[0]
    assert not (out / "checkpoints").exists()  # nothing trained


# ------------------------------------------------------------------------------------------ units


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_text("")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_rotation_never_deletes_the_only_complete_checkpoint(tmp_path):
    from transformers.trainer_utils import rotate_checkpoints

    from sdpo_unsloth.checkpoints import STAGING_DIR, last_complete_checkpoint, rotate

    for folder in (tmp_path / "hf", tmp_path / "ours"):
        _checkpoint(folder, 2)
        _checkpoint(folder, 3, complete=False)  # an in-place save killed midway (older releases)
        _checkpoint(folder / STAGING_DIR, 4, complete=False)  # a staged save killed midway
    rotate_checkpoints(str(tmp_path / "hf"), save_total_limit=1)
    assert steps_of(tmp_path / "hf") == [3]  # the Trainer's own rotation keeps the broken one only
    assert rotate(tmp_path / "ours", 1) == []
    assert steps_of(tmp_path / "ours") == [2, 3]
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert last_complete_checkpoint(tmp_path / "ours") == str(tmp_path / "ours" / "checkpoint-2")

    _checkpoint(tmp_path / "ours", 5)
    _checkpoint(tmp_path / "ours", 6)
    deleted = rotate(tmp_path / "ours", 2)
    assert steps_of(tmp_path / "ours") == [5, 6]  # the 2 newest complete; the stale incomplete one goes too
    assert sorted(Path(p).name for p in deleted) == ["checkpoint-2", "checkpoint-3"]


def test_time_budget_stops_before_the_next_step_would_cross_it():
    from transformers import TrainerControl, TrainerState

    from sdpo_unsloth.budget import TimeBudget

    now = [0.0]
    budget = TimeBudget("100s", clock=lambda: now[0])
    state, control = TrainerState(max_steps=50), TrainerControl()
    budget.on_train_begin(None, state, control)
    decisions = []
    for step in range(1, 50):
        now[0] += 10.0  # every step takes 10 s; the estimate of the next is 1.25 x 10 s
        state.global_step = step
        budget.on_step_end(None, state, control)
        decisions.append(control.should_training_stop)
        if control.should_training_stop:
            break
    # No save measured yet, so a save is assumed to cost a step too: step 7 ends at 70 s and 70 + 12.5 + 12.5
    # <= 100 goes on; step 8 ends at 80 s and 80 + 12.5 + 12.5 > 100 saves and stops.
    assert decisions == [False] * 7 + [True] and budget.stopped_at == 8 and control.should_save
    # With a measured 2 s save and one export to write after the stop, the stop comes one step later.
    budget = TimeBudget(100, clock=lambda: now[0], after_stop_saves=1)
    now[0], state, control = 0.0, TrainerState(max_steps=50), TrainerControl()
    budget.on_train_begin(None, state, control)
    budget.save_seconds = 2.0
    for step in range(1, 50):
        now[0] += 10.0
        state.global_step = step
        budget.on_step_end(None, state, control)
        if control.should_training_stop:
            break
    assert budget.stopped_at == 9  # 80 + 12.5 + 2 x 2 <= 100; 90 + 12.5 + 4 > 100
    with pytest.raises(ValueError, match="`time_budget` must be a positive duration"):
        TimeBudget("tomorrow")


def test_a_hanging_reward_times_out_and_a_slow_one_is_reported():
    from sdpo_unsloth.rewards.protocol import CheckedReward, RewardTimeout

    def stuck(prompts, completions, **kwargs):
        time.sleep(5)

    started = time.monotonic()
    with pytest.raises(RewardTimeout, match=r"reward 'stuck' did not return within 0.3 s \(reward_timeout\)"):
        CheckedReward(stuck, timeout=0.3)(["p"], ["c"])
    assert time.monotonic() - started < 2

    def slow(prompts, completions, **kwargs):
        time.sleep(1.3)
        return [1.0] * len(completions)

    notes = []
    reward = CheckedReward(slow, timeout=10, slow_after=0.5, on_slow=lambda name, s: notes.append((name, s)))
    assert reward(["p"], ["c"]) == [1.0]
    assert notes[0][0] == "slow" and 1.0 <= notes[0][1] < 1.3 and notes[-1] == ("slow", -1.0)


def test_tokenizer_without_pad_or_eos_and_unwritable_folders(tmp_path, tiny_tokenizer):
    from sdpo_unsloth.preconditions import InputError, check_tokenizer, check_writable

    check_tokenizer(tiny_tokenizer)
    tiny_tokenizer.pad_token = None
    check_tokenizer(tiny_tokenizer)  # TRL pads with the eos token
    tiny_tokenizer.eos_token = None
    with pytest.raises(InputError, match=r"\(Qwen2Tokenizer\) has neither a pad token nor an eos token"):
        check_tokenizer(tiny_tokenizer)

    check_writable(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission case needs a normal user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(InputError, match=r"`output_dir` .*locked/run is not writable"):
        check_writable(locked / "run")
