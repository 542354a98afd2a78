"""The teacher: its prompt (the "reprompt"), its demonstrations, and its LoRA adapter.

SDPO's teacher is the same model shown more context: a successful sibling answer from the same
prompt group, or the reward's feedback on the failed attempt (paper arXiv 2601.20802, SPEC §1).
It scores the student's own completion tokens y unchanged; only the prompt differs.

Teacher weights never copy the base model: `ema` keeps a second LoRA adapter on the same frozen
base, `frozen` disables adapters (LoRA B starts at zero, so that is the initial policy), `live`
uses the student adapter under no_grad, `trust_region` mixes frozen and live.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def completion_text(completion: Any) -> str:
    """Text of one completion as TRL passes it: a string, or chat messages ending with the assistant turn.

    >>> completion_text([{"role": "assistant", "content": "42"}])
    '42'
    >>> completion_text("42")
    '42'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"expected a completion string or a list of chat messages, got {type(completion).__name__}"
    )


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


# ----------------------------------------------------------------------------------------------
# Adapter switching and the EMA update. These act on a PEFT model holding the student adapter
# ("default") and the teacher adapter on one shared, frozen base.


def _adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    marker = f".{adapter}."
    return {
        name: param
        for name, param in model.named_parameters()
        if marker in name and ("lora_" in name or "modules_to_save" in name)
    }


def adapter_parameter_count(model: torch.nn.Module, adapter: str) -> int:
    return sum(p.numel() for p in _adapter_parameters(model, adapter).values())


def _active_adapter(model: Any) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


@contextmanager
def adapter_scope(model: Any, adapter: str | None) -> Iterator[None]:
    """Run a block with `adapter` active (None = adapters disabled), then restore the student exactly.

    PEFT's `set_adapter` also marks the adapter trainable; this restores the active adapter *and*
    every parameter's `requires_grad`, also when the block raises. Use it under `torch.no_grad()`.
    """
    previous = _active_adapter(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield
    finally:
        if _active_adapter(model) != previous:
            model.set_adapter(previous)
        for name, param in model.named_parameters():
            if param.requires_grad != flags[name]:
                param.requires_grad_(flags[name])


@contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with every dropout module in eval mode (identity), then restore each module's mode.

    The teacher's log-probs are targets: a user's `lora_dropout > 0` must not add noise to them. Only
    dropout modules change mode, so the rest of the model (and unsloth's training-mode paths) stays as is.
    """
    modules = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training
    ]
    try:
        for module in modules:
            module.train(False)
        yield
    finally:
        for module in modules:
            module.train(True)


def adapter_is_initial(model: torch.nn.Module, adapter: str) -> bool:
    """True when every LoRA B of `adapter` is zero: the adapter adds nothing, so disabling it is exact."""
    params = _adapter_parameters(model, adapter)
    if any("modules_to_save" in name for name in params):
        return False  # trained copies of whole modules: disabling the adapter is not the initial policy
    tensors = [p for name, p in params.items() if "lora_B" in name]
    return bool(tensors) and all(not bool(p.detach().any()) for p in tensors)


def copy_adapter(model: torch.nn.Module, source: str, target: str) -> None:
    """Set every tensor of adapter `target` equal to the matching tensor of `source`."""
    src = _adapter_parameters(model, source)
    dst = _adapter_parameters(model, target)
    with torch.no_grad():
        for name, param in src.items():
            dst[name.replace(f".{source}.", f".{target}.")].copy_(param)


@torch.no_grad()
def ema_update(model: torch.nn.Module, *, teacher: str, student: str, rate: float) -> float:
    """teacher <- (1 - rate) * teacher + rate * student, over adapter tensors only.

    Returns the update's size, ||Δteacher||_2 over all adapter tensors (a logged metric).
    """
    src = _adapter_parameters(model, student)
    dst = _adapter_parameters(model, teacher)
    if not src or len(src) != len(dst):
        raise RuntimeError(
            f"EMA needs matching LoRA tensors for adapters '{student}' and '{teacher}'; found {len(src)} and "
            f"{len(dst)}. Load the model with sdpo_unsloth.load_model or let SDPOTrainer attach the adapters."
        )
    squared = 0.0
    for name, param in src.items():
        target = dst[name.replace(f".{student}.", f".{teacher}.")]
        delta = (param.detach().to(target.dtype) - target) * rate
        target.add_(delta)
        squared += float(delta.float().pow(2).sum())
    return squared**0.5
