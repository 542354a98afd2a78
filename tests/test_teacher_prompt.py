"""Teacher prompts, demonstrations and masks (SPEC §1), exact to the character."""

from __future__ import annotations

import pytest

from sdpo_unsloth.config import SDPOConfig
from sdpo_unsloth.teacher import build_reprompt, plan_reprompts, select_demonstrations, strip_thinking

CFG = SDPOConfig()
TEMPLATES = {
    "reprompt_template": CFG.reprompt_template,
    "solution_template": CFG.solution_template,
    "feedback_template": CFG.feedback_template,
}
CHAT = [
    {"role": "system", "content": "Answer with just the number."},
    {"role": "user", "content": "What is 3+4?"},
]


def plan(prompts, completions, rewards, feedback, group_size, **overrides):
    options = {
        "group_size": group_size,
        "success_threshold": 1.0,
        "dont_reprompt_on_self_success": True,
        "include_environment_feedback": True,
        "feedback_only_without_solution": True,
        "remove_thinking": True,
        "max_feedback_chars": 2000,
        **TEMPLATES,
    }
    options.update(overrides)
    return plan_reprompts(prompts, completions, rewards, feedback, **options)


def test_chat_prompt_with_demo_is_exact():
    r = build_reprompt(CHAT, demo="7", feedback=None, **TEMPLATES)
    assert r.prompt == [
        {"role": "system", "content": "Answer with just the number."},
        {
            "role": "user",
            "content": "What is 3+4?\nCorrect solution:\n\n7\n\nCorrectly solve the original question.",
        },
    ]
    assert CHAT[1]["content"] == "What is 3+4?"  # the raw prompt is not mutated


def test_chat_prompt_with_feedback_is_exact():
    r = build_reprompt(CHAT, demo=None, feedback="Wrong. The answer is 7, not 5.", **TEMPLATES)
    assert r.prompt[-1]["content"] == (
        "What is 3+4?\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "Wrong. The answer is 7, not 5.\n\nCorrectly solve the original question."
    )
    assert [m["role"] for m in r.prompt] == ["system", "user"]  # no duplicated system prompt


def test_plain_string_prompt_has_the_same_layout_without_chat_roles():
    r = build_reprompt("What is 3+4?", demo="7", feedback=None, **TEMPLATES)
    assert r.prompt == "What is 3+4?\nCorrect solution:\n\n7\n\nCorrectly solve the original question."
    assert "user" not in r.prompt and "assistant" not in r.prompt


def test_rendered_with_chat_template_has_no_role_words_in_content(tiny_tokenizer):
    r = build_reprompt(CHAT, demo="7", feedback=None, **TEMPLATES)
    text = tiny_tokenizer.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer with just the number.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3+4?\nCorrect solution:\n\n7\n\nCorrectly solve the original question.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.count("system") == 1


def test_multi_turn_uses_the_last_user_message():
    prompt = [*CHAT, {"role": "assistant", "content": "5"}, {"role": "user", "content": "Try again."}]
    r = build_reprompt(prompt, demo=None, feedback="no", **TEMPLATES)
    assert r.prompt[:3] == prompt[:3]
    assert r.prompt[3]["content"].startswith("Try again.\nThe following is feedback")


def test_prompt_without_user_message_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a user message"):
        build_reprompt([{"role": "system", "content": "x"}], demo="1", feedback=None, **TEMPLATES)


@pytest.mark.parametrize(
    ("rewards", "group", "expected"),
    [
        ([0, 1, 1, 0], 2, [1, None, None, 2]),  # a success never demonstrates to itself
        ([1, 1, 0, 0], 4, [1, 0, 0, 0]),  # first *other* success
        ([0, 0, 0, 0], 2, [None] * 4),
        ([0.5, 0.99, 1.0, 2.0], 4, [2, 2, 3, 2]),  # threshold is >= 1.0
    ],
)
def test_demo_selection(rewards, group, expected):
    assert select_demonstrations(rewards, group, success_threshold=1.0) == expected


def test_demo_is_never_the_sample_itself():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    for i, j in enumerate(select_demonstrations(rewards, 4, success_threshold=1.0)):
        assert j != i
        assert j is None or j // 4 == i // 4  # within the prompt group


def test_thinking_removed_from_demo():
    assert strip_thinking("<think>\n3+4 is 7\n</think>\n7") == "7"
    plans = plan(["q", "q"], ["<think>hmm</think>7", "5"], [1.0, 0.0], ["", "wrong"], 2)
    assert plans[1].demo == "7"
    kept = plan(["q", "q"], ["<think>hmm</think>7", "5"], [1.0, 0.0], ["", "wrong"], 2, remove_thinking=False)
    assert kept[1].demo == "<think>hmm</think>7"


def test_mask_and_feedback_rules():
    prompts = ["q"] * 4
    completions = ["7", "5", "6", "8"]
    rewards = [1.0, 0.0, 0.0, 0.0]
    feedback = ["", "Wrong. 7, not 5.", "", "Wrong. 7, not 8."]
    plans = plan(prompts[:2] + prompts[2:], completions, rewards, feedback, 2)
    # group 1: sample 1 has a demo (sample 0), so its feedback is dropped; sample 0 (the success) has nothing
    assert [p.active for p in plans] == [False, True, False, True]
    assert plans[1].has_demo and not plans[1].has_feedback
    # group 2: no success; sample 3 has feedback, sample 2 has none -> masked
    assert plans[3].has_feedback and not plans[3].has_demo and not plans[2].active
    both = plan(prompts, completions, rewards, feedback, 2, feedback_only_without_solution=False)
    assert both[1].has_demo and both[1].has_feedback
    none = plan(prompts, completions, rewards, feedback, 2, include_environment_feedback=False)
    assert [p.active for p in none] == [False, True, False, False]


def test_feedback_is_capped():
    plans = plan(["q"], ["x"], [0.0], ["e" * 5000], 1, max_feedback_chars=100)
    assert plans[0].feedback == "e" * 100


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="one completion, reward and feedback per prompt"):
        plan(["q", "q"], ["a"], [0.0, 0.0], ["", ""], 2)


def test_empty_and_cut_completions_never_demonstrate():
    prompts = [CHAT] * 4
    # All four succeed; #0 is empty, #1 was cut at the token budget, #2 and #3 are real answers.
    plans = plan(
        prompts,
        ["", "7 and then", "7", "7."],
        [1.0] * 4,
        [""] * 4,
        4,
        can_demonstrate=[True, False, True, True],
    )
    assert [p.demo for p in plans] == ["7", "7", "7.", "7"]
    plans = plan(prompts, ["", "  ", "7", "8"], [1.0, 1.0, 0.0, 0.0], [""] * 4, 4)
    assert [p.demo for p in plans] == [None] * 4  # whitespace-only answers do not count either
