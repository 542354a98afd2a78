"""The built-in addition task: dataset, parser, reward with feedback, greedy evaluation."""

from __future__ import annotations

import re

import pytest
import torch

from sdpo_unsloth.tasks.addition import (
    MAX_NEW_TOKENS,
    SYSTEM_PROMPT,
    AdditionReward,
    addition_dataset,
    evaluate,
    feedback_for,
    parse_answer,
)


def _operands(row: dict) -> tuple[int, int]:
    a, b = re.findall(r"\d+", row["prompt"][-1]["content"])
    return int(a), int(b)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("19", 19),
        (" 19", 19),
        ("19.", 19),
        ("19<|im_end|>", 19),
        ("The answer is 19.", 19),
        ("12+7=19", 12),  # first integer: echoing the question is wrong
        ("-3", -3),
        ("7.9", 7.9),  # not 7: a decimal is not its integer part
        ("\u22123", -3),  # the typographic minus
        ("3.0", 3),
        ("007", 7),
        ("", None),
        ("To add these numbers, we", None),
        ([{"role": "assistant", "content": "42"}], 42),
        ([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2 apples"}], 2),
        ([{"role": "assistant", "content": None}], None),
        ([], None),
    ],
)
def test_parse_answer(completion, expected):
    assert parse_answer(completion) == expected


@pytest.mark.parametrize(
    ("predicted", "answer", "feedback"),
    [
        (7, 7, ""),
        (5, 7, "Wrong. The answer is 7, not 5."),
        (-1, 0, "Wrong. The answer is 0, not -1."),
        (None, 12, "Wrong. The answer is 12; reply with just the number."),
    ],
)
def test_feedback_for(predicted, answer, feedback):
    assert feedback_for(predicted, answer) == feedback


@pytest.mark.parametrize(
    ("completions", "answers", "scores", "feedback"),
    [
        (["3"], ["3"], [1.0], [""]),
        (["4"], ["3"], [0.0], ["Wrong. The answer is 3, not 4."]),
        (["three"], [3], [0.0], ["Wrong. The answer is 3; reply with just the number."]),
        (
            [[{"role": "assistant", "content": "10"}], [{"role": "assistant", "content": "The sum is 11"}]],
            ["10", "10"],
            [1.0, 0.0],
            ["", "Wrong. The answer is 10, not 11."],
        ),
        ([], [], [], []),
    ],
)
def test_reward_scores_and_feedback(completions, answers, scores, feedback):
    reward = AdditionReward()
    prompts = ["q"] * len(completions)
    out = reward(
        prompts=prompts, completions=completions, answer=answers, completion_ids=None, trainer_state=None
    )
    assert out == scores
    assert all(isinstance(s, float) for s in out)
    assert reward.last_feedback == feedback


def test_reward_feedback_is_replaced_each_call():
    reward = AdditionReward()
    reward(prompts=["q"], completions=["1"], answer=["2"])
    reward(prompts=["q", "q"], completions=["2", "2"], answer=["2", "2"])
    assert reward.last_feedback == ["", ""]


def test_reward_protocol_surface():
    reward = AdditionReward()
    assert reward.__name__ == "addition_correct"
    assert reward.last_feedback == []
    with pytest.raises(ValueError, match="addition_correct: got 2 completions but 1 answers"):
        reward(prompts=["q", "q"], completions=["1", "2"], answer=["1"])


def test_dataset_rows_are_correct_and_reproducible():
    rows = addition_dataset(50, seed=3)
    assert rows == addition_dataset(50, seed=3)
    assert rows != addition_dataset(50, seed=4)
    assert len({row["prompt"][-1]["content"] for row in rows}) == 50
    for row in rows:
        assert row["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert row["prompt"][1]["role"] == "user"
        a, b = _operands(row)
        assert row["answer"] == str(a + b)
        assert 0 <= a <= 9 and 0 <= b <= 9  # default: one-digit operands


@pytest.mark.parametrize(
    ("digits", "min_digits", "low", "high"), [(1, 1, 0, 9), (2, 2, 10, 99), (3, 2, 10, 999)]
)
def test_dataset_digit_ranges(digits, min_digits, low, high):
    rows = addition_dataset(40, seed=0, digits=digits, min_digits=min_digits)
    operands = [x for row in rows for x in _operands(row)]
    assert low <= min(operands) and max(operands) <= high


def test_dataset_default_prompt_layout():
    (row,) = addition_dataset(1, seed=5)
    a, b = _operands(row)
    assert row["prompt"] == [
        {"role": "system", "content": "Answer with just the number."},
        {"role": "user", "content": f"{a}+{b}="},
    ]


def test_dataset_worked_examples_become_chat_turns():
    rows = addition_dataset(99, seed=0, examples=[(3, 4)])
    assert rows[0]["prompt"][1:3] == [
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
    ]
    assert all(row["prompt"][-1]["content"] != "3+4=" for row in rows)  # the example is never asked


def test_dataset_exclude_gives_disjoint_held_out_split():
    held_out = addition_dataset(32, seed=1)
    train = addition_dataset(68, seed=0, exclude=held_out)  # all 100 one-digit problems between them
    assert len({row["prompt"][-1]["content"] for row in train + held_out}) == 100
    with pytest.raises(ValueError, match="only 68 distinct problems"):
        addition_dataset(69, seed=0, exclude=held_out)
    questions = {row["prompt"][-1]["content"] for row in train}
    assert not questions & {row["prompt"][-1]["content"] for row in held_out}


def test_dataset_options_and_errors():
    rows = addition_dataset(
        3, seed=0, digits=1, system_prompt=None, question_template="What is {a} plus {b}?"
    )
    assert all(len(row["prompt"]) == 1 and row["prompt"][0]["content"].startswith("What is ") for row in rows)
    assert len(addition_dataset(100, seed=0, digits=1)) == 100  # every 1-digit problem exists once
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        addition_dataset(101, seed=0, digits=1)
    with pytest.raises(ValueError, match="`min_digits` must be in"):
        addition_dataset(1, seed=0, digits=1, min_digits=2)
    with pytest.raises(ValueError, match="`n` must be >= 0"):
        addition_dataset(-1, seed=0)


class _ScriptedModel(torch.nn.Module):
    """Answers `a+b` correctly when `a` is even, else `a+b+1`; checks the batch is left-padded."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and not self.training
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            a, b = map(int, re.findall(r"(\d+)\+(\d+)", text)[-1])
            answer = a + b if a % 2 == 0 else a + b + 1
            new = self.tokenizer(f"{answer} is it", add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        width = max(len(r) for r in rows)
        return torch.stack(
            [torch.nn.functional.pad(r, (0, width - len(r)), value=pad_token_id) for r in rows]
        )


def test_evaluate_scores_greedy_first_integer_with_left_padding(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    model = _ScriptedModel(tokenizer)
    model.train()
    rows = addition_dataset(10, seed=0)
    expected = sum(_operands(row)[0] % 2 == 0 for row in rows) / len(rows)
    assert 0 < expected < 1
    assert evaluate(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS, batch_size=4) == expected
    assert model.calls == [4, 4, 2]
    assert model.training and tokenizer.padding_side == "right"  # both restored


def test_evaluate_errors(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    model = _ScriptedModel(tokenizer)
    with pytest.raises(ValueError, match="`rows` is empty"):
        evaluate(model, tokenizer, [], max_new_tokens=4, batch_size=2)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        evaluate(model, tokenizer, addition_dataset(1, seed=0), max_new_tokens=4, batch_size=0)


def test_docstring_examples():
    import doctest

    from sdpo_unsloth.tasks import addition

    result = doctest.testmod(addition)
    assert result.attempted >= 10 and result.failed == 0
