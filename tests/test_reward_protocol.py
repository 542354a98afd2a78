"""The reward protocol: three ways to give feedback, and clear errors for every broken shape."""

from __future__ import annotations

import math

import pytest

from sdpo_unsloth.rewards import CheckedReward, RewardError, RewardResult, combine_feedback

COMPLETIONS = ["7", "5", "x"]
PROMPTS = ["3+4?"] * 3


def plain(prompts, completions, **kwargs):
    return [1.0 if c == "7" else 0.0 for c in completions]


class SeedStyle:
    """The seed's callable class with last_feedback."""

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.last_feedback = ["" if c == "7" else f"Wrong. The answer is 7, not {c}." for c in completions]
        return [1.0 if c == "7" else 0.0 for c in completions]


def with_results(prompts, completions, **kwargs):
    return [RewardResult(1.0) if c == "7" else RewardResult(0.0, f"got {c}") for c in completions]


@pytest.mark.parametrize(
    ("func", "scores", "feedback"),
    [
        (plain, [1.0, 0.0, 0.0], ["", "", ""]),
        (
            SeedStyle(),
            [1.0, 0.0, 0.0],
            ["", "Wrong. The answer is 7, not 5.", "Wrong. The answer is 7, not x."],
        ),
        (with_results, [1.0, 0.0, 0.0], ["", "got 5", "got x"]),
    ],
)
def test_three_protocols(func, scores, feedback):
    reward = CheckedReward(func)
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == scores
    assert reward.last_feedback == feedback
    assert reward.last_scores == scores


def test_name_comes_from_function_or_class():
    assert CheckedReward(plain).__name__ == "plain"
    assert CheckedReward(SeedStyle()).__name__ == "SeedStyle"


def test_none_means_skip_and_numpy_like_scalars_are_accepted():
    class Scalar:
        def __float__(self):
            return 0.25

    reward = CheckedReward(lambda prompts, completions, **kw: [None, Scalar(), True])
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [None, 0.25, 1.0]


def test_feedback_never_leaks_between_batches():
    class Forgetful:
        """Sets feedback on the first call only."""

        def __init__(self):
            self.calls = 0
            self.last_feedback: list[str] = []

        def __call__(self, prompts, completions, **kwargs):
            self.calls += 1
            if self.calls == 1:
                self.last_feedback = ["bad"] * len(completions)
            return [0.0] * len(completions)

    reward = CheckedReward(Forgetful())
    reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert reward.last_feedback == ["bad"] * 3
    reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert reward.last_feedback == ["", "", ""]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([{"score": 1.0}] * 3, "must return list[float], not list[dict]"),
        ([1.0], "returned 1 values for 3 completions"),
        ([1.0, float("nan"), 0.0], "returned nan for completion 1"),
        ([1.0, math.inf, 0.0], "returned inf for completion 1"),
        (1.0, "returned float; it must return a list"),
        ("abc", "returned str"),
        (["a", 1.0, 0.0], "returned str for completion 0"),
    ],
)
def test_broken_outputs_name_the_reward_and_the_fix(output, message):
    def my_reward(prompts, completions, **kwargs):
        return output

    with pytest.raises(RewardError) as info:
        CheckedReward(my_reward)(prompts=PROMPTS, completions=COMPLETIONS)
    assert "'my_reward'" in str(info.value) and message in str(info.value)


def test_exception_inside_reward_is_wrapped_with_its_name():
    def exploding(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"reward 'exploding' raised KeyError") as info:
        CheckedReward(exploding)(prompts=PROMPTS, completions=COMPLETIONS)
    assert isinstance(info.value.__cause__, KeyError)


def test_an_error_inside_the_reward_is_not_blamed_on_its_signature():
    """A ZeroDivisionError / ConnectionError is the reward's own failure: no advice about **kwargs."""

    def judge(prompts, completions, **kwargs):
        raise ConnectionError("judge API: 503 Service Unavailable")

    def typed(prompts, completions, answer, **kwargs):
        return [len(answer) + "1" for _ in completions]  # a TypeError of its own, not of the call

    for func, raised in (
        (judge, "ConnectionError: judge API: 503"),
        (typed, "TypeError: unsupported operand"),
    ):
        with pytest.raises(RewardError) as info:
            CheckedReward(func)(prompts=PROMPTS, completions=COMPLETIONS, answer=["7"] * 3)
        message = str(info.value)
        assert raised in message and "return None for the completions it cannot score" in message
        assert "**kwargs" not in message and "columns" not in message


def needs_solution(prompts, completions, solution, **kwargs):
    return [1.0] * len(completions)


def no_kwargs(prompts, completions, answer, tests):
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    ("func", "message"),
    [
        # a parameter no column fills: the columns it is called with, and the fix
        (needs_solution, "with the dataset columns answer, tests: no column is named 'solution'. Name its"),
        # no **kwargs: it cannot take completion_ids
        (no_kwargs, "accept **kwargs for the arguments and columns you do not use"),
    ],
)
def test_a_call_that_does_not_fit_the_signature_names_the_columns(func, message):
    with pytest.raises(RewardError, match=f"reward '{func.__name__}' raised TypeError") as info:
        CheckedReward(func)(
            prompts=PROMPTS,
            completions=COMPLETIONS,
            completion_ids=[[1]] * 3,
            answer=["7"] * 3,
            tests=["t"] * 3,
        )
    assert message in str(info.value)


def test_a_reward_class_asks_for_an_instance():
    with pytest.raises(RewardError, match=r"reward SeedStyle is a class; pass an instance, SeedStyle\(\)"):
        CheckedReward(SeedStyle)


def test_feedback_given_as_one_string_says_it_must_be_a_list():
    class OneString:
        def __init__(self):
            self.last_feedback: list[str] | str = []

        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = "wrong"
            return [0.0] * len(completions)

    with pytest.raises(
        RewardError, match=r"set last_feedback to a str \('wrong'\); it must be a list with one"
    ):
        CheckedReward(OneString())(prompts=PROMPTS, completions=COMPLETIONS)


def test_a_call_scoring_no_completion_warns_once_naming_the_reward():
    import warnings

    from sdpo_unsloth.rewards.protocol import NoSignalWarning

    def unsure(prompts, completions, **kwargs):
        return [None] * len(completions)

    reward = CheckedReward(unsure)
    with pytest.warns(NoSignalWarning, match="reward 'unsure' returned None for all 3 completions"):
        assert reward(prompts=PROMPTS, completions=COMPLETIONS) == [None] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(prompts=PROMPTS, completions=COMPLETIONS)  # once per reward
        CheckedReward(lambda prompts, completions, **kw: [None, 1.0, None])(
            PROMPTS, COMPLETIONS
        )  # some scored


def test_wrong_length_feedback_is_an_error():
    class Short:
        def __init__(self):
            self.last_feedback: list[str] = []

        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = ["only one"]
            return [0.0] * len(completions)

    with pytest.raises(RewardError, match="set last_feedback with 1 entries for 3 completions"):
        CheckedReward(Short())(prompts=PROMPTS, completions=COMPLETIONS)


def test_not_callable_is_rejected():
    with pytest.raises(RewardError, match="not callable"):
        CheckedReward(3)


def test_combine_feedback_joins_non_empty():
    a, b = CheckedReward(SeedStyle()), CheckedReward(with_results)
    a(prompts=PROMPTS, completions=COMPLETIONS)
    b(prompts=PROMPTS, completions=COMPLETIONS)
    assert combine_feedback([a, b]) == [
        "",
        "Wrong. The answer is 7, not 5.\ngot 5",
        "Wrong. The answer is 7, not x.\ngot x",
    ]


def test_numpy_arrays_and_tuples_are_accepted():
    import numpy as np

    from sdpo_unsloth.rewards.protocol import CheckedReward

    def as_array(prompts, completions, **kwargs):
        return np.array([1.0, 0.5], dtype=np.float32)

    def as_tuple(prompts, completions, **kwargs):
        return (np.float64(0.0), 1)

    assert CheckedReward(as_array)(["p", "p"], ["a", "b"]) == [1.0, 0.5]
    assert CheckedReward(as_tuple)(["p", "p"], ["a", "b"]) == [0.0, 1.0]


def test_async_rewards_are_awaited_and_checked():
    import asyncio

    from sdpo_unsloth.rewards.protocol import AsyncCheckedReward, RewardError, checked_reward

    async def judge(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [len(c) / 10 for c in completions]

    async def broken(prompts, completions, **kwargs):
        return [1.0]

    class Judge:
        async def __call__(self, prompts, completions, **kwargs):
            return [0.0 for _ in completions]

    wrapped = checked_reward(judge)
    assert isinstance(wrapped, AsyncCheckedReward) and isinstance(checked_reward(Judge()), AsyncCheckedReward)
    assert asyncio.run(wrapped(["p", "p"], ["ab", "abcd"])) == [0.2, 0.4]
    with pytest.raises(RewardError, match="'broken' returned 1 values for 2 completions"):
        asyncio.run(checked_reward(broken)(["p", "p"], ["a", "b"]))


def test_an_awaitable_from_a_plain_call_is_named():
    from sdpo_unsloth.rewards.protocol import CheckedReward, RewardError

    async def judge(prompts, completions, **kwargs):
        return [0.0 for _ in completions]

    def sneaky(prompts, completions, **kwargs):
        return judge(prompts, completions)

    with pytest.raises(RewardError, match="'sneaky' returned an awaitable"):
        CheckedReward(sneaky)(["p"], ["a"])


def test_several_rewards_warn_only_when_none_scores_a_completion(tmp_path):
    """TRL's multi-task pattern: a reward returns None for rows it does not cover and another scores them. That
    is no missing signal; a batch that no reward scores is. Through trainer.train()."""
    import warnings

    import torch
    from conftest import make_tiny_model, make_tiny_tokenizer
    from test_trainer import dataset, grpo_args

    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.rewards.protocol import NoSignalWarning

    def maths(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    def code(prompts, completions, **kwargs):
        return [None] * len(completions)  # no code row in these batches

    def trainer(name, rewards):
        tokenizer = make_tiny_tokenizer()
        torch.manual_seed(0)
        return SDPOTrainer(
            model=make_tiny_model(len(tokenizer)),
            args=grpo_args(tmp_path / name, max_steps=1),
            sdpo_config=SDPOConfig(),
            processing_class=tokenizer,
            reward_funcs=rewards,
            train_dataset=dataset(),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error", NoSignalWarning)
        trainer("covered", [maths, code]).train()
    with pytest.warns(
        NoSignalWarning, match="no reward \\('code', 'code'\\) scored any of the 8 completions"
    ):
        trainer("uncovered", [code, code]).train()
