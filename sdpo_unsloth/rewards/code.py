"""Code-execution reward: runs each completion's code against hidden tests and explains what failed.

SDPO learns most from detailed feedback: the teacher sees, e.g., ``input=[1, 2, 3]: expected 6, got 0``
and the student is distilled towards what the teacher then predicts. The code runs in
`sdpo_unsloth.sandbox` (a confined child process, never ``exec`` in the trainer); a whole batch runs in
parallel, one child per completion.

Tests come from a dataset column (default ``tests``): one JSON string per row (so datasets/Arrow can
store it) holding a list of cases, each either a function call or a stdin/stdout run::

    [{"function": "total", "args": [[1, 2, 3]], "expected": 6},
     {"function": "total", "args": [[]], "kwargs": {}, "expected": 0},
     {"stdin": "1 2\\n", "stdout": "3\\n"}]

Guarantees: expected values never enter the sandbox; outputs are compared in the trainer as plain JSON
values (bool is not int; floats within 1e-9); code that exits or crashes before a test ran fails that
test; text produced by the model's code (exception messages, returned strings) reaches the feedback
only shortened and quoted with ``repr``, so it cannot pose as instructions to the teacher.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal

from ..sandbox import Check, CheckResult, Isolation, Job, Limits, Sandbox, SandboxResult, Status
from .protocol import completion_text

__all__ = [
    "NO_CODE_FEEDBACK",
    "TESTS_COLUMN",
    "CodeExecutionReward",
    "completion_text",
    "extract_code",
    "format_feedback",
    "parse_tests",
]

TESTS_COLUMN = "tests"
NO_CODE_FEEDBACK = "No Python code found in the answer. Write the solution in a ```python code block."
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S)
_LOOKS_LIKE_CODE = re.compile(r"^[ \t]*(def |class |import |from \S+ import |print\(|for |while |if )", re.M)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(text: str, function: str | None = None) -> str | None:
    """The code in a completion: a fenced python block if any, else the raw text if it looks like code.

    Among several python blocks, the first that defines `function` wins (else the first one). An unclosed
    fence (a truncated completion) runs to the end. ``<think>`` blocks are ignored. None: no code.

    >>> extract_code("Sure:\\n```python\\ndef f(x):\\n    return x\\n```\\nDone.")
    'def f(x):\\n    return x\\n'
    >>> extract_code("def f(x): return x")
    'def f(x): return x'
    >>> extract_code("I am not sure.") is None
    True
    """
    text = _THINK.sub("", text)
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS] or [
        body for tag, body in blocks if not tag
    ]
    if python:
        if function is not None:
            defining = re.compile(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(function)}\b", re.M)
            for body in python:
                if defining.search(body):
                    return body
        return python[0]
    if blocks:
        return None  # only other languages
    return text.strip() if _LOOKS_LIKE_CODE.search(text) else None


def parse_tests(spec: str | Sequence[Mapping[str, Any]]) -> tuple[Check, ...]:
    """Checks from one row's tests (a JSON string or the already-parsed list); raises ValueError naming the fix.

    >>> parse_tests('[{"function": "total", "args": [[1, 2]], "expected": 3}]')
    (Check(function='total', args=([1, 2],), kwargs=None, stdin=None, expected=3),)
    >>> parse_tests('[{"stdin": "2\\\\n", "stdout": "4\\\\n"}]')[0].stdin
    '2\\n'
    """
    if isinstance(spec, str):
        return _parse_cached(spec)
    return _parse(spec)


@lru_cache(maxsize=4096)
def _parse_cached(spec: str) -> tuple[Check, ...]:
    try:
        cases = json.loads(spec)
    except ValueError as exc:
        raise ValueError(
            f"tests must be a JSON list of cases; could not parse {spec[:80]!r}: {exc}"
        ) from None
    return _parse(cases)


def _parse(cases: Any) -> tuple[Check, ...]:
    example = '[{"function": "f", "args": [1], "expected": 2}] or [{"stdin": "1\\n", "stdout": "2\\n"}]'
    if not isinstance(cases, Sequence) or isinstance(cases, str) or not cases:
        raise ValueError(f"tests must be a non-empty list of cases like {example}; got {str(cases)[:80]!r}")
    checks = []
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping):
            raise ValueError(f"test case {i} must be an object like {example}; got {case!r:.80}")
        if "function" in case:
            unknown = set(case) - {"function", "args", "kwargs", "expected"}
            if "expected" not in case or unknown or not isinstance(case.get("args", []), list):
                raise ValueError(
                    f"function test case {i} needs 'function', 'args' (a list) and 'expected' (optional 'kwargs'); "
                    f"got keys {sorted(case)}"
                )
            checks.append(
                Check(
                    case["function"], tuple(case.get("args", [])), case.get("kwargs"), None, case["expected"]
                )
            )
        elif "stdin" in case or "stdout" in case:
            if set(case) != {"stdin", "stdout"} or not all(isinstance(case[k], str) for k in case):
                raise ValueError(
                    f"stdin/stdout test case {i} needs exactly 'stdin' and 'stdout' strings; got {case!r:.120}"
                )
            checks.append(Check(stdin=case["stdin"], expected=case["stdout"]))
        else:
            raise ValueError(
                f"test case {i} is neither a function call nor stdin/stdout: {case!r:.80}; use {example}"
            )
    return tuple(checks)


# --- feedback --------------------------------------------------------------------------------------------


def _quote(text: str, limit: int = 200) -> str:
    """Untrusted text as a short Python string literal: escaped, quoted, at most about `limit` chars."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _value(value: Any, limit: int = 200) -> str:
    text = repr(value)  # values are plain JSON values parsed in the trainer: strings come out quoted
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_failure(check: Check, result: CheckResult, limits: Limits) -> str:
    where = f"input={check.describe_input()}"
    status = result.status
    if status is Status.WRONG:
        if check.function is None:
            return f"{where}: expected output {_quote(check.expected)}, got {_quote(result.got or '')}"
        return f"{where}: expected {_value(check.expected)}, got {_value(result.got)}"
    if status is Status.TIMEOUT:
        return f"timed out after {limits.timeout_s:.1f} s on {where}"
    if status is Status.MEMORY:
        return f"ran out of memory ({limits.memory_mb} MB limit) on {where}"
    if status is Status.KILLED:
        return f"{result.error} on {where}"  # the sandbox's own words, e.g. "crashed (SIGSEGV)"
    if result.kind == "missing":
        return f"{where}: no function named {check.function} is defined"
    if result.kind == "type":
        return f"{where}: bad return value, {_quote(result.error, 120)}"
    if result.kind == "died":
        return f"{where}: {result.error}"  # the sandbox's own words
    line = f" (line {result.line})" if result.line else ""
    return f"{where}: raised {_quote(result.error)}{line}"


def format_feedback(
    checks: Sequence[Check],
    result: SandboxResult,
    limits: Limits,
    *,
    max_listed: int = 3,
    max_chars: int = 2000,
) -> str:
    """Feedback for one completion: empty when every check passed.

    Lists up to `max_listed` failing checks, then how many more failed; never longer than `max_chars`.
    """
    failed = [(c, r) for c, r in zip(checks, result.checks, strict=True) if r.status is not Status.OK]
    if not failed:
        return ""
    first = failed[0][1]
    if first.kind == "quota":  # the whole run failed: its work dir hit the disk or file quota
        text = (
            f"The program failed: {first.error} ({limits.max_files} files, {limits.max_disk_mb} MB); "
            "do not write files you do not need."
        )
        return _cap(text, max_chars)
    if result.before_tests:
        line = f" (line {first.line})" if first.line else ""
        if first.kind == "exit":
            text = "The code called sys.exit() before the tests ran; define the function and do not exit."
        elif first.status is Status.TIMEOUT:
            text = f"Timed out after {limits.timeout_s:.1f} s before the tests ran (top-level code never finished)."
        elif first.status is Status.MEMORY:
            text = f"Ran out of memory ({limits.memory_mb} MB limit) before the tests ran."
        elif first.status is Status.KILLED or first.kind == "died":
            text = f"The program ended before the tests ran: {first.error}."
        else:
            text = f"The code failed before any test ran: {_quote(first.error)}{line}"
        return _cap(text, max_chars)
    shown = [(c, r) for c, r in failed if r.status is not Status.NOT_RUN][:max_listed]
    lines = [f"{len(failed)} of {len(checks)} tests failed:"]
    lines += [_describe_failure(c, r, limits) for c, r in shown]
    if len(failed) > len(shown):
        lines.append(f"... and {len(failed) - len(shown)} more failing or not run.")
    return _cap("\n".join(lines), max_chars)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ..."


# --- the reward ------------------------------------------------------------------------------------------


class CodeExecutionReward:
    """A TRL reward function that runs code against the row's hidden tests; feedback on `last_feedback`.

    Args:
        tests_column: dataset column with the tests (a JSON string per row, see the module docstring).
            TRL passes dataset columns to rewards; keep ``remove_unused_columns=False`` in GRPOConfig.
        scoring: ``"fraction"`` (share of tests passed) or ``"all_or_nothing"`` (1.0 only if all pass).
        timeout_s: wall-clock limit per test (and for the top-level code).
        memory_mb: address-space limit per child process.
        max_feedback_chars: cap on each feedback string.
        max_failures_listed: failing tests spelled out in the feedback.
        sandbox: a `Sandbox` to share; by default one is created on first use (one worker per CPU).
        name: the ``__name__`` TRL logs the reward under.

    After each call, `last_feedback` holds one string per completion ('' when all tests passed) and
    `last_results` the `SandboxResult`s (or None for completions without code). Whatever the model
    wrote, a call returns one finite score per completion; it raises only for a misconfigured dataset
    (missing or malformed tests column: KeyError/ValueError) or a sandbox that cannot run on this
    machine (`SandboxError`), never silently scoring 0 for the trainer's own faults.

    >>> reward = CodeExecutionReward(timeout_s=1.0)
    >>> tests = '[{"function": "double", "args": [2], "expected": 4}, {"function": "double", "args": [5], "expected": 10}]'
    >>> completions = ["```python\\ndef double(x):\\n    return x + 2\\n```", "no idea"]
    >>> reward(prompts=["p", "p"], completions=completions, tests=[tests, tests])
    [0.5, 0.0]
    >>> print(reward.last_feedback[0])
    1 of 2 tests failed:
    input=5: expected 10, got 7
    >>> reward.last_feedback[1] == NO_CODE_FEEDBACK
    True
    """

    def __init__(
        self,
        *,
        tests_column: str = TESTS_COLUMN,
        scoring: Literal["fraction", "all_or_nothing"] = "fraction",
        timeout_s: float = 2.0,
        memory_mb: int = 512,
        max_feedback_chars: int = 2000,
        max_failures_listed: int = 3,
        sandbox: Sandbox | None = None,
        name: str = "code_execution",
    ):
        if scoring not in ("fraction", "all_or_nothing"):
            raise ValueError(f"`scoring` must be 'fraction' or 'all_or_nothing', got {scoring!r}")
        if max_feedback_chars < 100:
            raise ValueError(f"`max_feedback_chars` must be >= 100, got {max_feedback_chars}")
        self.tests_column = tests_column
        self.scoring = scoring
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.max_feedback_chars = max_feedback_chars
        self.max_failures_listed = max_failures_listed
        self._sandbox = sandbox
        self.__name__ = name
        self.last_feedback: list[str] = []
        self.last_results: list[SandboxResult | None] = []

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(limits=self.limits)
        return self._sandbox

    @property
    def isolation(self) -> Isolation:
        return self.sandbox.isolation

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        self.last_feedback, self.last_results = [], []
        if self.tests_column not in kwargs:
            raise KeyError(
                f"{self.__name__} needs the dataset column '{self.tests_column}' (JSON tests per row) but the "
                f"reward got only {sorted(kwargs)}. Add the column, or pass tests_column=...; keep "
                "remove_unused_columns=False in GRPOConfig so TRL forwards it."
            )
        specs = kwargs[self.tests_column]
        if len(specs) != len(completions):
            raise ValueError(
                f"{self.__name__}: column '{self.tests_column}' has {len(specs)} entries for "
                f"{len(completions)} completions; it must have one per completion."
            )
        rows = []
        for i, (completion, spec) in enumerate(zip(completions, specs, strict=True)):
            try:
                checks = parse_tests(spec)
            except ValueError as exc:
                raise ValueError(f"{self.__name__}: row {i} of column '{self.tests_column}': {exc}") from None
            function = next((c.function for c in checks if c.function), None)
            rows.append((checks, extract_code(completion_text(completion), function)))
        jobs = [Job(code, checks) for checks, code in rows if code is not None]
        results = iter(self.sandbox.run_many(jobs, limits=self.limits))
        scores, feedback = [], []
        for checks, code in rows:
            result = next(results) if code is not None else None
            self.last_results.append(result)
            if result is None:
                scores.append(0.0)
                feedback.append(NO_CODE_FEEDBACK)
                continue
            fraction = result.passed / len(checks)
            scores.append(fraction if self.scoring == "fraction" else float(fraction == 1.0))
            feedback.append(
                format_feedback(
                    checks,
                    result,
                    self.limits,
                    max_listed=self.max_failures_listed,
                    max_chars=self.max_feedback_chars,
                )
            )
        self.last_feedback = feedback
        return scores
