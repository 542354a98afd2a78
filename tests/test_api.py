"""`sdpo_unsloth.train(...)` on a tiny saved model (CPU, offline): end to end, config merging, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

from sdpo_unsloth import SDPOConfig, train
from sdpo_unsloth.api import TrainResult, UsageError, last_complete_checkpoint
from sdpo_unsloth.data import _resolve_dataset, _resolve_rewards
from sdpo_unsloth.evaluate import evaluate_with_reward
from sdpo_unsloth.report import _plot_rewards
from sdpo_unsloth.train_config import _build_grpo_config, _build_sdpo_config, _device_settings

TINY = {  # 2 optimizer steps of 4 completions (1 prompt x 4 generations), 6 new tokens, no progress bar
    "max_steps": 2,
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 6,
    "learning_rate": 5e-2,
    "lora_r": 4,
    "eval_size": 4,
    "eval_batch_size": 4,
    "progress": False,
    "seed": 7,
}


def rows(n: int = 24) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a in range(5)
        for b in range(5)
    ][:n]


class HasDigit:
    """1.0 when the completion contains a digit, with feedback naming the answer otherwise."""

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        hits = [any(ch.isdigit() for ch in t) for t in texts]
        self.last_feedback = [
            "" if hit else f"The answer is {a}." for hit, a in zip(hits, answer, strict=True)
        ]
        return [float(hit) for hit in hits]


def test_train_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    result = train(tiny_model_dir, rows(), HasDigit(), str(tmp_path / "run"), **TINY)
    assert isinstance(result, TrainResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.after = 1.0  # type: ignore[misc]
    assert 0.0 <= result.before <= 1.0 and 0.0 <= result.after <= 1.0
    run = Path(result.output_dir)
    for path in (
        Path(result.adapter_dir) / "adapter_model.safetensors",
        Path(result.merged_dir) / "model.safetensors",
        Path(result.reward_curve_png),
        run / "train_result.json",
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    steps = [entry for entry in result.log_history if "reward" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert "sdpo/grpo_loss" in result.metrics and result.metrics["step"] == 2  # the per-group hybrid default
    adapter = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert not any("sdpo_teacher" in key for key in adapter)
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # B starts at 0: the student trained
    summary = json.loads((run / "train_result.json").read_text())
    assert summary["before"] == result.before and summary["eval_size"] == 4
    mid = [e for e in result.log_history if "eval/heldout_score" in e]  # the default: once, halfway
    assert [e["step"] for e in mid] == [1] and 0.0 <= mid[0]["eval/heldout_score"] <= 1.0
    assert summary["heldout_scores"] == [{"step": 1, "score": mid[0]["eval/heldout_score"]}]
    merged = json.loads((Path(result.merged_dir) / "sdpo_export.json").read_text())
    assert merged["verification"]["merged_vs_trained_model"]["passed"]
    assert merged["sdpo_config"]["alpha"] == 0.5
    assert (merged["sdpo_config"]["grpo_weight"], merged["sdpo_config"]["hybrid_mode"]) == (1.0, "per_group")


def test_train_can_export_a_gguf_file(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = train(
        tiny_model_dir,
        rows(),
        HasDigit(),
        str(tmp_path / "run"),
        **{**TINY, "max_steps": 1, "eval_size": 0, "plot": False},
        export_formats=("gguf",),
    )
    assert result.adapter_dir is None and result.gguf_file and result.gguf_file.endswith("-sdpo-q8_0.gguf")
    gguf = Path(result.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert model.config.model_type == "qwen2"
    summary = json.loads((Path(result.output_dir) / "train_result.json").read_text())
    assert summary["gguf_file"] == result.gguf_file


def test_resume_skips_an_incomplete_checkpoint(tmp_path, tiny_model_dir):
    """SPEC §5: a runtime killed mid-save leaves a newer checkpoint without trainer_state.json."""
    options = {**TINY, "eval_size": 0, "export_formats": (), "plot": False}
    out = tmp_path / "run"
    train(tiny_model_dir, rows(), HasDigit(), str(out), save_steps=1, **options)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    (checkpoints / "checkpoint-2" / "trainer_state.json").unlink()  # the "killed mid-save" checkpoint
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        result = train(
            tiny_model_dir, rows(), HasDigit(), str(out), resume=True, **{**options, "max_steps": 3}
        )
    assert result.resumed_from == str(checkpoints / "checkpoint-1")
    assert [e["step"] for e in result.log_history if "reward" in e] == [1, 2, 3]  # step 1 from the checkpoint
    assert result.before is None  # a resumed run's starting point is not re-measured


def test_last_complete_checkpoint(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((3, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    with pytest.warns(UserWarning, match="checkpoint-12"):
        assert last_complete_checkpoint(tmp_path) == str(
            tmp_path / "checkpoint-10"
        )  # numeric, not text order


def test_flat_knobs_override_the_config_objects(tmp_path):
    from trl import GRPOConfig

    sdpo = _build_sdpo_config(
        SDPOConfig(alpha=0.2, teacher_update_rate=0.3, distillation_topk=7),
        alpha=1.0,
        distillation_topk="full",
    )
    assert (sdpo.alpha, sdpo.teacher_update_rate, sdpo.distillation_topk) == (1.0, 0.3, None)
    assert _build_sdpo_config(None, alpha=None).alpha == 0.5  # None = keep the default
    kit = _build_sdpo_config(None)
    # train()'s default: the per-group hybrid with the KL anchor
    assert (kit.grpo_weight, kit.hybrid_mode, kit.distill_anchor) == (1.0, "per_group", 0.1)
    pure = _build_sdpo_config(None, grpo_weight=0.0)
    # asked for pure SDPO: the seed's loss, no anchor (unless asked for too)
    assert (pure.grpo_weight, pure.hybrid_mode, pure.distill_anchor) == (0.0, "fixed", 0.0)
    assert _build_sdpo_config(None, grpo_weight=0.0, distill_anchor=0.2).distill_anchor == 0.2
    grpo_only = _build_sdpo_config(None, hybrid_mode="fixed")  # w 1 on every sample: nothing distilled
    assert (grpo_only.grpo_weight, grpo_only.distill_anchor) == (1.0, 0.0)
    assert _build_sdpo_config(None, hybrid_mode="fixed", grpo_weight=0.5).distill_anchor == 0.1  # it distils
    assert _build_sdpo_config(None, hybrid_mode="failed_groups").distill_anchor == 0.1
    seed = _build_sdpo_config(SDPOConfig())
    # a config passed is taken as is
    assert (seed.grpo_weight, seed.hybrid_mode, seed.distill_anchor) == (0.0, "fixed", 0.0)
    assert _build_sdpo_config(SDPOConfig(), distill_anchor=0.2).distill_anchor == 0.2
    assert _build_sdpo_config(None, distill_anchor=0.3).distill_anchor == 0.3

    user = GRPOConfig(
        output_dir="elsewhere",
        learning_rate=1e-3,
        num_generations=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        weight_decay=0.2,
    )
    args = _build_grpo_config(user, "cpu", tmp_path / "ck", num_generations=4, per_device_train_batch_size=4)
    assert (args.learning_rate, args.weight_decay) == (1e-3, 0.2)  # kept from the object
    assert (args.num_generations, args.per_device_train_batch_size, args.generation_batch_size) == (4, 4, 4)
    assert args.output_dir == str(tmp_path / "ck") and args.remove_unused_columns is False

    default = _build_grpo_config(None, "cpu", tmp_path / "ck")
    assert (default.bf16, default.fp16, default.gradient_checkpointing) == (False, False, False)
    assert default.max_steps == 100 and default.optim == "adamw_torch" and default.report_to == []


def test_device_settings_pick_fp16_on_a_t4(monkeypatch):
    # torch on a T4 (sm_75): bf16 "supported" by emulation (the default), not natively
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    t4 = _device_settings("cuda")
    assert (t4["bf16"], t4["fp16"], t4["optim"], t4["gradient_checkpointing"]) == (
        False,
        True,
        "adamw_8bit",
        True,
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _device_settings("cuda")["bf16"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dataset": "arithmetic"},
            r"unknown dataset 'arithmetic': use a built-in task \(addition, code, humaneval, gym:",
        ),
        ({"dataset": []}, r"`dataset` is empty"),
        ({"dataset": [{"question": "1+1"}]}, r"no 'prompt' column \(columns: \['question'\]\); rename"),
        (
            {"dataset": rows(8), "eval_size": 8},
            r"`eval_size` \(8\) must be smaller than the dataset \(8 rows\)",
        ),
        ({"dataset": rows(8), "rewards": None}, r"`rewards` is missing"),
        ({"dataset": rows(8), "rewards": "exactness"}, r"unknown reward 'exactness'"),
        (
            {"dataset": rows(8), "rewards": HasDigit},
            r"reward HasDigit is a class; pass an instance, HasDigit\(\)",
        ),
        (
            {"dataset": rows(8), "export_formats": ("onnx",)},
            r"`export_formats` may hold lora, merged_16bit, gguf",
        ),
        ({"dataset": rows(8), "num_generations": 3}, r"divisible by num_generations"),
        ({"dataset": rows(8), "resume": "/nonexistent/ck"}, r"neither a complete checkpoint"),
        (
            {"dataset": rows(8), "export_formats": ("merged_16bit",)},
            r"merged is not empty and is not an sdpo_unsloth",
        ),
        (
            {"dataset": rows(8), "eval_size": 2, "eval_dataset": rows(2)},
            r"`eval_size` .* or `eval_dataset`, not both",
        ),
        ({"dataset": rows(8), "eval_dataset": "addition"}, r"not the task name 'addition'"),
        ({"dataset": rows(8), "eval_dataset": [{"q": "1+1"}]}, r"`eval_dataset` has no 'prompt' column"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, kwargs, message):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("not an export")  # found before training, not after
    kwargs = {"rewards": HasDigit(), "output_dir": str(tmp_path), "export_formats": ("lora",), **kwargs}
    with pytest.raises(UsageError, match=message) as info:
        train("no-model/needed", **kwargs)  # fails before any model is loaded
    assert "\n" not in str(info.value)


def test_builtin_tasks_bring_their_rewards():
    from sdpo_unsloth.rewards.code import CodeExecutionReward
    from sdpo_unsloth.tasks.addition import AdditionReward

    data, task = _resolve_dataset("addition", 40, seed=1)
    assert task == "addition" and len(data) == 40 and {"prompt", "answer"} <= set(data.column_names)
    assert len(_resolve_dataset("addition", 5000, seed=1)[0]) == 100  # capped at the 1-digit pool
    assert isinstance(_resolve_rewards(None, "addition")[0], AdditionReward)
    data, task = _resolve_dataset("code", 40, seed=1)
    assert task == "code" and "tests" in data.column_names
    assert isinstance(_resolve_rewards(["code"], None)[0], CodeExecutionReward)


def test_reward_from_a_file(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def short(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    (reward,) = _resolve_rewards(f"{tmp_path / 'my_reward.py'}:short", None)
    assert reward(prompts=["p"], completions=["c"]) == [1.0]


def test_generic_evaluation_scores_greedy_completions_with_the_first_reward():
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = make_tiny_model(len(tokenizer))
    seen = []

    def length_reward(prompts, completions, target, **kwargs):
        seen.extend(completions)
        return [float(len(c) <= t) for c, t in zip(completions, target, strict=True)]

    data = [{"prompt": f"{i}+{i}=", "target": 100 if i % 2 else -1} for i in range(5)]  # plain-text prompts
    score = evaluate_with_reward(model, tokenizer, data, length_reward, max_new_tokens=3, batch_size=2)
    assert score == pytest.approx(2 / 5)  # odd rows pass, even rows cannot
    assert len(seen) == 5 and all(isinstance(c, str) for c in seen)
    assert tokenizer.padding_side == "right" and model.training  # restored


def test_reward_curve_is_optional(tmp_path, monkeypatch):
    import importlib.util

    history = [{"step": 1, "reward": 0.1, "sdpo/distill_loss": 0.5}, {"step": 2, "reward": 0.4}]
    png = _plot_rewards(history, tmp_path / "curve.png", 0.0, 0.5)
    assert png and Path(png).read_bytes()[:4] == b"\x89PNG"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _plot_rewards(history, tmp_path / "none.png", None, None) is None
    assert any("pip install matplotlib" in str(w.message) for w in caught)


@pytest.mark.parametrize("eval_steps", [None, 0])
def test_train_warns_when_one_completion_answers_most_held_out_rows(
    tmp_path, tiny_model_dir, monkeypatch, eval_steps
):
    """train() hands its evaluations' completions to the constant check: at the halfway evaluation (monitor)
    and at the final one (also without a monitor, eval_steps=0). The real greedy evaluation runs; its texts
    are then replaced by one completion for every row, right on half of them, as a collapsed student gives."""
    import sdpo_unsloth.api as api
    from sdpo_unsloth.heldout import ConstantAnswerWarning

    real = api.evaluate_model
    seen = []

    def constant_texts(*args, graded=None, **kwargs):
        score = real(*args, graded=graded, **kwargs)
        if graded is not None:
            seen.append(len(graded))
            graded[:] = [("The answer is 2.", float(i % 2)) for i in range(len(graded))]  # right on half
        return score

    monkeypatch.setattr(api, "evaluate_model", constant_texts)
    with pytest.warns(
        ConstantAnswerWarning, match=r"same completion to 8 of 8 held-out questions after (1|2) steps"
    ):
        train(
            tiny_model_dir,
            rows(),
            HasDigit(),
            str(tmp_path / "run"),
            **{**TINY, "eval_size": 8},
            eval_steps=eval_steps,
        )
    assert seen == ([8, 8] if eval_steps is None else [8])  # halfway + final, or the final alone


def test_train_warns_when_most_held_out_answers_repeat_their_question(tmp_path, tiny_model_dir, monkeypatch):
    """train() hands each held-out row's question to the monitor: completions that end on a number of their own
    question ("3+1=" -> "It is 3."), right on half the rows, warn once (EchoAnswerWarning), naming how many rows
    and how many of them were right."""
    import re

    import sdpo_unsloth.api as api
    from sdpo_unsloth.heldout import EchoAnswerWarning

    real = api.evaluate_model

    def echoed_texts(model, tokenizer, eval_rows, *args, graded=None, **kwargs):
        score = real(model, tokenizer, eval_rows, *args, graded=graded, **kwargs)
        if graded is not None:
            firsts = [re.findall(r"\d+", row["prompt"][-1]["content"])[0] for row in eval_rows]
            graded[:] = [(f"It is {first}.", float(i % 2)) for i, first in enumerate(firsts)]
        return score

    monkeypatch.setattr(api, "evaluate_model", echoed_texts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_model_dir, rows(), HasDigit(), str(tmp_path / "run"), **{**TINY, "eval_size": 8})
    echoes = [str(w.message) for w in caught if issubclass(w.category, EchoAnswerWarning)]
    assert len(echoes) == 1
    assert "ends 8 of 8 held-out answers on a number that its own question states" in echoes[0]
    assert "right on 4 of them" in echoes[0]


def test_a_failing_evaluation_costs_its_score_not_the_trained_student(tmp_path, tiny_model_dir):
    """An LLM judge that fails (503) in every evaluation after the first: the halfway score is skipped with a
    warning, the final one is None, and the adapter is exported all the same, with the errors recorded."""
    from sdpo_unsloth.heldout import EvaluationWarning

    evaluations = []

    def judge(prompts, completions, trainer_state=None, **kwargs):
        if trainer_state is None:  # an evaluation: training calls pass the TrainerState
            evaluations.append(len(completions))
            if len(evaluations) > 1:
                raise ConnectionError("judge API: 503 Service Unavailable")
        return [0.5 + 0.1 * (i % 2) for i in range(len(completions))]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(
            tiny_model_dir,
            rows(),
            judge,
            str(tmp_path / "run"),
            **{**TINY, "preflight": False, "plot": False, "export_formats": ("lora",)},
        )
    failed = [str(w.message) for w in caught if issubclass(w.category, EvaluationWarning)]
    assert len(evaluations) == 3 and len(failed) == 2  # before, halfway (step 1), final (step 2)
    assert failed[0].startswith("the held-out evaluation after 1 steps failed, so its score is missing")
    assert (
        "ConnectionError: judge API: 503" in failed[1] and "exported anyway and `after` is None" in failed[1]
    )
    assert result.before == 0.55 and result.after is None
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    summary = json.loads((Path(result.output_dir) / "train_result.json").read_text())
    assert summary["after"] is None and summary["heldout_scores"] == []
    errors = [(e["step"], e["evaluation"]) for e in summary["evaluation_errors"]]
    assert errors == [(1, "held-out"), (2, "final")] and "503" in summary["evaluation_errors"][1]["error"]


def test_a_reward_failing_mid_run_saves_the_completed_steps_to_resume_from(tmp_path, tiny_model_dir):
    """No save_steps: a reward raising at step 3 still leaves checkpoint-2, named in the error with how to
    resume; resume=True then finishes the run from it."""
    from sdpo_unsloth import RewardError

    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # one call per step: step 3
            raise ZeroDivisionError("division by zero")
        return [0.5 + 0.1 * (i % 2) for i in range(len(completions))]

    out = tmp_path / "run"
    options = {
        **TINY,
        "max_steps": 4,
        "eval_size": 0,
        "preflight": False,
        "plot": False,
        "export_formats": (),
    }
    with pytest.raises(RewardError) as info:
        train(tiny_model_dir, rows(), flaky, str(out), **options)
    saved = out / "checkpoints" / "checkpoint-2"
    message = str(info.value)
    assert "raised ZeroDivisionError: division by zero" in message and "**kwargs" not in message
    assert f"stopped in optimizer step 3 of 4; steps 1-2 completed and {saved} holds them" in message
    assert "resume=True" in message and "--resume" in message
    assert last_complete_checkpoint(out / "checkpoints") == str(saved)
    result = train(tiny_model_dir, rows(), flaky, str(out), resume=True, **options)
    assert result.resumed_from == str(saved)
    assert [e["step"] for e in result.log_history if "reward" in e] == [1, 2, 3, 4]


def test_held_out_scores_and_the_starting_score_survive_a_resume(tmp_path, tiny_model_dir):
    """The starting score and the scores so far are kept in the checkpoint: after resume=True the regression
    check still compares with the first session's starting score, and train_result.json keeps every score."""
    from sdpo_unsloth.heldout import RegressionWarning

    held_out = {"score": 1.0}

    def reward(prompts, completions, trainer_state=None, **kwargs):
        if trainer_state is None:  # an evaluation
            return [held_out["score"]] * len(completions)
        return [0.5 + 0.1 * (i % 2) for i in range(len(completions))]

    out = tmp_path / "run"
    options = {
        **TINY,
        "eval_steps": 1,
        "save_steps": 1,
        "preflight": False,
        "plot": False,
        "export_formats": (),
    }
    first = train(tiny_model_dir, rows(), reward, str(out), **options)
    assert first.before == 1.0
    held_out["score"] = 0.0  # the second session's evaluations fall
    with pytest.warns(RegressionWarning, match="1.000 before, 0.000 after 3 steps"):
        second = train(tiny_model_dir, rows(), reward, str(out), resume=True, **{**options, "max_steps": 4})
    assert second.resumed_from == str(out / "checkpoints" / "checkpoint-2")
    assert second.before == 1.0 and second.after == 0.0
    summary = json.loads((out / "train_result.json").read_text())
    assert summary["before"] == 1.0
    assert summary["heldout_scores"] == [{"step": 1, "score": 1.0}, {"step": 3, "score": 0.0}]


def test_reward_timeout_0_runs_a_signal_based_reward_in_training_and_evaluation(tmp_path, tiny_model_dir):
    """signal.alarm works only in the main thread: reward_timeout=0 (no limit) calls the reward there, in the
    before/after evaluations too."""
    import signal

    def with_alarm(prompts, completions, **kwargs):
        previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
        signal.alarm(5)
        try:
            return [0.5 + 0.1 * (i % 2) for i in range(len(completions))]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    result = train(
        tiny_model_dir,
        rows(),
        with_alarm,
        str(tmp_path / "run"),
        reward_timeout=0,
        **{**TINY, "max_steps": 1, "preflight": False, "plot": False, "export_formats": ()},
    )
    assert result.before == 0.55 and result.after == 0.55
    assert (
        json.loads((tmp_path / "run" / "train_result.json").read_text())["sdpo_config"]["reward_timeout"]
        is None
    )


def test_an_async_reward_scores_the_evaluations_too(tmp_path, tiny_model_dir):
    """TRL awaits an `async def` reward in training; the before/after evaluations called it as a plain function
    and stopped on the coroutine it returned ("returned an awaitable from a plain call")."""

    async def graded(prompts, completions, **kwargs):
        return [0.5 + 0.1 * (i % 2) for i in range(len(completions))]

    result = train(
        tiny_model_dir,
        rows(),
        graded,
        str(tmp_path / "run"),
        **{**TINY, "max_steps": 1, "preflight": False, "plot": False, "export_formats": ()},
    )
    assert result.before == 0.55 and result.after == 0.55


def test_evaluating_a_4bit_model_on_cpu_leaves_its_gradients_as_they_were(tiny_model_dir):
    """An eval-mode forward makes bitsandbytes repack 4-bit weights for CPU inference (on CPUs with
    avx512_bf16), and the LoRA gradients through them were wrong afterwards: train() evaluates before training,
    so every step of a `load_in_4bit=True` CPU run was. Evaluation now generates such a model in training mode
    with dropout off."""
    from sdpo_unsloth.evaluate import greedy_completions
    from sdpo_unsloth.model import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(
        tiny_model_dir,
        load_in_4bit=True,
        backend="transformers",
        teacher_adapter=None,
        gradient_checkpointing=False,
    )
    ids = tokenizer(["1+1=2", "2+2=4"], return_tensors="pt", padding=True)
    model.train()

    def lora_grads():
        model.zero_grad()
        model(**ids, labels=ids["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with torch.no_grad():  # a trained-like adapter, so gradients reach every LoRA tensor
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before = lora_grads()
    assert before
    (batch,) = greedy_completions(model, tokenizer, [{"prompt": "3+3="}], max_new_tokens=2, batch_size=1)
    assert model.training and len(batch[1]) == 1
    after = lora_grads()
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "device", "explicit", "expected"),
    [
        ("embedded", "cuda", None, False),  # dequantised from a 4-bit GGUF: not quantised again
        ("some/hub-model", "cuda", None, True),
        ("some/hub-model", "cpu", None, False),
        ("embedded", "cuda", True, True),  # what the caller asks for wins
        ("some/hub-model", "cuda", False, False),
    ],
)
def test_the_4bit_default_skips_the_embedded_model(load_stopped_on, model, device, explicit, expected):
    """Whether `train()`'s loading quantises the base, per model and device (stopped at `from_pretrained`)."""
    from types import SimpleNamespace

    from sdpo_unsloth.api import _load_student
    from sdpo_unsloth.bootstrap import Backend

    seen = load_stopped_on(device)
    args = SimpleNamespace(bf16=False, fp16=device == "cuda", gradient_checkpointing=False, seed=0)
    with pytest.raises(RuntimeError, match="stop here"):
        _load_student(
            model,
            Backend("transformers", device, "test"),
            args,
            SDPOConfig(),
            None,
            load_in_4bit=explicit,
            max_seq_length=64,
        )
    assert seen["path"] == model and seen["load_in_4bit"] is expected


def test_load_model_defaults_to_trains_base(tiny_model_dir):
    """`load_model` without `load_in_4bit` follows `train()`: no nf4 on CPU (it quantised everywhere before)."""
    import bitsandbytes as bnb

    from sdpo_unsloth import load_model
    from sdpo_unsloth.model import default_load_in_4bit

    model, _ = load_model(tiny_model_dir, backend="transformers", lora_r=4, gradient_checkpointing=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert default_load_in_4bit("some/hub-model", "cuda") and not default_load_in_4bit("embedded", "cuda")
    assert not default_load_in_4bit("some/hub-model", "cpu")
