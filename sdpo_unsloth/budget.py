"""`TimeBudget`: stop training cleanly, with a complete checkpoint, before a wall-time budget runs out.

Free Colab/Kaggle sessions end after 9-12 h. After each optimizer step the callback estimates the
next one from the measured ones and stops the run when

    elapsed + next_step + (1 + after_stop_saves) x save + reserve_s > budget

    next_step = margin x (longest of the last `window` steps)
    save      = the last measured checkpoint save (before the first one: next_step)

by asking the Trainer to save a checkpoint (teacher adapter included) and stop. `after_stop_saves`
counts writes after training of about a checkpoint's cost (`train()` passes its number of exports);
`reserve_s` is time kept for anything else (`train()` keeps the duration of its "before" evaluation,
for the "after" one). A merged 16-bit export writes the base weights too and costs more than a
checkpoint: leave it room in the budget.

    budget = TimeBudget("11h30m")        # or SDPOConfig(time_budget="11h30m"): trainer.time_budget
    trainer.add_callback(budget)
    trainer.train()
    if budget.stopped_at is not None:    # later: trainer.train(resume_from_checkpoint=True)
        print(budget.summary(trainer.state.max_steps))
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from .bootstrap import bootstrap

bootstrap()

from transformers import TrainerCallback  # noqa: E402

from .config import parse_duration  # noqa: E402


class TimeBudget(TrainerCallback):
    """Save and stop before the next step would cross `budget` (seconds or a duration string).

    Attributes after training: `stopped_at` (the step it stopped after, or None), `checkpoint` (the
    checkpoint it saved), `step_seconds` (measured step durations, the latest last).
    """

    def __init__(
        self,
        budget: float | str,
        *,
        start: float | None = None,
        reserve_s: float = 0.0,
        after_stop_saves: int = 0,
        margin: float = 1.25,
        window: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.budget = parse_duration(budget)
        self.start = start
        self.reserve_s = reserve_s
        self.after_stop_saves = after_stop_saves
        self.margin = margin
        self.clock = clock
        self.step_seconds: deque[float] = deque(maxlen=window)
        self.save_seconds: float | None = None
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._last_mark: float | None = None

    def elapsed(self) -> float:
        return 0.0 if self.start is None else self.clock() - self.start

    def next_step_estimate(self) -> float:
        return self.margin * max(self.step_seconds, default=0.0)

    def save_estimate(self) -> float:
        return self.next_step_estimate() if self.save_seconds is None else self.save_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        now = self.clock()
        if self.start is None:
            self.start = now
        self._last_mark = now

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self._last_mark is not None:
            self.step_seconds.append(now - self._last_mark)
        self._last_mark = now
        if state.global_step >= state.max_steps:
            return control
        saves = (1 + self.after_stop_saves) * self.save_estimate()
        needed = self.elapsed() + self.next_step_estimate() + saves + self.reserve_s
        if _any_process(needed > self.budget):  # under several processes all stop at the same step
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        now = self.clock()
        if self._last_mark is not None:
            self.save_seconds = now - self._last_mark
        self._last_mark = now  # the next step's time starts after the save
        if self.stopped_at == state.global_step:
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return control

    def summary(self, max_steps: int) -> str:
        """One line on why the run stopped, for the user."""
        last = self.step_seconds[-1] if self.step_seconds else 0.0
        return (
            f"time budget {self.budget:g} s: stopped after step {self.stopped_at}/{max_steps} at "
            f"{self.elapsed():.1f} s (last step {last:.1f} s, next estimated {self.next_step_estimate():.1f} s); "
            f"complete checkpoint: {self.checkpoint}"
        )


def _any_process(flag: bool) -> bool:
    """`flag` of this process, or'ed over all processes when several train (a collective: every process
    calls it at every step end)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from accelerate import PartialState

    value = torch.tensor([float(flag)], device=PartialState().device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
