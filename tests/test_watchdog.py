"""No-op warnings: each fires on a real tiny run built to trigger it, and none fires on a healthy run."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from datasets import Dataset
from test_trainer import grpo_args
from trl import GRPOConfig

from sdpo_unsloth import SDPOConfig, SDPOTrainer
from sdpo_unsloth.api import DEFAULTS
from sdpo_unsloth.watchdog import (
    CLIPPED_MAX,
    MOVE_MIN,
    PATIENCE_STEPS,
    NoOpWarning,
    NoOpWatchdog,
)

STEPS = PATIENCE_STEPS + 1
EOS = 3  # the tiny tokenizer's <|im_end|>


class EvenFirstChar:
    """1.0 when the completion starts with a character of even code (about half), else 0 with feedback."""

    __name__ = "even_first_char"

    def __init__(self, constant: float | None = None, feedback: bool = True):
        self.constant, self.feedback = constant, feedback
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        scores = [float(bool(t) and ord(t[0]) % 2 == 0) for t in texts]
        if self.constant is not None:
            scores = [self.constant] * len(texts)
        self.last_feedback = [
            "" if s or not self.feedback else "Start with an even character." for s in scores
        ]
        return scores


def run(tmp_path, reward=None, model=None, sdpo=None, **overrides) -> tuple[set[str], list[str], SDPOTrainer]:
    tokenizer = make_tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    options = dict(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=DEFAULTS["learning_rate"],
        # A random tiny model rarely ends a completion: favour <|im_end|> so completions end early.
        generation_kwargs={"sequence_bias": {(EOS,): 4.5}},
    )
    options.update(overrides)
    torch.manual_seed(0)
    trainer = SDPOTrainer(
        model=model if model is not None else make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, **options),
        sdpo_config=sdpo or SDPOConfig(diagnostics_samples=0),
        processing_class=tokenizer,
        reward_funcs=[reward or EvenFirstChar()],
        train_dataset=Dataset.from_list(rows),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, NoOpWarning)]
    (watchdog,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, NoOpWatchdog)]
    return watchdog.fired, messages, trainer


def test_healthy_run_at_the_default_learning_rate_warns_nothing(tmp_path):
    fired, messages, trainer = run(tmp_path)
    assert fired == set() and messages == []
    logs = [e for e in trainer.state.log_history if "sdpo/student_relative_change" in e]
    assert len(logs) == STEPS
    moves = [e["sdpo/student_relative_change"] for e in logs[:3]]
    assert sum(moves) / 3 >= MOVE_MIN
    assert sum(e["completions/clipped_ratio"] for e in logs) / STEPS < CLIPPED_MAX  # completions do end


def test_seed_learning_rate_warns_the_student_is_not_moving(tmp_path):
    fired, messages, _ = run(tmp_path, learning_rate=1e-5)
    assert fired == {"student_not_moving"}
    assert "learning_rate=1e-05" in messages[0] and "raise learning_rate" in messages[0]


def _context_blind(model):
    """Zero every attention output projection: each position then sees only its own token, so a teacher
    prompt cannot change the prediction of the completion tokens (and LoRA B stays at 0 on o_proj)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


def test_zero_teacher_student_gap_warns(tmp_path):
    model = _context_blind(make_tiny_model(len(make_tiny_tokenizer())))
    fired, messages, trainer = run(tmp_path, model=model)
    assert "gap_zero" in fired
    assert "teacher-student gap is near zero" in " ".join(messages)
    assert all(
        e["sdpo/teacher_student_kl"] < 1e-6 for e in trainer.state.log_history if "sdpo/frac_masked" in e
    )


def test_every_sample_masked_warns(tmp_path):
    fired, messages, _ = run(tmp_path, reward=EvenFirstChar(constant=0.0, feedback=False))
    assert "all_masked" in fired and "gap_zero" not in fired and "student_not_moving" not in fired
    assert any("success_reward_threshold=1" in m and "last_feedback" in m for m in messages)


def test_a_generation_serving_two_steps_keeps_the_streaks(tmp_path):
    """With num_iterations=2 only every other step generates and logs the rollout metrics (reward_std,
    sdpo/frac_masked): the steps between must not reset the streaks, or nothing ever warns."""
    fired, _, _ = run(
        tmp_path, reward=EvenFirstChar(constant=0.0, feedback=False), num_iterations=2, max_steps=2 * STEPS
    )
    assert {"all_masked", "rewards_constant"} <= fired


def test_constant_rewards_warn(tmp_path):
    fired, messages, _ = run(tmp_path, reward=EvenFirstChar(constant=0.0))  # feedback keeps samples active
    assert fired == {"rewards_constant"}
    assert "reward_std = 0" in messages[0]


def test_truncated_completions_warn(tmp_path):
    # <|im_end|> never sampled: every completion runs into the 4-token budget
    options = dict(max_completion_length=4, generation_kwargs={"suppress_tokens": [EOS]})
    fired, messages, _ = run(tmp_path / "zero", reward=EvenFirstChar(constant=0.0), **options)
    assert "truncated" in fired
    assert any("100% of completions" in m and "max_completion_length=4" in m for m in messages)
    fired, _, _ = run(tmp_path / "scored", **options)  # cut, yet about half succeed: it can learn
    assert "truncated" not in fired


def test_warnings_can_be_switched_off(tmp_path):
    with pytest.raises(ValueError, match="diagnostics_samples"):
        SDPOConfig(diagnostics_samples=-1)
    tokenizer = make_tiny_tokenizer()
    trainer = SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4),
        sdpo_config=SDPOConfig(warn_noop=False),
        processing_class=tokenizer,
        reward_funcs=[EvenFirstChar()],
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
    )
    assert not any(isinstance(c, NoOpWatchdog) for c in trainer.callback_handler.callbacks)
