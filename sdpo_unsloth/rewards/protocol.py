"""The reward protocol, and the guard that holds every reward function to it.

A reward function has TRL's signature `f(prompts, completions, **kwargs)` and returns one value per
completion. Three ways to also give SDPO's teacher feedback:

1. a plain function returning `list[float]` (no feedback);
2. a callable whose `last_feedback: list[str]` is set by each call (the seed's pattern);
3. a function returning `RewardResult(score, feedback)` per completion.

`None` means "cannot score this completion" (TRL skips it); a call that scores none of its completions
warns once (`NoSignalWarning`): those completions teach nothing. With several rewards the trainer warns
instead when no reward scored any completion of a batch (one reward's None where another scores is TRL's
multi-task pattern). Anything else that is not one finite
number per completion is an error that names the reward and the fix: TRL itself silently scores
NaN as 0, broadcasts a 1-element list, and turns one `inf` into NaN weights. A reward that raises is
reported with its error; a `TypeError` from the call itself (a parameter that is not a dataset column, no
`**kwargs`) names the columns it is called with.

Each call runs in a helper thread, joined with a timeout (`timeout`, default `DEFAULT_REWARD_TIMEOUT`
seconds): a reward that hangs stops training with a `RewardTimeout` naming the reward and the time,
before anything is saved. Python cannot kill a thread, so the hung call is abandoned (a daemon thread)
and the process should exit. `timeout=None` calls the reward directly in the caller's thread. A call running longer than `slow_after` seconds is reported every second
to `on_slow(name, seconds)` (the progress bar shows it).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

DEFAULT_REWARD_TIMEOUT = (
    600.0  # seconds per call: generous; a code reward on a slow T4 batch stays well under
)
SLOW_REWARD_AFTER = 10.0  # seconds before a running call is reported as slow
# what the trainer passes besides the dataset columns (TRL's GRPOTrainer: completion ids, its state, loggers)
_TRAINER_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardResult(NamedTuple):
    """A score with the feedback that explains it.

    >>> RewardResult(0.0, "Wrong. The answer is 7, not 5.")
    RewardResult(score=0.0, feedback='Wrong. The answer is 7, not 5.')
    """

    score: float | None
    feedback: str = ""


class RewardError(ValueError):
    """A reward function broke the protocol; the message names it and says what to change."""


class RewardTimeout(RewardError):
    """A reward call ran past its timeout; training stopped before the step's update. `reward` and `seconds`
    name the reward and its timeout."""

    def __init__(self, message: str, reward: str = "", seconds: float | None = None):
        super().__init__(message)
        self.reward, self.seconds = reward, seconds


class NoSignalWarning(UserWarning):
    """A reward scored none of a call's completions (None for each): they give no training signal."""


def question_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The question of a prompt: a string, or the last user message of a chat prompt ("" if it has none).

    >>> question_text([{"role": "system", "content": "Add."}, {"role": "user", "content": "2+3="}])
    '2+3='
    """
    if isinstance(prompt, str):
        return prompt
    users = [str(m.get("content") or "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a completion: a string, or the assistant contents of a chat message list.

    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    """
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # multimodal parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        parts.append(str(content))
    return "\n".join(parts)


def reward_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def _score(value: Any, name: str, index: int) -> tuple[float | None, str | None]:
    feedback = None
    if isinstance(value, RewardResult):
        value, feedback = value.score, value.feedback
    if value is None:
        return None, feedback
    if isinstance(value, dict):
        raise RewardError(
            f"reward '{name}' returned a dict for completion {index} ({value!r:.80}). Reward functions must "
            "return list[float], not list[dict]. Put feedback on `self.last_feedback` or return "
            "sdpo_unsloth.RewardResult(score, feedback)."
        )
    if not isinstance(value, int | float):  # bool is an int: True scores 1.0
        try:
            value = float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise RewardError(
                f"reward '{name}' returned {type(value).__name__} for completion {index}; expected a float "
                "(or None to skip the completion, or RewardResult(score, feedback))."
            ) from None
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(
            f"reward '{name}' returned {value} for completion {index}. Rewards must be finite: one inf or NaN "
            "turns every weight into NaN. Return None to skip a completion you cannot score."
        )
    if feedback is not None and not isinstance(feedback, str):
        raise RewardError(f"reward '{name}' gave feedback of type {type(feedback).__name__}; use a string.")
    return value, feedback


class CheckedReward:
    """Wraps a user reward: calls it, checks its output, and keeps this call's feedback.

    `last_scores` and `last_feedback` always describe the most recent call only, so feedback can
    never leak from one batch into the next.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        timeout: float | None = DEFAULT_REWARD_TIMEOUT,
        slow_after: float = SLOW_REWARD_AFTER,
        on_slow: Callable[[str, float], None] | None = None,
    ):
        if inspect.isclass(func):
            raise RewardError(
                f"reward {func.__name__} is a class; pass an instance, {func.__name__}() (calling the class "
                "would build an object, not score the completions)."
            )
        if not callable(func):
            raise RewardError(f"reward {func!r} is not callable; pass a function or an object with __call__.")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise RewardError(
                f"`reward_timeout` must be a positive number of seconds or None, got {timeout!r}."
            )
        self.func = func
        self.timeout = timeout
        self.slow_after = slow_after
        self.on_slow = on_slow
        self.__name__ = reward_name(func)
        self.last_scores: list[float | None] = []
        self.last_feedback: list[str] = []
        # Off when other rewards share the run: one that scores None where another scores is TRL's multi-task
        # pattern, so the trainer warns only when no reward scored a completion (`SDPOTrainer._total_rewards`).
        self.warn_all_none = True
        self.warned_no_signal = False

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        self._start()
        try:
            output = self._call_with_timeout(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:
            raise self._raised(exc, kwargs) from exc
        return self._check(output, len(completions))

    def _start(self) -> None:
        self.last_scores, self.last_feedback = [], []
        if hasattr(self.func, "last_feedback"):
            self.func.last_feedback = []  # a reward that forgets to reset it must not leak old feedback

    def _raised(self, exc: Exception, kwargs: dict[str, Any]) -> Exception:
        if isinstance(exc, RewardError):
            return exc
        raised = f"reward '{self.__name__}' raised {type(exc).__name__}: {exc}."
        hint = self._signature_hint(kwargs) if isinstance(exc, TypeError) else None
        return RewardError(
            f"{raised} {hint}"
            if hint
            else f"{raised} Fix the reward function or the data it reads; where a failure can happen (a flaky API, an input it "
            "cannot parse), catch it there and return None for the completions it cannot score."
        )

    def _signature_hint(self, kwargs: dict[str, Any]) -> str | None:
        """What to change when the call itself does not fit the reward's parameters (None: it fits, so the
        TypeError came from inside the reward)."""
        try:
            signature = inspect.signature(self.func)
        except (TypeError, ValueError):  # no signature to read (some builtins)
            return None
        arguments = {"prompts": None, "completions": None, **kwargs}
        try:
            signature.bind(**arguments)
            return None
        except TypeError:
            pass
        columns = [k for k in arguments if k not in _TRAINER_ARGUMENTS]
        shown = ", ".join(columns) if columns else "none"
        called = (
            f"It is called as f(prompts=..., completions=..., completion_ids=..., trainer_state=..., "
            f"**dataset_columns), with the dataset columns {shown}"
        )
        params = signature.parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        missing = [
            p.name for p in params if p.kind in named and p.default is p.empty and p.name not in arguments
        ]
        if missing:
            return (
                f"{called}: no column is named {', '.join(repr(m) for m in missing)}. Name its parameters after "
                "the dataset's columns (or give them defaults), or add the column to the dataset."
            )
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return f"{called}: accept **kwargs for the arguments and columns you do not use."
        return f"{called}: take these by keyword (no positional-only parameters)."

    def _check(self, output: Any, n: int) -> list[float | None]:
        name = self.__name__
        if inspect.isawaitable(output):
            if hasattr(output, "close"):
                output.close()  # never awaited: close it so Python does not warn about it
            raise RewardError(
                f"reward '{name}' returned an awaitable from a plain call; define it with `async def` (or an "
                "`async def __call__`) so it runs on the trainer's event loop."
            )
        if hasattr(output, "tolist") and not isinstance(output, str | bytes):
            output = output.tolist()  # numpy arrays, torch tensors
        if isinstance(output, str | bytes) or not isinstance(output, Sequence):
            raise RewardError(
                f"reward '{name}' returned {type(output).__name__}; it must return a list with one float per "
                f"completion ({n} here)."
            )
        if len(output) != n:
            raise RewardError(
                f"reward '{name}' returned {len(output)} values for {n} completions; return exactly one per "
                "completion (no broadcasting)."
            )
        scores, feedback = [], []
        for i, value in enumerate(output):
            score, note = _score(value, name, i)
            scores.append(score)
            feedback.append(note)
        attribute = getattr(self.func, "last_feedback", None)
        if hasattr(attribute, "tolist") and not isinstance(attribute, str):
            attribute = attribute.tolist()  # a numpy array of strings
        if isinstance(attribute, str) and attribute:
            raise RewardError(
                f"reward '{name}' set last_feedback to a str ({attribute!r:.60}); it must be a list with one string "
                f"per completion ({n} here), e.g. [{attribute!r:.30}] * {n} for the same note on each, fresh on "
                "every call."
            )
        if attribute:
            if not isinstance(attribute, Sequence) or len(attribute) != n:
                size = len(attribute) if isinstance(attribute, Sequence) else type(attribute).__name__
                raise RewardError(
                    f"reward '{name}' set last_feedback with {size} entries for {n} completions; set one string "
                    "per completion (use '' where there is nothing to say), fresh on every call."
                )
            for i, note in enumerate(attribute):
                if note is not None and not isinstance(note, str):
                    raise RewardError(
                        f"reward '{name}' put a {type(note).__name__} in last_feedback[{i}]; use strings."
                    )
                feedback[i] = feedback[i] or note
        self.last_scores = scores
        self.last_feedback = [note or "" for note in feedback]
        if n and self.warn_all_none and all(score is None for score in scores) and not self.warned_no_signal:
            self.warned_no_signal = True
            warnings.warn(
                f"reward '{name}' returned None for all {n} completions of a call: None means 'cannot score', so "
                "these completions give no training signal (and no held-out score). Return 0.0 for a wrong "
                "answer and None only for a completion that cannot be judged. (Said once per reward.)",
                NoSignalWarning,
                stacklevel=3,
            )
        return scores

    def _call_with_timeout(self, **kwargs: Any) -> Any:
        """Run the reward in a daemon thread; raise RewardTimeout if it outlives `timeout`.

        `timeout=None` calls it directly in this thread (for rewards that need the main thread, e.g. signals).
        """
        if self.timeout is None:
            return self.func(**kwargs)
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = self.func(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        worker = threading.Thread(target=target, name=f"reward-{self.__name__}", daemon=True)
        start = time.monotonic()
        worker.start()
        while True:
            elapsed = time.monotonic() - start
            left = self.timeout - elapsed
            if left <= 0:
                break
            worker.join(min(1.0, left))
            if not worker.is_alive():
                break
            elapsed = time.monotonic() - start
            if self.on_slow is not None and elapsed >= self.slow_after:
                self.on_slow(self.__name__, elapsed)
        if worker.is_alive():
            raise RewardTimeout(
                f"reward '{self.__name__}' did not return within {self.timeout:g} s (reward_timeout); training "
                "stopped before this step's update and nothing was saved for it. The call cannot be killed (it "
                "runs in a thread): exit this process. Make the reward faster or raise reward_timeout, then resume "
                "from the last checkpoint.",
                self.__name__,
                self.timeout,
            )
        if self.on_slow is not None and time.monotonic() - start >= self.slow_after:
            self.on_slow(self.__name__, -1.0)  # done: clear the note
        if "error" in result:
            raise result["error"]
        return result["value"]


class AsyncCheckedReward(CheckedReward):
    """`CheckedReward` for an `async def` reward: TRL awaits it on its event loop, as it does the reward."""

    async def __call__(  # type: ignore[override]
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        self._start()
        try:  # calling an async function with arguments it does not take raises here
            call = self.func(prompts=prompts, completions=completions, **kwargs)
            output = await (call if self.timeout is None else asyncio.wait_for(call, self.timeout))
        except TimeoutError:
            raise RewardTimeout(
                f"reward '{self.__name__}' did not return within {self.timeout:g} s (reward_timeout); training "
                "stopped before this step's update and nothing was saved for it. Make the reward faster or raise "
                "reward_timeout, then resume from the last checkpoint.",
                self.__name__,
                self.timeout,
            ) from None
        except Exception as exc:
            raise self._raised(exc, kwargs) from exc
        return self._check(output, len(completions))


def checked_reward(func: Callable[..., Any], **options: Any) -> CheckedReward:
    """Wrap `func` in the guard that matches it (`AsyncCheckedReward` for coroutine functions); `options`
    go to its constructor (`timeout`, `slow_after`, `on_slow`)."""
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)
    return (AsyncCheckedReward if is_async else CheckedReward)(func, **options)


def combine_feedback(rewards: Sequence[CheckedReward]) -> list[str]:
    """Per-completion feedback of several rewards, joined by newlines (empty ones skipped)."""
    if not rewards:
        return []
    n = len(rewards[0].last_feedback)
    return [
        "\n".join(r.last_feedback[i] for r in rewards if r.last_feedback and r.last_feedback[i])
        for i in range(n)
    ]
