"""Small Python coding tasks with hidden tests, for the rich-feedback example (no download).

Forty one-function tasks in four types (``list_ops``, ``strings``, ``conditionals``, ``loops``), each a
few lines of beginner Python, so that a 0.5B instruct model solves some of them and the feedback of
`sdpo_unsloth.rewards.code.CodeExecutionReward` ("input=[1, 2, 3]: expected 6, got 0") tells it what
went wrong on the others. Test inputs are drawn from a seeded generator plus fixed edge cases, and the
expected outputs come from the reference solutions in this module, so the set is deterministic given a
seed and the tests are right by construction (a test runs every reference through the sandbox).

>>> rows = code_tasks(seed=0)
>>> len(rows), sorted({r["task_type"] for r in rows})
(40, ['conditionals', 'list_ops', 'loops', 'strings'])
>>> rows[0]["prompt"][0]["role"], rows[0]["prompt"][1]["role"]
('system', 'user')
"""

from __future__ import annotations

import inspect
import json
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .code_references import _REFERENCES

__all__ = ["SYSTEM_PROMPT", "TASKS", "TASK_TYPES", "CodeTask", "code_tasks", "reference_solution"]

TASK_TYPES = ("list_ops", "strings", "conditionals", "loops")
SYSTEM_PROMPT = (
    "You are a careful Python programmer. Reply with one ```python code block that defines the requested "
    "function. Do not read input, do not print, and do not call the function."
)


@dataclass(frozen=True)
class CodeTask:
    """One task: a function to write, how to draw inputs for it, and its reference solution."""

    task_type: str
    signature: str  # e.g. "sum_list(numbers)"
    description: str  # completes "Write a Python function `signature` that ..."
    draw: Callable[[random.Random], tuple]  # one random argument tuple
    example: tuple  # the arguments of the example shown in the prompt
    edge_cases: tuple[tuple, ...] = ()  # always among the hidden tests

    @property
    def function(self) -> str:
        return self.signature.split("(")[0]

    @property
    def reference(self) -> Callable[..., Any]:
        return _REFERENCES[self.function]

    def prompt(self) -> str:
        call = f"{self.function}({', '.join(repr(a) for a in self.example)})"
        return (
            f"Write a Python function `{self.signature}` that {self.description}\n"
            f"Example: {call} returns {self.reference(*self.example)!r}."
        )


# --- input generators -------------------------------------------------------------------------------------


def _ints(low: int, high: int, min_len: int = 0, max_len: int = 6) -> Callable[[random.Random], tuple]:
    return lambda rng: ([rng.randint(low, high) for _ in range(rng.randint(min_len, max_len))],)


def _int(low: int, high: int) -> Callable[[random.Random], tuple]:
    return lambda rng: (rng.randint(low, high),)


def _word(rng: random.Random, low: int = 2, high: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _sentence(rng: random.Random) -> tuple:
    return (" ".join(_word(rng) for _ in range(rng.randint(1, 4))),)


def _palindrome(rng: random.Random) -> tuple:
    half = _word(rng, 1, 4)
    return (half + half[::-1][rng.randint(0, 1) :] if rng.random() < 0.5 else _word(rng),)


TASKS: tuple[CodeTask, ...] = (
    # list_ops
    CodeTask("list_ops", "sum_list(numbers)", "returns the sum of the integers in the list `numbers`.",
             _ints(-9, 9), ([1, 2, 3],), (([],),)),
    CodeTask("list_ops", "max_of_list(numbers)", "returns the largest integer in the non-empty list `numbers`.",
             _ints(-20, 20, 1), ([3, 8, 1],), (([-5, -2],),)),
    CodeTask("list_ops", "count_evens(numbers)", "returns how many integers in the list `numbers` are even.",
             _ints(-9, 9), ([1, 2, 4],), (([],),)),
    CodeTask("list_ops", "reverse_list(items)", "returns a new list with the elements of `items` in reverse order.",
             _ints(0, 9), ([1, 2, 3],), (([],),)),
    CodeTask("list_ops", "double_all(numbers)", "returns a list with every integer of `numbers` multiplied by 2.",
             _ints(-9, 9), ([1, 2, 3],), (([],),)),
    CodeTask("list_ops", "remove_negatives(numbers)",
             "returns a list of the integers in `numbers` that are not negative, in their original order.",
             _ints(-9, 9), ([3, -1, 0, -7, 5],), (([-1, -2],),)),
    CodeTask("list_ops", "last_element(items)", "returns the last element of the non-empty list `items`.",
             _ints(0, 99, 1), ([4, 5, 6],), (([7],),)),
    CodeTask("list_ops", "list_average(numbers)", "returns the average (mean) of the non-empty list `numbers`.",
             _ints(0, 20, 1), ([1, 2, 6],), (([5],),)),
    CodeTask("list_ops", "unique_sorted(numbers)",
             "returns the distinct integers of `numbers` in increasing order.",
             _ints(0, 5, 0, 8), ([3, 1, 3, 2],), (([],),)),
    CodeTask("list_ops", "running_total(numbers)",
             "returns a list whose i-th element is the sum of the first i+1 integers of `numbers`.",
             _ints(-5, 9), ([1, 2, 3],), (([],),)),
    # strings
    CodeTask("strings", "reverse_string(text)", "returns the string `text` reversed.",
             lambda rng: (_word(rng, 0, 8),), ("abc",), (("",),)),
    CodeTask("strings", "count_vowels(text)",
             "returns how many vowels (a, e, i, o, u, upper or lower case) are in `text`.",
             lambda rng: (_word(rng, 0, 10),), ("Hello",), (("xyz",),)),
    CodeTask("strings", "is_palindrome(text)",
             "returns True if `text` reads the same forwards and backwards, else False.",
             _palindrome, ("level",), (("",), ("ab",))),
    CodeTask("strings", "first_word(sentence)", "returns the first word of `sentence` (words are separated by spaces).",
             _sentence, ("hello big world",), (("solo",),)),
    CodeTask("strings", "count_char(text, char)", "returns how many times the character `char` occurs in `text`.",
             lambda rng: (_word(rng, 0, 10), rng.choice("aeiou")), ("banana", "a"), (("", "a"),)),
    CodeTask("strings", "capitalize_words(sentence)",
             "returns `sentence` with the first letter of every word in upper case (words are separated by "
             "single spaces; `sentence` is lower case).",
             _sentence, ("hello world",), (("a",),)),
    CodeTask("strings", "remove_spaces(text)", "returns `text` with all space characters removed.",
             lambda rng: (" ".join(_word(rng, 0, 4) for _ in range(rng.randint(1, 4))),), ("a b c",), (("   ",),)),
    CodeTask("strings", "repeat_string(text, times)", "returns `text` repeated `times` times (0 gives '').",
             lambda rng: (_word(rng, 1, 3), rng.randint(0, 4)), ("ab", 3), (("x", 0),)),
    CodeTask("strings", "longest_word(sentence)",
             "returns the longest word of `sentence` (words are separated by spaces; on a tie, the first one).",
             _sentence, ("I like pizza",), (("aa bb",),)),
    CodeTask("strings", "initials(name)",
             "returns the upper-case first letters of the words in `name`, joined without spaces.",
             _sentence, ("ada lovelace",), (("x",),)),
    # conditionals
    CodeTask("conditionals", "sign(n)", "returns 'positive' if n > 0, 'negative' if n < 0 and 'zero' if n == 0.",
             _int(-50, 50), (7,), ((0,), (-1,))),
    CodeTask("conditionals", "is_even(n)", "returns True if the integer `n` is even, else False.",
             _int(-50, 50), (4,), ((0,), (-3,))),
    CodeTask("conditionals", "max_of_two(a, b)", "returns the larger of the two numbers `a` and `b`.",
             lambda rng: (rng.randint(-20, 20), rng.randint(-20, 20)), (3, 9), ((5, 5),)),
    CodeTask("conditionals", "grade(score)",
             "returns 'A' for a score of 90 or more, 'B' for 80-89, 'C' for 70-79 and 'F' below 70.",
             _int(40, 100), (85,), ((90,), (70,), (69,))),
    CodeTask("conditionals", "fizzbuzz_word(n)",
             "returns 'FizzBuzz' if `n` is divisible by 15, 'Fizz' if by 3, 'Buzz' if by 5, else str(n).",
             _int(1, 60), (9,), ((15,), (10,), (7,))),
    CodeTask("conditionals", "absolute_value(n)", "returns the absolute value of `n` without using abs().",
             _int(-50, 50), (-4,), ((0,),)),
    CodeTask("conditionals", "is_leap_year(year)",
             "returns True if `year` is a leap year (divisible by 4, except centuries not divisible by 400).",
             _int(1800, 2100), (2024,), ((1900,), (2000,), (2023,))),
    CodeTask("conditionals", "clamp(x, low, high)",
             "returns `x` limited to the range [low, high]: low if x < low, high if x > high, else x.",
             lambda rng: (rng.randint(-20, 20), rng.randint(-10, 0), rng.randint(1, 10)), (15, 0, 10), ((-5, 0, 10),)),
    CodeTask("conditionals", "min_of_three(a, b, c)", "returns the smallest of the three numbers `a`, `b` and `c`.",
             lambda rng: tuple(rng.randint(-20, 20) for _ in range(3)), (4, 1, 7), ((2, 2, 2),)),
    CodeTask("conditionals", "is_teenager(age)", "returns True if `age` is between 13 and 19 inclusive, else False.",
             _int(5, 30), (15,), ((13,), (19,), (20,))),
    # loops
    CodeTask("loops", "factorial(n)", "returns n! (the product 1 * 2 * ... * n) for n >= 0; 0! is 1.",
             _int(0, 10), (5,), ((0,), (1,))),
    CodeTask("loops", "sum_to_n(n)", "returns 1 + 2 + ... + n for n >= 0 (0 for n == 0).",
             _int(0, 50), (4,), ((0,),)),
    CodeTask("loops", "count_digits(n)", "returns how many digits the non-negative integer `n` has.",
             _int(0, 10**6), (1234,), ((0,), (10,))),
    CodeTask("loops", "fibonacci(n)",
             "returns the n-th Fibonacci number, where fibonacci(0) == 0 and fibonacci(1) == 1.",
             _int(0, 20), (6,), ((0,), (1,))),
    CodeTask("loops", "power(base, exponent)",
             "returns `base` raised to the non-negative integer `exponent`, using a loop.",
             lambda rng: (rng.randint(-5, 5), rng.randint(0, 6)), (2, 5), ((7, 0),)),
    CodeTask("loops", "sum_of_digits(n)", "returns the sum of the digits of the non-negative integer `n`.",
             _int(0, 10**6), (123,), ((0,),)),
    CodeTask("loops", "count_down(n)", "returns the list [n, n-1, ..., 1] (an empty list for n == 0).",
             _int(0, 8), (3,), ((0,), (1,))),
    CodeTask("loops", "multiplication_table(n)", "returns the list [n*1, n*2, ..., n*10].",
             _int(-5, 12), (3,), ((0,),)),
    CodeTask("loops", "is_prime(n)", "returns True if the integer `n` is a prime number, else False.",
             _int(0, 100), (7,), ((0,), (1,), (2,), (9,))),
    CodeTask("loops", "gcd(a, b)", "returns the greatest common divisor of the positive integers `a` and `b`.",
             lambda rng: (rng.randint(1, 60), rng.randint(1, 60)), (12, 18), ((7, 7),)),
)  # fmt: skip


def _tests(task: CodeTask, rng: random.Random, n_tests: int) -> list[dict[str, Any]]:
    cases: list[tuple] = list(task.edge_cases)[:n_tests]
    for _ in range(50 * n_tests):
        if len(cases) >= n_tests:
            break
        args = task.draw(rng)
        if args not in cases and args != task.example:
            cases.append(args)
    return [
        {"function": task.function, "args": list(args), "expected": task.reference(*args)} for args in cases
    ]


def code_tasks(
    seed: int = 0,
    *,
    n_tests: int = 5,
    task_types: Iterable[str] = TASK_TYPES,
    system_prompt: str | None = SYSTEM_PROMPT,
    shuffle: bool = True,
) -> list[dict[str, Any]]:
    """The tasks as dataset rows, with hidden tests drawn from `seed` (same seed, same rows).

    Args:
        seed: seeds the test inputs and the row order.
        n_tests: hidden tests per task (fixed edge cases first, then distinct random inputs).
        task_types: which of `TASK_TYPES` to include.
        system_prompt: system message; None leaves it out.
        shuffle: shuffle the rows (with `seed`); False keeps the order of `TASKS`.

    Returns:
        Rows ``{"prompt": [system?, user], "tests": "<json>", "task_type": str, "function": str}``
        whose ``tests`` is what `CodeExecutionReward` reads.

    >>> row = code_tasks(seed=1, n_tests=3, task_types=["loops"], shuffle=False)[0]
    >>> row["function"], len(json.loads(row["tests"]))
    ('factorial', 3)
    """
    types = tuple(task_types)
    unknown = set(types) - set(TASK_TYPES)
    if unknown:
        raise ValueError(f"`task_types` must be among {TASK_TYPES}, got unknown {sorted(unknown)}")
    if n_tests < 1:
        raise ValueError(f"`n_tests` must be >= 1, got {n_tests}")
    rng = random.Random(seed)
    rows = []
    for task in TASKS:
        if task.task_type not in types:
            continue
        prompt = [{"role": "user", "content": task.prompt()}]
        if system_prompt is not None:
            prompt.insert(0, {"role": "system", "content": system_prompt})
        rows.append(
            {
                "prompt": prompt,
                "tests": json.dumps(_tests(task, rng, n_tests)),
                "task_type": task.task_type,
                "function": task.function,
            }
        )
    if shuffle:
        rng.shuffle(rows)
    return rows


def reference_solution(function: str) -> str:
    """Source code of the reference solution for the task whose function is `function`.

    >>> print(reference_solution("sum_list"))
    def sum_list(numbers):
        return sum(numbers)
    <BLANKLINE>
    """
    if function not in _REFERENCES:
        raise KeyError(f"no task defines {function!r}; known: {sorted(_REFERENCES)}")
    source = inspect.getsource(_REFERENCES[function])
    return source[source.index("def ") :]
