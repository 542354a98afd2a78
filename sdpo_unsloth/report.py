"""What a `train()` run shows and leaves behind: the compact progress line, the reward-curve plot and the
JSON-safe summary written to train_result.json.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_PROGRESS_KEYS = ("reward", "sdpo/distill_loss", "sdpo/frac_with_demo", "sdpo/frac_with_feedback", "loss")


def _use_compact_progress(trainer: Any) -> None:
    """The progress bar, plus one short line about ten times per run instead of a log dict every step."""
    from transformers import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            every = max(1, state.max_steps // 10)
            if self.training_bar is None or not logs or "reward" not in logs or state.global_step % every:
                return
            parts = [f"{k.removeprefix('sdpo/')} {logs[k]:.3g}" for k in _PROGRESS_KEYS if k in logs]
            self.training_bar.write(f"step {state.global_step}: " + ", ".join(parts))

    from .rewards.protocol import CheckedReward

    progress = CompactProgress()

    def slow_reward(name: str, seconds: float) -> None:  # a long reward call shows on the bar
        if progress.training_bar is not None:
            progress.training_bar.set_postfix_str("" if seconds < 0 else f"reward {name}: {seconds:.0f} s")

    for reward in trainer._checked_rewards:
        if isinstance(reward, CheckedReward):
            reward.on_slow = slow_reward
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)


def _plot_rewards(
    history: Sequence[dict[str, Any]], path: Path, before: float | None, after: float | None
) -> str | None:
    """Reward (and SDPO distillation loss) per step as a PNG; None with a warning without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn(
            "matplotlib is not installed, so no reward curve was drawn: pip install matplotlib", stacklevel=3
        )
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [
            (e["step"], e[key])
            for e in history
            if key in e and "step" in e and isinstance(e[key], int | float)
        ]
        return [p[0] for p in points], [float(p[1]) for p in points]

    steps, reward = series("reward")
    loss_steps, loss = series("sdpo/distill_loss")
    figure = Figure(figsize=(8, 3.2 if not loss else 5.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if loss else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, reward, marker="o", markersize=3, label="train reward (sampled completions)")
    for value, label, style in (
        (before, "held-out before (greedy)", ":"),
        (after, "held-out after (greedy)", "--"),
    ):
        if value is not None:
            axes[0].axhline(
                value,
                linestyle=style,
                color="gray" if style == ":" else "black",
                label=f"{label}: {value:.3f}",
            )
    axes[0].set_ylabel("reward")
    axes[0].legend(loc="best", fontsize=8)
    axes[0].set_title("SDPO training")
    if loss:
        axes[1].plot(loss_steps, loss, color="tab:red", marker="o", markersize=3)
        axes[1].set_ylabel("sdpo/distill_loss")
    axes[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(str(path))
    return str(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
