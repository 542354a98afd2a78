"""No-op warnings: a run that trains without being able to learn says so, once, with the cause and the fix.

`NoOpWatchdog` is a `TrainerCallback` that `SDPOTrainer` adds unless `SDPOConfig(warn_noop=False)`. It
reads the metrics the trainer already logs (`on_log`) and measures one more, the student adapter's
relative change per optimizer step, logged as `sdpo/student_relative_change`:

    relative change = ||theta_t - theta_{t-1}|| / ||theta_{t-1}||     over every trainable student tensor

It costs one copy of the student's trainable (LoRA) tensors, the size of the teacher adapter.

Each warning is a `NoOpWarning` (a `UserWarning`), raised at most once per run on the main process;
silence all of them with `SDPOConfig(warn_noop=False)` or
`warnings.filterwarnings("ignore", category=NoOpWarning)`. A condition must hold over `PATIENCE_STEPS`
optimizer steps in a row (measured at each log, so `logging_steps` > 1 covers several steps per log).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

# Optimizer steps in a row a condition must hold before it warns.
PATIENCE_STEPS = 5
# `sdpo/teacher_student_kl` (nats per token, on the top-K support) under which the teacher teaches nothing.
# Measured (benchmarks/learning/lora_movement.py): the tests' tiny random model, whose near-uniform predictions barely
# depend on the prompt, shows ~1e-4; a model whose predictions ignore the prompt shows 0 (tests/test_watchdog.py).
GAP_MIN = 1e-6
# `completions/clipped_ratio` at or above which completions count as cut at the token budget: nearly all of
# them. A task scored on its first tokens can learn with many cut (the embedded addition demo, 8 tokens:
# 0.875 and 0.75 in its first steps, benchmarks/learning/lora_movement.py --model embedded, then learns).
CLIPPED_MAX = 0.9
# Student adapter relative change per step under which it counts as not moving. First AdamW step, LoRA r16
# (benchmarks/learning/lora_movement.py, docs/configuration.md "Learning rate"): lr 1e-5 moves the tiny test model's
# adapter 9.5e-5 and the embedded SmolLM2-135M's 4.7e-4; lr 2e-4 (the kit's default) 1.9e-3 and 9.4e-3. It grows
# with the layer width (LoRA A starts at ~1/sqrt(fan_in)), so wide models pass at lower rates.
MOVE_MIN = 1e-3
# Steps after warmup over which the mean relative change is compared with MOVE_MIN (once per run).
MOVE_WINDOW = 3


class NoOpWarning(UserWarning):
    """Training runs but cannot learn: the message names the cause and the fix."""


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class NoOpWatchdog(TrainerCallback):
    """Warns once per cause when training is a no-op (see the module docstring for the conditions)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.fired: set[str] = set()  # causes already warned about in this run
        self._previous: list[torch.Tensor] | None = None
        self._had_gradient = False
        self._moves: list[float] = []
        self._streaks: dict[str, int] = {}  # cause -> global step before the streak began
        self._last_log_step = 0

    # ------------------------------------------------------------------ student movement

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in _trainable(self.trainer.model)]

    def on_train_begin(self, args, state, control, **kwargs):
        self.fired.clear()
        self._moves = []
        self._streaks = {}
        self._last_log_step = state.global_step
        self._previous = self._snapshot()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in _trainable(self.trainer.model) if p.grad is not None]
        self._had_gradient = any(bool(g.detach().abs().max() > 0) for g in grads)

    def on_step_end(self, args, state, control, **kwargs):
        current = self._snapshot()
        previous, self._previous = self._previous, current
        if previous is None or len(previous) != len(current):
            return
        delta = math.sqrt(sum(float((c - p).pow(2).sum()) for c, p in zip(current, previous, strict=True)))
        norm = math.sqrt(sum(float(p.pow(2).sum()) for p in previous))
        relative = delta / norm if norm > 0 else float("nan")
        self.trainer._metrics["train"]["sdpo/student_relative_change"].append(relative)
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps > 0 else 0
        if not self._had_gradient or state.global_step <= warmup or len(self._moves) >= MOVE_WINDOW:
            return  # a step with no loss (every sample masked) says nothing about the learning rate
        self._moves.append(relative)
        mean = sum(self._moves) / len(self._moves)
        if len(self._moves) == MOVE_WINDOW and mean < MOVE_MIN:
            self._warn(
                "student_not_moving",
                f"the student adapter is not moving: over {MOVE_WINDOW} optimizer steps after warmup its trainable "
                f"weights changed by {mean:.1e} of their norm per step (sdpo/student_relative_change; the watchdog "
                f"expects at least {MOVE_MIN:.0e}) with learning_rate={args.learning_rate:g}. Cause: a learning rate "
                "meant for full fine-tuning (the paper's 1e-5) barely moves a LoRA adapter. Fix: raise "
                "learning_rate to 1e-4..5e-4 (sdpo_unsloth.train uses 2e-4; see docs/configuration.md).",
            )

    # ------------------------------------------------------------------ logged metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "reward" not in logs:
            return  # an evaluation log or the final summary
        step = state.global_step
        masked = logs.get("sdpo/frac_masked")
        gap = logs.get("sdpo/teacher_student_kl")
        if gap is None and logs.get("sdpo/distill_loss") is not None:
            gap = abs(logs["sdpo/distill_loss"])  # sampled-token mode: a one-sample KL estimate
        reward_std = logs.get("reward_std")
        clipped = logs.get("completions/clipped_ratio")
        sdpo = self.trainer.sdpo_config
        length = getattr(args, "max_completion_length", None)
        checks = {
            "all_masked": (
                masked is not None
                and masked >= 1.0 - 1e-9
                and not (sdpo.grpo_weight > 0 and (reward_std or 0.0) > 0),  # the hybrid's GRPO term trains
                "every sample was masked (sdpo/frac_masked = 1) for {n} optimizer steps: no sample had a successful "
                f"sibling (total reward >= success_reward_threshold={sdpo.success_reward_threshold:g}) or feedback, "
                "so there is no loss and nothing trains. Fix: have the reward leave feedback on `last_feedback`, "
                "lower success_reward_threshold to what a correct answer scores, or pick an easier task "
                "(sdpo_unsloth.preflight checks this before training).",
            ),
            "gap_zero": (
                gap is not None and gap < GAP_MIN and (masked is None or masked < 1.0),
                "the teacher-student gap is near zero (sdpo/teacher_student_kl < {GAP_MIN:.0e} nats/token) for {n} "
                "optimizer steps: the teacher, shown the feedback or demonstration, predicts the student's tokens "
                "as the student does, so the distillation loss teaches nothing. Cause: the text the teacher sees "
                "does not bear on the answer (uninformative feedback, a template that hides it) or the model "
                "ignores it. Fix: read output_dir/diagnostics/diagnostics.html to see what the teacher saw; make "
                "the feedback name what was wrong and the right answer, or let successful siblings demonstrate.",
            ),
            "rewards_constant": (
                reward_std is not None and reward_std == 0.0,
                "the rewards were constant (reward_std = 0, reward = {reward}) for {n} optimizer steps: no "
                "completion scores differently from its siblings, so there are no successful demonstrations to "
                "learn from (and GRPO's advantages are 0). Fix: check that the reward can return other values on "
                "these completions, give partial credit, or pick a task the model solves sometimes.",
            ),
            "truncated": (
                clipped is not None and clipped >= CLIPPED_MAX and (logs.get("reward") or 0.0) <= 0.0,
                "{clipped:.0%} of completions hit the token budget (completions/clipped_ratio, "
                f"max_completion_length={length}) and none scored for {{n}} optimizer steps: answers are cut "
                "before they end, so rewards score truncated text and nothing succeeds. Fix: raise "
                "max_completion_length or ask for a shorter answer in the prompt. (A task scored on the first "
                "tokens can learn with most completions cut: this warns only when the rewards are 0.)",
            ),
        }
        # Only a generation logs the rollout metrics: with num_iterations > 1 (or steps_per_generation above the
        # accumulation) a step without them neither extends nor breaks a streak.
        measured = {
            "all_masked": masked is not None,
            "gap_zero": gap is not None,
            "rewards_constant": reward_std is not None,
            "truncated": clipped is not None,
        }
        for cause, (holds, message) in checks.items():
            if not measured.get(cause, True):
                continue
            if not holds:
                self._streaks.pop(cause, None)
                continue
            start = self._streaks.setdefault(cause, self._last_log_step)
            if step - start >= PATIENCE_STEPS:
                self._warn(
                    cause,
                    message.format(
                        n=step - start, GAP_MIN=GAP_MIN, reward=logs.get("reward"), clipped=clipped or 0.0
                    ),
                )
        self._last_log_step = step

    def _warn(self, cause: str, message: str) -> None:
        if cause in self.fired:
            return
        self.fired.add(cause)
        if self.trainer.state.is_world_process_zero:
            warnings.warn(f"SDPO no-op: {message}", NoOpWarning, stacklevel=2)
