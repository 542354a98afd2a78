"""SDPOConfig: seed defaults and self-validation with errors that name the field and the fix."""

from __future__ import annotations

import pytest

from sdpo_unsloth import SDPOConfig


def test_defaults_match_the_seed_and_paper():
    cfg = SDPOConfig()
    assert (cfg.enabled, cfg.alpha, cfg.distillation_topk, cfg.teacher_mode) == (True, 0.5, 100, "ema")
    assert (cfg.teacher_update_rate, cfg.is_clip, cfg.distillation_add_tail) == (0.05, 2.0, True)
    assert cfg.include_environment_feedback and cfg.environment_feedback_only_without_solution
    assert cfg.remove_thinking_from_demonstration and cfg.dont_reprompt_on_self_success
    assert cfg.success_reward_threshold == 1.0 and cfg.grpo_weight == 0.0 and not cfg.sampled_token


def test_seed_example_constructs():
    SDPOConfig(
        enabled=True,
        alpha=0.5,
        distillation_topk=100,
        teacher_mode="ema",
        teacher_update_rate=0.05,
        is_clip=2.0,
        include_environment_feedback=True,
        environment_feedback_only_without_solution=True,
        remove_thinking_from_demonstration=True,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "`alpha` must be in [0, 1], got 1.5"),
        ({"alpha": float("nan")}, "`alpha` must be in [0, 1]"),
        ({"distillation_topk": 0}, "`distillation_topk` must be a positive integer or None"),
        ({"distillation_topk": 2.5}, "`distillation_topk` must be a positive integer"),
        (
            {"teacher_mode": "copy"},
            "`teacher_mode` must be one of ema, frozen, live, trust_region, got 'copy'",
        ),
        ({"teacher_update_rate": -0.1}, "`teacher_update_rate` must be in [0, 1]"),
        ({"is_clip": 0}, "`is_clip` must be a positive number or None"),
        ({"grpo_weight": 2}, "`grpo_weight` must be in [0, 1]"),
        ({"sampled_token": True}, "`alpha` must be 1.0 when `sampled_token=True`"),
        ({"max_reprompt_length": 0}, "`max_reprompt_length` must be a positive integer"),
        ({"reprompt_template": "{prompt}"}, "missing {solution}, {feedback}"),
        ({"teacher_adapter_name": "default"}, "`teacher_adapter_name` must be"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        SDPOConfig(**kwargs)
    assert message in str(info.value)


def test_valid_edges_accepted():
    assert SDPOConfig(alpha=1.0, sampled_token=True).sampled_token
    assert SDPOConfig(distillation_topk=None, is_clip=None, teacher_update_rate=0.0).distillation_topk is None
    assert SDPOConfig().to_dict()["alpha"] == 0.5


def test_tiny_tokenizer_round_trips(tiny_model_dir):
    """The test fixture's tokenizer reloads with the same ids next to a saved qwen2 config."""
    from conftest import make_tiny_tokenizer
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?\nSay it."},
    ]
    original = make_tiny_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    for tokenizer in (original, reloaded):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        tokenizer.ids = ids["input_ids"]
    assert original.ids == reloaded.ids
    assert reloaded.decode(reloaded.ids).endswith("<|im_start|>assistant\n")
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (original.pad_token_id, original.eos_token_id)
    assert reloaded.pad_token_id != reloaded.eos_token_id


@pytest.mark.parametrize(
    ("kwargs", "distils"),
    [
        ({}, True),  # the seed's pure SDPO
        ({"enabled": False}, False),  # plain GRPO
        ({"grpo_weight": 1.0}, False),  # a fixed mix all GRPO
        ({"grpo_weight": 0.9}, True),
        ({"grpo_weight": 1.0, "hybrid_mode": "per_group"}, True),  # all-failed groups are distilled
        ({"grpo_weight": 1.0, "hybrid_mode": "failed_groups"}, True),
        ({"grpo_weight": 1.0, "hybrid_mode": "failures"}, True),
    ],
)
def test_distils_says_whether_any_sample_can_be_distilled(kwargs, distils):
    """One rule for train()'s default anchor and the trainer's "anchor has no effect" warning."""
    assert SDPOConfig(**kwargs).distils is distils
