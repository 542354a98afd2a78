"""The held-out score during `train()`, and a warning when training lowers it.

A falling training reward is not evidence of a regression (the demo's reward dips while its held-out accuracy
climbs), so `train()` scores its held-out rows every `eval_steps` optimizer steps with the same greedy
evaluation as its before/after scores, logs `eval/heldout_score` (log history, `report_to`), and warns once
(`RegressionWarning`) when the score has fallen below the starting score by more than evaluation noise:

    drop > max(MIN_DROP, NOISE_SIGMAS * sqrt(max(b (1 - b), FLOOR_VAR) / n))

with b the starting score in [0, 1] and n the held-out rows (the binomial standard error of a score of n
rows; the floor keeps it from vanishing near 0 and 1). The message names the setting that helps for the
configuration that is training: pure SDPO on a task where some samples succeed gets the per-group hybrid
(GRPO's signal where a group's rewards differ, distillation where they do not; see docs/benchmarks.md,
"learning-panel"), a hybrid gets a lower learning rate or pure GRPO.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import TrainerCallback

MIN_DROP = 0.05
NOISE_SIGMAS = 2.0
FLOOR_VAR = 0.0625  # the variance of a score at 0.067 / 0.933: at most ~4x a score's SE near 0 or 1


class RegressionWarning(UserWarning):
    """Training lowered the held-out score: the message names the cause and the setting that helps."""


def significant_drop(before: float, score: float, rows: int) -> bool:
    """True when `score` is below `before` by more than the evaluation noise of `rows` rows.

    >>> significant_drop(0.44, 0.22, 32), significant_drop(0.60, 0.55, 20), significant_drop(0.5, 0.5, 1)
    (True, False, False)
    """
    if rows < 1:
        return False
    b = min(max(before, 0.0), 1.0)
    noise = NOISE_SIGMAS * math.sqrt(max(b * (1.0 - b), FLOOR_VAR) / rows)
    return before - score > max(MIN_DROP, noise)


def advice(sdpo: Any, zero_std: list[float]) -> str:
    """The setting that helps, from the SDPO config and TRL's `frac_reward_zero_std` values so far."""
    spread = [1.0 - float(v) for v in zero_std]
    varied = sum(spread) / len(spread) if spread else None
    share = f" ({varied:.0%} of prompt groups had rewards that differ)" if varied is not None else ""
    if not sdpo.enabled:
        return (
            "Lower learning_rate, or check the reward on a few completions (the task may reward a shortcut)."
        )
    if sdpo.grpo_weight == 0 and (varied is None or varied > 0):
        return (
            f"Some samples succeed on this task{share}: there the teacher's view (the answer it was told) can teach "
            "the student the feedback's wording instead of the task. Use the per-group hybrid, which trains with "
            "GRPO where a group's rewards differ and distils only where they do not: "
            "SDPOConfig(grpo_weight=1.0, hybrid_mode='per_group') (train(..., grpo_weight=1.0, "
            "hybrid_mode='per_group'); CLI --grpo-weight 1 --hybrid-mode per_group)."
        )
    if sdpo.grpo_weight < 1.0 or sdpo.hybrid_mode != "per_group":
        return (
            f"The distillation term still weighs on groups where GRPO has a signal{share}: use "
            "grpo_weight=1.0 with hybrid_mode='per_group', or lower learning_rate."
        )
    return (
        "This is the per-group hybrid (TRL's GRPO loss where a group's rewards differ, distillation where every "
        "sample failed). Lower learning_rate; or, where a success in a group is the best lesson for its failed "
        "siblings, pure SDPO (grpo_weight=0) distils it to them (it beat this hybrid on the learning panel's "
        "count_bits task, docs/benchmarks.md); or plain GRPO (SDPOConfig(enabled=False))."
    )


class HeldOutMonitor(TrainerCallback):
    """Scores the held-out rows every `every` optimizer steps (main process), logs it, warns on a regression.

    `evaluate` is a zero-argument callable returning the score (or None); `before` the starting score.
    The last step is left to `train()`'s own "after" score; `check_final` applies the same rule to it.
    """

    def __init__(self, trainer: Any, evaluate: Any, before: float | None, rows: int, every: int):
        if every < 1:
            raise ValueError(f"eval_steps must be >= 1, got {every}")
        self.trainer = trainer
        self.evaluate = evaluate
        self.before = before
        self.rows = rows
        self.every = every
        self.scores: list[tuple[int, float]] = []
        self.warned = False

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps or not state.is_world_process_zero:
            return
        score = self.evaluate()
        if score is None:
            return
        self.scores.append((step, score))
        logs = {"eval/heldout_score": score}
        state.log_history.append({**logs, "step": step})
        flags = (control.should_log, control.should_save, control.should_evaluate)
        self.trainer.callback_handler.on_log(args, state, control, logs)  # report_to integrations
        # the default flow callback clears `should_log` in on_log: keep this step's own log and save
        control.should_log, control.should_save, control.should_evaluate = flags
        self.check(step, score)

    def check(self, step: int, score: float) -> None:
        if self.warned or self.before is None or not significant_drop(self.before, score, self.rows):
            return
        self.warned = True
        logged = [
            e["frac_reward_zero_std"] for e in self.trainer.state.log_history if "frac_reward_zero_std" in e
        ]
        pending = list(getattr(self.trainer, "_metrics", {}).get("train", {}).get("frac_reward_zero_std", []))
        warnings.warn(
            f"training is lowering the held-out score: {self.before:.3f} before, {score:.3f} after {step} "
            f"steps ({self.rows} held-out rows; more than evaluation noise). {advice(self.trainer.sdpo_config, logged + pending)}",
            RegressionWarning,
            stacklevel=2,
        )
