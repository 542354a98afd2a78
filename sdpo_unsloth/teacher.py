"""The teacher's prompt (the "reprompt") and its demonstrations: pure text planning.

SDPO's teacher is the same model shown more context: a successful sibling answer from the same
prompt group, or the reward's feedback on the failed attempt (paper arXiv 2601.20802, SPEC §1).
It scores the student's own completion tokens y unchanged; only the prompt differs.

Which weights score the reprompt (the teacher adapter, its switching and EMA update) is `adapters.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove closed `<think>...</think>` blocks.

    >>> strip_thinking("<think>carry the 1</think>\\n42")
    '42'
    """
    return _THINK_BLOCK.sub("", text).strip()


def select_demonstrations(
    rewards: Sequence[float], group_size: int, *, success_threshold: float, allow_self: bool = False
) -> list[int | None]:
    """Index of each sample's demonstration: the first *other* successful rollout of its prompt group.

    Samples are laid out group by group (`group_size` consecutive rollouts share a prompt), as TRL's
    sampler does. A rollout succeeds when its total reward is >= `success_threshold`.

    >>> select_demonstrations([0.0, 1.0, 1.0, 0.0], 2, success_threshold=1.0)
    [1, None, None, 2]
    >>> select_demonstrations([1.0, 1.0], 2, success_threshold=1.0)
    [1, 0]
    """
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards cannot be split into prompt groups of {group_size}")
    demos: list[int | None] = []
    for i in range(len(rewards)):
        start = i - i % group_size
        group = range(start, start + group_size)
        winners = [j for j in group if rewards[j] >= success_threshold and (allow_self or j != i)]
        demos.append(winners[0] if winners else None)
    return demos


@dataclass(frozen=True)
class Reprompt:
    """The teacher's prompt for one sample, before tokenisation."""

    prompt: list[dict[str, Any]] | str  # chat messages, or plain text for string prompts
    demo: str | None
    feedback: str | None

    @property
    def has_demo(self) -> bool:
        return self.demo is not None

    @property
    def has_feedback(self) -> bool:
        return bool(self.feedback)

    @property
    def active(self) -> bool:
        """A sample with neither a demonstration nor feedback gets no loss and no teacher forward."""
        return self.has_demo or self.has_feedback


def build_reprompt(
    prompt: list[dict[str, Any]] | str,
    *,
    demo: str | None,
    feedback: str | None,
    reprompt_template: str,
    solution_template: str,
    feedback_template: str,
) -> Reprompt:
    """Teacher prompt from the *raw* prompt: the last user message becomes the reprompt template.

    >>> r = build_reprompt(
    ...     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    ...     demo="4", feedback=None, reprompt_template="{prompt}{solution}{feedback}!",
    ...     solution_template=" Demo: {demo}.", feedback_template=" Feedback: {feedback}.")
    >>> r.prompt[-1]["content"]
    '2+2? Demo: 4.!'
    >>> r.prompt[0]
    {'role': 'system', 'content': 'Be brief.'}
    """
    solution = solution_template.format(demo=demo) if demo is not None else ""
    feedback_part = feedback_template.format(feedback=feedback) if feedback else ""

    def render(question: str) -> str:
        return reprompt_template.format(prompt=question, solution=solution, feedback=feedback_part)

    feedback = feedback or None
    if isinstance(prompt, str):
        return Reprompt(render(prompt), demo, feedback)
    users = [i for i, message in enumerate(prompt) if message.get("role") == "user"]
    if not users:
        raise ValueError(
            "a chat prompt needs a user message to build the teacher prompt; got roles "
            f"{[m.get('role') for m in prompt]}"
        )
    last = users[-1]
    content = prompt[last].get("content")
    if not isinstance(content, str):
        raise ValueError(
            "the teacher prompt supports text-only user messages; the last user message has "
            f"content of type {type(content).__name__}"
        )
    messages = [dict(message) for message in prompt]
    messages[last] = {**prompt[last], "content": render(content)}
    return Reprompt(messages, demo, feedback)


def plan_reprompts(
    prompts: Sequence[list[dict[str, Any]] | str],
    completions: Sequence[str],
    rewards: Sequence[float],
    feedback: Sequence[str],
    *,
    group_size: int,
    success_threshold: float,
    dont_reprompt_on_self_success: bool,
    include_environment_feedback: bool,
    feedback_only_without_solution: bool,
    remove_thinking: bool,
    max_feedback_chars: int,
    reprompt_template: str,
    solution_template: str,
    feedback_template: str,
    can_demonstrate: Sequence[bool] | None = None,
) -> list[Reprompt]:
    """One `Reprompt` per sample, applying SPEC §1's demonstration and feedback rules.

    `can_demonstrate[i]` False keeps completion i from ever being a demonstration, whatever its reward
    (an empty answer, or one cut at the token budget). An empty completion never demonstrates.
    """
    n = len(prompts)
    if not len(completions) == len(rewards) == len(feedback) == n:
        raise ValueError(
            f"plan_reprompts needs one completion, reward and feedback per prompt; got {n} prompts, "
            f"{len(completions)} completions, {len(rewards)} rewards, {len(feedback)} feedback strings"
        )
    eligible = [bool(text.strip()) for text in completions]
    if can_demonstrate is not None:
        eligible = [a and bool(b) for a, b in zip(eligible, can_demonstrate, strict=True)]
    rewards = [r if ok else float("-inf") for r, ok in zip(rewards, eligible, strict=True)]
    demo_index = select_demonstrations(
        rewards, group_size, success_threshold=success_threshold, allow_self=not dont_reprompt_on_self_success
    )
    plans = []
    for i in range(n):
        demo = None
        if demo_index[i] is not None:
            demo = completions[demo_index[i]]
            demo = strip_thinking(demo) if remove_thinking else demo
        note = feedback[i][:max_feedback_chars] if include_environment_feedback else ""
        if feedback_only_without_solution and demo is not None:
            note = ""
        plans.append(
            build_reprompt(
                prompts[i],
                demo=demo,
                feedback=note or None,
                reprompt_template=reprompt_template,
                solution_template=solution_template,
                feedback_template=feedback_template,
            )
        )
    return plans
