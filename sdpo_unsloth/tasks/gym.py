"""reasoning-gym tasks as datasets, scored by each task's own verifier, with feedback for SDPO's teacher.

`reasoning-gym <https://pypi.org/project/reasoning-gym/>`_ (optional extra ``tasks``) generates 100+
procedural tasks with verifiers. ``train(dataset="gym:<task>")`` (CLI ``--dataset gym:<task>``) uses
one; the task's config goes after a ``?`` as ``key=value`` pairs joined by ``&``, each value read as
JSON when it parses (else as a string)::

    gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1
    gym:letter_counting?min_words=3&max_words=5

Rows carry where their entry came from (``gym_task``, ``gym_config``, ``gym_seed``, ``gym_size``,
``gym_index``); `GymReward` rebuilds the task's dataset from them (cached) and scores with its
``score_answer(answer, entry)`` on the original entry: the verification is the task's, not ours.

Answer extraction. Small instruct models answer in sentences ("The answer is 7."), while the verifiers
are strict (mostly exact match, with partial credit when the expected answer is inside a longer one).
The reward tries, in order: the last ``<answer>...</answer>`` tag (only that one when present), else
the last number (when the expected answer is a number), the last line (trailing period dropped) and
the raw text, and keeps the best verifier score (a typographic minus, U+2212, reads as ``-``). Feedback
on a miss names the expected and the given answer ("Wrong. The answer is 7, not 5.") plus the
verifier's partial score when it gave one; ``reveal_answer=False`` leaves the expected answer out ("Wrong:
5 is not the answer."), so the teacher learns only that the attempt failed.

Numbers are right or wrong. reasoning-gym's default verifier (``ProceduralDataset.score_answer``, kept by
a third of its tasks, lcm and gcd among them) gives ``len(expected) / len(answer)`` when the expected answer
is a substring of the given one: "14" scores 0.5 for 4, and a sentence that echoes the question's numbers
scores 0.01-0.05 for lcm(14, 14) = 14. On the untrained embedded model that was 27 of 64 sampled lcm answers
and 28 of 64 gcd answers, and a quarter of lcm's prompt groups had a reward spread without a single right
answer (benchmarks/investigations/gym_substring_credit.py): GRPO trained on those as on a success (its
advantages are scaled by the group's spread). So where
the expected answer is a number and the task keeps that default verifier, `GymReward` scores 1 for the
right answer and 0 otherwise (``number_substring_credit=True`` restores the verifier's partial credit). Tasks
with their own ``score_answer`` keep its scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "GYM_PREFIX",
    "SYSTEM_PROMPT",
    "GymReward",
    "answer_candidates",
    "gym_dataset",
    "parse_gym_name",
]

GYM_PREFIX = "gym:"
SYSTEM_PROMPT = "Answer with just the final answer."
INSTALL_HINT = "pip install 'sdpo-unsloth[tasks]' (or: pip install reasoning-gym)"
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S | re.I)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:/\d+)?")
_PLAIN = re.compile(r"[\w .,:;+\-*/=()<>%]{1,80}")
_COLUMNS = ("gym_task", "gym_config", "gym_seed", "gym_size", "gym_index")


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError(f"gym: datasets need the reasoning-gym package: {INSTALL_HINT}") from None
    return reasoning_gym


def parse_gym_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"gym:task?key=value&..."`` -> (task, config); values are JSON when they parse, else strings.

    >>> parse_gym_name("gym:basic_arithmetic?max_terms=2&ops=[\\"+\\"]&mode=easy")
    ('basic_arithmetic', {'max_terms': 2, 'ops': ['+'], 'mode': 'easy'})
    >>> parse_gym_name("gym:count_bits")
    ('count_bits', {})
    """
    if not name.startswith(GYM_PREFIX):
        raise ValueError(f"a reasoning-gym dataset name starts with {GYM_PREFIX!r}, got {name!r}")
    task, _, query = name[len(GYM_PREFIX) :].partition("?")
    if not task:
        raise ValueError(f"{name!r} names no task; use e.g. 'gym:basic_arithmetic' or 'gym:count_bits'.")
    config: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad task setting {pair!r} in {name!r}: write key=value pairs joined by '&'.")
        if key in config:
            raise ValueError(f"task setting {key!r} is given twice in {name!r}; give it once.")
        json_word = {"True": "true", "False": "false", "None": "null"}.get(text)
        if json_word:  # Python's spelling: kept as text, "False" would be a true value
            raise ValueError(
                f"task setting {key}={text} in {name!r}: values are JSON, write {key}={json_word}."
            )
        try:
            config[key] = json.loads(text)
        except ValueError:
            config[key] = text
    return task, config


@lru_cache(maxsize=16)
def _task_dataset(task: str, config_json: str, seed: int, size: int) -> Any:
    rg = _reasoning_gym()
    try:
        return rg.create_dataset(task, size=size, seed=seed, **json.loads(config_json))
    except ValueError as exc:
        if "not registered" in str(exc):
            known = ", ".join(sorted(rg.factory.DATASETS))
            raise ValueError(f"reasoning-gym has no task {task!r}; known tasks: {known}") from None
        raise ValueError(f"reasoning-gym rejected the config of {task!r}: {exc}") from None
    except (TypeError, AssertionError) as exc:
        raise ValueError(
            f"reasoning-gym rejected the config {config_json} of {task!r}: {exc or type(exc).__name__}. "
            f"See the fields of its config class (reasoning_gym.factory.DATASETS[{task!r}])."
        ) from None


def gym_dataset(
    task: str,
    n: int,
    *,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """``n`` rows of the reasoning-gym task ``task`` (its ``question`` as the user message).

    Args:
        task: a reasoning-gym task name (``reasoning_gym.factory.DATASETS``), e.g. "basic_arithmetic".
        n: number of rows.
        seed: the task generator's seed (same seed and config, same rows).
        config: the task's config fields, e.g. ``{"max_terms": 2}``.
        system_prompt: system message; None leaves it out.

    Returns:
        Rows ``{"prompt": [system?, user], "answer": str, "gym_task", "gym_config", "gym_seed", "gym_size",
        "gym_index"}``; the ``gym_*`` columns let `GymReward` find each row's entry for the verifier.
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    config_json = json.dumps(dict(config or {}), sort_keys=True)
    data = _task_dataset(task, config_json, seed, n)
    rows = []
    for index in range(n):
        entry = data[index]
        prompt = [{"role": "user", "content": str(entry["question"])}]
        if system_prompt is not None:
            prompt.insert(0, {"role": "system", "content": system_prompt})
        rows.append(
            {
                "prompt": prompt,
                "answer": str(entry["answer"]),
                "gym_task": task,
                "gym_config": config_json,
                "gym_seed": seed,
                "gym_size": n,
                "gym_index": index,
            }
        )
    return rows


def _text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    if isinstance(completion, str):
        return completion
    return "\n".join(
        str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant"
    )


def answer_candidates(text: str, expected: str) -> list[str]:
    """What the completion may mean as its answer, most specific first (see the module docstring).

    >>> answer_candidates("Sure. <answer> 12 </answer>", "12")
    ['12']
    >>> answer_candidates("5 - 3 = 2, then 2 - 6 = -4.", "-4")
    ['-4', '5 - 3 = 2, then 2 - 6 = -4', '5 - 3 = 2, then 2 - 6 = -4.']
    >>> answer_candidates("So it is \u22124", "-4")[0]
    '-4'
    >>> answer_candidates("It is blue.\\nblue", "red")
    ['blue', 'It is blue.\\nblue']
    """
    text = text.replace("\u2212", "-")  # the typographic minus: "\u22124" is -4, not 4
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return [tags[-1].strip()]
    candidates = []
    if _NUMBER.fullmatch(expected.strip()):
        numbers = _NUMBER.findall(text)
        if numbers:
            candidates.append(numbers[-1].rstrip(".,"))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        candidates.append(lines[-1].rstrip("."))
    candidates.append(text.strip())
    return list(dict.fromkeys(c for c in candidates if c))


def _shown(value: str, limit: int) -> str:
    value = value if len(value) <= limit else value[: limit - 3] + "..."
    return value if _PLAIN.fullmatch(value) else repr(value)  # model text never poses as instructions


def _substring_credit(data: Any, expected: str) -> bool:
    """Whether `data` scores a numeric `expected` answer with reasoning-gym's default verifier, whose only
    partial credit is for containing the expected answer."""
    from reasoning_gym.dataset import ProceduralDataset

    default = getattr(type(data), "score_answer", None) is ProceduralDataset.score_answer
    return default and _NUMBER.fullmatch(expected.strip()) is not None


class GymReward:
    """The reasoning-gym task's own verifier as a reward, with feedback naming the expected answer.

    Follows the reward protocol: TRL's signature, one float per completion (the verifier's score in
    [0, 1]), and ``last_feedback`` (``""`` on a full score) set by every call. Reads the ``answer`` and
    ``gym_*`` columns that `gym_dataset` writes.

    >>> rows = gym_dataset("basic_arithmetic", 2, seed=0, config={"max_terms": 2, "max_digits": 1})
    >>> columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    >>> reward = GymReward()
    >>> reward(prompts=[r["prompt"] for r in rows], completions=["The answer is -1.", "3"], **columns)
    [1.0, 0.0]
    >>> reward.last_feedback
    ['', 'Wrong. The answer is 2, not 3.']
    """

    __name__ = "gym_verifier"

    def __init__(
        self,
        max_feedback_chars: int = 400,
        number_substring_credit: bool = False,
        reveal_answer: bool = True,
    ):
        if max_feedback_chars < 40:
            raise ValueError(f"`max_feedback_chars` must be >= 40, got {max_feedback_chars}")
        self.max_feedback_chars = max_feedback_chars
        self.number_substring_credit = number_substring_credit
        self.reveal_answer = reveal_answer
        self.last_feedback: list[str] = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        missing = [c for c in ("answer", *_COLUMNS) if c not in columns]
        if missing:
            raise ValueError(
                f"{self.__name__} needs the dataset columns {', '.join(missing)}; build the rows with "
                "sdpo_unsloth.tasks.gym.gym_dataset (or dataset='gym:<task>') and keep their columns."
            )
        scores: list[float] = []
        feedback: list[str] = []
        for i, completion in enumerate(completions):
            data = _task_dataset(
                columns["gym_task"][i],
                columns["gym_config"][i],
                columns["gym_seed"][i],
                columns["gym_size"][i],
            )
            entry = data[int(columns["gym_index"][i])]
            expected = str(entry["answer"])
            text = _text(completion)
            scored = [(float(data.score_answer(c, entry)), c) for c in answer_candidates(text, expected)]
            score, given = max(scored, key=lambda pair: pair[0], default=(0.0, ""))
            if score < 1.0 and not self.number_substring_credit and _substring_credit(data, expected):
                score = 0.0  # the right digits inside another number or a sentence: wrong (module docstring)
            scores.append(score)
            feedback.append("" if score >= 1.0 else self._feedback(expected, given, score))
        self.last_feedback = feedback
        return scores

    def _feedback(self, expected: str, given: str, score: float) -> str:
        shown = _shown(given, 80)
        if not self.reveal_answer:
            note = f"Wrong: {shown} is not the answer." if given else "Wrong: the reply gave no answer."
        else:
            answer = _shown(expected, self.max_feedback_chars // 2)
            note = f"Wrong. The answer is {answer}" + (
                f", not {shown}." if given else "; the reply gave no answer."
            )
        if score > 0:
            note += f" The task's verifier gave it {score:.2f} of 1 (it wants exactly the answer)."
        return note[: self.max_feedback_chars]
