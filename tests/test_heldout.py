"""The held-out monitor of `train()`: scored inside the real loop, logged, and a warning on a regression only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from datasets import Dataset
from test_trainer import grpo_args
from test_watchdog import EOS, EvenFirstChar

from sdpo_unsloth import SDPOConfig, SDPOTrainer
from sdpo_unsloth.heldout import (
    ConstantAnswerWarning,
    EchoAnswerWarning,
    HeldOutMonitor,
    RegressionWarning,
    significant_drop,
)
from sdpo_unsloth.train_config import SDPO_DEFAULTS

STEPS = 4


def monitored_run(
    tmp_path,
    scores,
    sdpo=None,
    before=0.5,
    rows=32,
    completions=None,
    category=RegressionWarning,
    reward=None,
    questions=None,
    beta=0.0,
):
    """Train STEPS tiny steps with a monitor every step whose evaluation returns `scores` (and puts
    `completions`, one list of (completion, score) per evaluation, into its `graded`) in turn; the messages of
    `category` warnings."""
    tokenizer = make_tiny_tokenizer()
    data = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    torch.manual_seed(0)
    trainer = SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(
            tmp_path,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_steps=STEPS,
            generation_kwargs={"sequence_bias": {(EOS,): 4.5}},
            beta=beta,
        ),
        sdpo_config=sdpo or SDPOConfig(diagnostics_samples=0, warn_noop=False),
        processing_class=tokenizer,
        reward_funcs=[reward or EvenFirstChar()],
        train_dataset=Dataset.from_list(data),
    )
    queue = list(scores)
    said = list(completions) if completions is not None else None
    calls = []

    def evaluate(graded):
        calls.append(trainer.state.global_step)
        if said is not None:
            graded.extend(said.pop(0))
        return queue.pop(0)

    monitor = HeldOutMonitor(trainer, evaluate, before, rows, every=1, questions=questions)
    trainer.add_callback(monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, category)]
    return trainer, monitor, calls, messages


def test_a_falling_score_warns_once_and_names_the_default_hybrid(tmp_path):
    trainer, monitor, calls, messages = monitored_run(tmp_path, [0.45, 0.2, 0.1])
    assert monitor.scores == [(1, 0.45), (2, 0.2), (3, 0.1)]
    assert calls == [1, 2, 3]  # every step but the last, which train() scores itself
    logged = [
        (e["step"], e["eval/heldout_score"]) for e in trainer.state.log_history if "eval/heldout_score" in e
    ]
    assert logged == [(1, 0.45), (2, 0.2), (3, 0.1)]
    assert len(messages) == 1  # at step 2 (0.5 -> 0.2 on 32 rows), not again at step 3
    assert "0.500 before, 0.200 after 2 steps" in messages[0]
    assert f"hybrid_mode='{SDPO_DEFAULTS['hybrid_mode']}'" in messages[0]
    assert "prompt groups had rewards that differ" in messages[0]


def test_a_score_within_noise_does_not_warn(tmp_path):
    _, monitor, _, messages = monitored_run(tmp_path, [0.45, 0.40, 0.38])
    assert messages == [] and not monitor.warned
    with pytest.warns(RegressionWarning, match="0.500 before, 0.100 after 4 steps"):
        monitor.check(STEPS, 0.1)  # the final score, as train() passes it
    assert monitor.warned


@pytest.mark.parametrize(
    ("mode", "distils"),
    [
        ("per_group", "where a group's rewards are equal"),
        ("failed_groups", "only in groups where every sample failed"),
        ("failures", "on every failed sample"),
    ],
)
def test_the_advice_follows_the_configuration(tmp_path, mode, distils):
    """A group hybrid at weight 1 that lowers the score is told what it is (where it distils) and what else to try."""
    sdpo = SDPOConfig(diagnostics_samples=0, warn_noop=False, grpo_weight=1.0, hybrid_mode=mode)
    _, _, _, messages = monitored_run(tmp_path, [0.1, 0.1, 0.1], sdpo=sdpo)
    assert len(messages) == 1 and f"distillation {distils}" in messages[0]
    assert (
        "Lower learning_rate" in messages[0]
        and "grpo_weight=0" in messages[0]
        and "enabled=False" in messages[0]
    )
    assert "SDPOConfig(distill_anchor=0.1)" in messages[0]  # the KL anchor, not on in this run


@pytest.mark.parametrize(("anchor", "beta"), [(0.0, 0.1), (0.1, 0.0)])
def test_the_advice_does_not_name_the_kl_anchor_to_a_run_that_has_it(tmp_path, anchor, beta):
    sdpo = SDPOConfig(
        diagnostics_samples=0,
        warn_noop=False,
        grpo_weight=1.0,
        hybrid_mode="per_group",
        distill_anchor=anchor,
    )
    _, _, _, messages = monitored_run(tmp_path, [0.1, 0.1, 0.1], sdpo=sdpo, beta=beta)
    assert len(messages) == 1 and "Lower learning_rate" in messages[0]
    assert "beta=" not in messages[0] and "distill_anchor=" not in messages[0]


@pytest.mark.parametrize(
    "sdpo",
    [
        SDPOConfig(diagnostics_samples=0, warn_noop=False),  # pure SDPO
        SDPOConfig(diagnostics_samples=0, warn_noop=False, grpo_weight=1.0, hybrid_mode="per_group"),
    ],
)
def test_the_advice_when_no_sample_ever_succeeds(tmp_path, sdpo):
    """Every sample fails (reward 0, with feedback): no group's rewards differ, so every update is distillation of
    the feedback and GRPO would not have moved. The advice says so instead of naming a hybrid as the cure."""
    _, monitor, _, messages = monitored_run(
        tmp_path, [0.45, 0.45, 0.45], sdpo=sdpo, reward=EvenFirstChar(constant=0.0)
    )
    assert messages == []
    with pytest.warns(RegressionWarning) as caught:
        monitor.check(STEPS, 0.1)  # the final score, as train() passes it: 4 batches, none with a signal
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "in 4 generation batches" in messages[0]
    assert "No prompt group had rewards that differ" in messages[0]
    assert "enabled=False" in messages[0] and "easier version of the task" in messages[0]
    assert "still weighs on groups where GRPO has a signal" not in messages[0]


@pytest.mark.parametrize(
    ("before", "score", "rows", "expected"),
    [
        (0.438, 0.220, 32, True),  # the panel's pure-SDPO run on basic_arithmetic, seed 0
        (0.600, 0.550, 20, False),  # the code task: within the noise of 20 problems
        (0.0, 0.0, 32, False),
        (1.0, 0.8, 1000, True),  # near 1 the floor keeps the threshold from vanishing, but 0.2 is past it
        (0.5, 0.46, 10_000, False),  # many rows: MIN_DROP still applies
    ],
)
def test_significant_drop(before, score, rows, expected):
    assert significant_drop(before, score, rows) is expected


def test_one_completion_for_most_questions_warns_once_with_it(tmp_path):
    """Inside the real loop: varied completions say nothing; 'The answer is 2.' for 21 of 32 rows, right on 17
    and wrong on 4 (the panel's count_bits, pure SDPO seed 2), warns once (a rising score does not hide it),
    naming the completion and, for pure SDPO, train()'s default hybrid."""
    varied = [(f"{i} has {i % 3} ones.", float(i % 2)) for i in range(32)]
    constant = [("The answer is 2.", 1.0)] * 17 + [("The answer is 2.", 0.0)] * 4 + [("1", 0.0)] * 11
    _, monitor, _, messages = monitored_run(
        tmp_path,
        [0.45, 0.56, 0.56],
        completions=[varied, constant, constant],
        category=ConstantAnswerWarning,
        sdpo=SDPOConfig(diagnostics_samples=0, warn_noop=False),
    )
    assert len(messages) == 1 and monitor.constant == (2, "The answer is 2.", 21)
    assert "same completion to 21 of 32 held-out questions after 2 steps: 'The answer is 2.'" in messages[0]
    assert "score (0.560)" in messages[0] and f"hybrid_mode='{SDPO_DEFAULTS['hybrid_mode']}'" in messages[0]


@pytest.mark.parametrize(
    "graded",
    [
        [("Yes.", 1.0)] * 20
        + [("No.", 1.0)] * 12,  # one answer for most rows, right on all: it may be the answer
        [("Yes.", 1.0)] * 10 + [("Yes.", 0.0)] * 5 + [("No.", 1.0)] * 17,  # mixed, but under half the rows
    ],
)
def test_a_common_completion_that_may_answer_the_question_does_not_warn(tmp_path, graded):
    _, monitor, _, messages = monitored_run(
        tmp_path, [0.5, 0.5, 0.5], completions=[graded] * 3, category=ConstantAnswerWarning
    )
    assert messages == [] and monitor.constant is None


def test_an_evaluation_timeout_says_the_run_goes_on():
    """RewardTimeout's own message speaks of a stopped training step; in an evaluation the run goes on, and the
    warning says so, with the reward, its timeout, and that the hung call still runs."""
    from sdpo_unsloth.heldout import EvaluationWarning, guarded_score
    from sdpo_unsloth.rewards.protocol import RewardTimeout

    def hangs(graded):
        raise RewardTimeout("training stopped before this step's update", "judge", 30.0)

    errors: list = []
    with pytest.warns(EvaluationWarning) as caught:
        assert guarded_score(hangs, [("x", 1.0)], 4, errors, final=True) is None
    text = str(caught[0].message)
    assert "reward 'judge' did not return within 30 s" in text and "still runs in a background thread" in text
    assert "training stopped" not in text and "exported anyway" in text
    assert errors[0]["step"] == 4 and errors[0]["evaluation"] == "final"
    assert errors[0]["error"].startswith("RewardTimeout: reward 'judge' did not return within 30 s")


LCM = [(a, b) for a in range(2, 10) for b in (2, 3, 4, 5)]  # 32 questions


@pytest.mark.parametrize(
    ("said", "scored", "warns"),
    [
        (lambda a, b: a, lambda a, b: float(a % b == 0), True),  # the first number: right where b divides a
        (
            lambda a, b: a * b // math.gcd(a, b),
            lambda a, b: 1.0,
            False,
        ),  # computed: not a number of the question
        (lambda a, b: max(a, b), lambda a, b: 1.0, False),  # repeated but always right (it may be the task)
    ],
)
def test_answers_that_repeat_the_question_warn_once(tmp_path, said, scored, warns):
    """Inside the real loop: held-out answers that end on a number of their own question, right on some rows and
    wrong on others, warn once (EchoAnswerWarning); computed answers, or repeated ones that are always right, do
    not."""
    questions = [f"Find the LCM of {a} and {b}." for a, b in LCM]
    graded = [(f"The LCM is {said(a, b)}.", scored(a, b)) for a, b in LCM]
    _, monitor, _, messages = monitored_run(
        tmp_path, [0.3, 0.3, 0.3], completions=[graded] * 3, category=EchoAnswerWarning, questions=questions
    )
    assert len(messages) == int(warns)
    if warns:
        right = sum(1 for _, s in graded if s == 1.0)
        assert monitor.echo == (1, 32, right)
        assert (
            f"ends 32 of 32 held-out answers on a number that its own question states, after 1 steps (right on {right} of them)"
            in messages[0]
        )
    else:
        assert monitor.echo is None
