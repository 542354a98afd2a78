"""`SDPOConfig`: the self-distillation settings, validated on construction.

Field names and defaults follow the user contract (the sdpo-rl examples README) and the paper
("Reinforcement Learning via Self-Distillation", arXiv 2601.20802). New behaviour is opt-in.
Pure modules (`loss.py`, `teacher.py`) take plain arguments, never this object.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .adapters import TEACHER_ADAPTER

TeacherMode = Literal["ema", "frozen", "live", "trust_region"]
HybridMode = Literal["fixed", "per_group", "failed_groups", "failures"]
HYBRID_MODES: tuple[str, ...] = ("fixed", "per_group", "failed_groups", "failures")
HYBRIDS: dict[str, tuple[str, str]] = {  # mode -> (its name in messages, what it trains), at grpo_weight 1
    "per_group": (
        "per-group",
        "TRL's GRPO loss where a group's rewards differ, distillation where a group's rewards are equal (all "
        "failed, or all succeeded)",
    ),
    "failed_groups": (
        "failed-groups",
        "TRL's GRPO loss where a group's rewards differ, distillation only in groups where every sample failed",
    ),
    "failures": (
        "failures",
        "TRL's GRPO loss on every sample, and distillation on every failed sample, towards a teacher shown a "
        "sibling's success or the feedback",
    ),
}
TEACHER_MODES: tuple[str, ...] = ("ema", "frozen", "live", "trust_region")

DEFAULT_REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
DEFAULT_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{demo}"
DEFAULT_FEEDBACK_TEMPLATE = (
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: float | int | str, name: str = "time_budget") -> float:
    """Seconds from a number of seconds or a duration such as "11h30m", "90m", "1.5h", "45s".

    >>> parse_duration("11h30m"), parse_duration("90m"), parse_duration(3600)
    (41400.0, 5400.0, 3600.0)
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        match = _DURATION.match(text) if text else None
        if text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif match and any(match.groups()):
            hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"`{name}` must be a positive duration such as 11h30m, 90m, 1.5h, 45s or a number of seconds, "
            f"got {value!r}."
        )
    return seconds


@dataclass
class SDPOConfig:
    """Self-distillation settings for `SDPOTrainer`, passed beside TRL's `GRPOConfig`.

    Example:
        >>> cfg = SDPOConfig(alpha=1.0, distillation_topk=20, teacher_update_rate=0.01)
        >>> cfg.teacher_mode
        'ema'
        >>> SDPOConfig(alpha=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be in [0, 1], got 1.5 (0 = forward KL, 0.5 = symmetric JSD, 1 = reverse KL).
    """

    enabled: bool = field(
        default=True, metadata=_help("SDPO replaces the GRPO loss. False = plain GRPO, no teacher cost.")
    )
    alpha: float = field(
        default=0.5,
        metadata=_help(
            "Divergence: 0 = KL(teacher||student) (forward), 0.5 = symmetric JSD, 1 = KL(student||teacher) "
            "(reverse; the paper with rich feedback), between = generalized JSD."
        ),
    )
    distillation_topk: int | None = field(
        default=100,
        metadata=_help(
            "Support of the divergence: the student's top-K tokens per position. None = full vocabulary "
            "(the paper on code: 20)."
        ),
    )
    distillation_add_tail: bool = field(
        default=True,
        metadata=_help("Add a (K+1)-th bucket with the mass outside the top-K (else renormalise)."),
    )
    teacher_mode: TeacherMode = field(
        default="ema",
        metadata=_help(
            "ema (an EMA adapter), frozen (the initial policy: the adapter as loaded), live (the student, no "
            "grad), trust_region ((1-r) initial + r live logits). None of them copies base weights."
        ),
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata=_help(
            "ema: teacher = (1-r) teacher + r student after each optimizer step (the paper on code: 0.01). "
            "trust_region: mix weight."
        ),
    )
    is_clip: float | None = field(
        default=2.0,
        metadata=_help("Upper clip of the per-token importance weight. None disables the weight clip."),
    )
    include_environment_feedback: bool = field(
        default=True, metadata=_help("Put the reward's feedback string into the teacher prompt.")
    )
    environment_feedback_only_without_solution: bool = field(
        default=True, metadata=_help("Use feedback only for samples that have no successful sibling to show.")
    )
    remove_thinking_from_demonstration: bool = field(
        default=True, metadata=_help("Strip <think>...</think> blocks from the demonstration.")
    )
    success_reward_threshold: float = field(
        default=1.0,
        metadata=_help("A rollout whose total reward is >= this counts as a successful demonstration."),
    )
    dont_reprompt_on_self_success: bool = field(
        default=True, metadata=_help("Never show a sample its own answer as the demonstration.")
    )
    reprompt_template: str = field(
        default=DEFAULT_REPROMPT_TEMPLATE,
        metadata=_help("Teacher user message; fields {prompt} {solution} {feedback}."),
    )
    solution_template: str = field(default=DEFAULT_SOLUTION_TEMPLATE, metadata=_help("Field {demo}."))
    feedback_template: str = field(default=DEFAULT_FEEDBACK_TEMPLATE, metadata=_help("Field {feedback}."))
    max_reprompt_length: int = field(
        default=1024,
        metadata=_help(
            "Token budget of the teacher prompt; the demonstration is truncated to fit. Where the question and "
            "template alone fill it, the sample uses its own feedback (or has no teacher), with a warning."
        ),
    )
    max_feedback_chars: int = field(
        default=2000, metadata=_help("Feedback strings are cut to this many characters before reprompting.")
    )
    grpo_weight: float = field(
        default=0.0,
        metadata=_help(
            "Opt-in hybrid, a loss-level mix: loss = w * L_GRPO + (1-w) * L_SDPO, L_GRPO TRL's GRPO loss (its "
            "clipped surrogate, normalised as its loss_type), L_SDPO the mean over sequences with a teacher (the "
            "paper's Eq. 3 mixes advantages instead; it used w = 0.9 for a 0.6B model). 0 = pure SDPO."
        ),
    )
    hybrid_mode: HybridMode = field(
        default="fixed",
        metadata=_help(
            "How the hybrid's weight w applies. fixed: every sequence mixes w * GRPO + (1-w) * SDPO. "
            "per_group: w only in prompt groups whose rewards differ (GRPO has a signal there); groups with "
            "equal rewards (all failed, with feedback, or all succeeded) get pure distillation. failed_groups: as "
            "per_group, but a group whose samples all succeeded gets no update (distilling a success towards a "
            "sibling's lowers what worked); only all-failed groups are distilled. failures: loss = w * L_GRPO "
            "on every sequence + L_SDPO on the failed ones only (reward below success_reward_threshold): a "
            "success is reinforced by GRPO and not distilled, a failure gets both. Needs grpo_weight > 0."
        ),
    )
    distill_anchor: float = field(
        default=0.0,
        metadata=_help(
            "Weight of a KL penalty to the initial policy on the distilled samples only: TRL's beta x k3(p, "
            "p_ref) per completion token, normalised as its loss_type, as GRPOConfig.beta adds on every sample. "
            "It holds back the teacher's pull where distilling narrows the student to a few answers, and leaves "
            "the hybrid's GRPO samples free. Adds to GRPOConfig.beta on those samples. 0 = off."
        ),
    )
    sampled_token: bool = field(
        default=False,
        metadata=_help(
            "alpha=1 only: per-token surrogate sg(log p - log q) * log p instead of top-K logits."
        ),
    )
    logit_chunk_size: int = field(
        default=256,
        metadata=_help("Tokens per chunk of [chunk x V] logits; lower it if the loss runs out of memory."),
    )
    teacher_adapter_name: str = field(
        default=TEACHER_ADAPTER, metadata=_help("Name of the teacher LoRA adapter.")
    )
    time_budget: float | str | None = field(
        default=None,
        metadata=_help(
            "Stop cleanly, with a complete checkpoint, before the next step would cross this wall time "
            "(seconds or '11h30m'), counted from the start of training. None = no limit."
        ),
    )
    reward_timeout: float | None = field(
        default=600.0,
        metadata=_help(
            "Seconds one reward call may take before training stops with an error naming the reward. "
            "None = no limit (the reward then runs in the trainer's thread)."
        ),
    )
    diagnostics_samples: int = field(
        default=4,
        metadata=_help(
            "Samples per logged step written to output_dir/diagnostics/ (diagnostics.html, diagnostics.jsonl): "
            "each completion token coloured by teacher-minus-student log-prob, next to the prompt, reward and "
            "what the teacher saw; also logged as a table to report_to. 0 = off."
        ),
    )
    warn_noop: bool = field(
        default=True,
        metadata=_help(
            "Warn once per cause when training cannot learn (teacher-student gap near zero, every sample "
            "masked, student adapter not moving, constant rewards, truncated completions); see "
            "sdpo_unsloth.watchdog."
        ),
    )

    def reprompt_options(self) -> dict[str, Any]:
        """The keyword arguments of `teacher.plan_reprompts` that these settings fix (all but the group size)."""
        return {
            "success_threshold": self.success_reward_threshold,
            "dont_reprompt_on_self_success": self.dont_reprompt_on_self_success,
            "include_environment_feedback": self.include_environment_feedback,
            "feedback_only_without_solution": self.environment_feedback_only_without_solution,
            "remove_thinking": self.remove_thinking_from_demonstration,
            "max_feedback_chars": self.max_feedback_chars,
            "reprompt_template": self.reprompt_template,
            "solution_template": self.solution_template,
            "feedback_template": self.feedback_template,
        }

    def __post_init__(self) -> None:
        def fail(name: str, rule: str, value: Any, hint: str = "") -> None:
            raise ValueError(f"`{name}` must be {rule}, got {value!r}{f' ({hint})' if hint else ''}.")

        def finite(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if not finite(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            fail("alpha", "in [0, 1]", self.alpha, "0 = forward KL, 0.5 = symmetric JSD, 1 = reverse KL")
        k = self.distillation_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            fail("distillation_topk", "a positive integer or None (full vocabulary)", k)
        if self.teacher_mode not in TEACHER_MODES:
            fail("teacher_mode", f"one of {', '.join(TEACHER_MODES)}", self.teacher_mode)
        if not finite(self.teacher_update_rate) or not 0.0 <= self.teacher_update_rate <= 1.0:
            fail(
                "teacher_update_rate",
                "in [0, 1]",
                self.teacher_update_rate,
                "the paper uses 0.05, or 0.01 on code",
            )
        if self.is_clip is not None and (not finite(self.is_clip) or self.is_clip <= 0):
            fail("is_clip", "a positive number or None", self.is_clip)
        if not finite(self.success_reward_threshold):
            fail("success_reward_threshold", "a finite number", self.success_reward_threshold)
        if not finite(self.grpo_weight) or not 0.0 <= self.grpo_weight <= 1.0:
            fail("grpo_weight", "in [0, 1]", self.grpo_weight, "the paper's hybrid used 0.9 for a 0.6B model")
        if not finite(self.distill_anchor) or self.distill_anchor < 0:
            fail("distill_anchor", "a finite number >= 0", self.distill_anchor, "e.g. 0.1; 0 turns it off")
        if self.hybrid_mode not in HYBRID_MODES:
            fail("hybrid_mode", f"one of {', '.join(HYBRID_MODES)}", self.hybrid_mode)
        if self.hybrid_mode != "fixed" and self.grpo_weight == 0:
            fail(
                "grpo_weight",
                f"> 0 with hybrid_mode={self.hybrid_mode!r}",
                self.grpo_weight,
                "it is the weight of the GRPO term, e.g. 1.0",
            )
        if self.sampled_token and self.alpha != 1.0:
            fail(
                "alpha",
                "1.0 when `sampled_token=True`",
                self.alpha,
                "the sampled-token surrogate is reverse KL",
            )
        samples = self.diagnostics_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            fail("diagnostics_samples", "an integer >= 0", samples, "0 turns the per-token diagnostics off")
        for name in ("max_reprompt_length", "max_feedback_chars", "logit_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "a positive integer", value)
        for name, keys in (
            ("reprompt_template", ("{prompt}", "{solution}", "{feedback}")),
            ("solution_template", ("{demo}",)),
            ("feedback_template", ("{feedback}",)),
        ):
            template = getattr(self, name)
            missing = [key for key in keys if key not in template]
            if missing:
                fail(
                    name, f"a string containing {', '.join(keys)}", template, f"missing {', '.join(missing)}"
                )
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        timeout = self.reward_timeout
        if timeout is not None and (not finite(timeout) or timeout <= 0):
            fail("reward_timeout", "a positive number of seconds or None", timeout)
        if not self.teacher_adapter_name or self.teacher_adapter_name == "default":
            fail(
                "teacher_adapter_name",
                "a non-empty name other than 'default' (the student)",
                self.teacher_adapter_name,
            )

    @property
    def ema_teacher(self) -> bool:
        """True when the teacher is an EMA adapter moved after every optimizer step."""
        return self.enabled and self.teacher_mode == "ema"

    @property
    def distils(self) -> bool:
        """True when some sample can get a distillation term: SDPO is on and the mix is not all GRPO (a fixed
        mix at grpo_weight 1 gives every sample GRPO's loss alone, so a distillation setting does nothing)."""
        return self.enabled and not (self.hybrid_mode == "fixed" and self.grpo_weight >= 1.0)

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_table() -> str:
    """The Markdown table of every field, its default and its help text (docs/configuration.md)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| field | default | meaning |", "|---|---|---|"]
    for spec in fields(SDPOConfig):
        lines.append(f"| `{spec.name}` | `{cell(repr(spec.default))}` | {cell(spec.metadata['help'])} |")
    return "\n".join(lines)
