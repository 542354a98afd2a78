"""The reference solutions of the code tasks in `sdpo_unsloth.tasks.code`: one beginner-level function per
task, registered by name. The expected outputs of every hidden test come from these functions, and their
source is what `tasks.code.reference_solution` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REFERENCES: dict[str, Callable[..., Any]] = {}


def _ref(function: Callable[..., Any]) -> Callable[..., Any]:
    _REFERENCES[function.__name__] = function
    return function


@_ref
def sum_list(numbers):
    return sum(numbers)


@_ref
def max_of_list(numbers):
    return max(numbers)


@_ref
def count_evens(numbers):
    return sum(1 for n in numbers if n % 2 == 0)


@_ref
def reverse_list(items):
    return items[::-1]


@_ref
def double_all(numbers):
    return [2 * n for n in numbers]


@_ref
def remove_negatives(numbers):
    return [n for n in numbers if n >= 0]


@_ref
def last_element(items):
    return items[-1]


@_ref
def list_average(numbers):
    return sum(numbers) / len(numbers)


@_ref
def unique_sorted(numbers):
    return sorted(set(numbers))


@_ref
def running_total(numbers):
    totals, total = [], 0
    for n in numbers:
        total += n
        totals.append(total)
    return totals


@_ref
def reverse_string(text):
    return text[::-1]


@_ref
def count_vowels(text):
    return sum(1 for c in text.lower() if c in "aeiou")


@_ref
def is_palindrome(text):
    return text == text[::-1]


@_ref
def first_word(sentence):
    return sentence.split()[0]


@_ref
def count_char(text, char):
    return text.count(char)


@_ref
def capitalize_words(sentence):
    return " ".join(word.capitalize() for word in sentence.split(" "))


@_ref
def remove_spaces(text):
    return text.replace(" ", "")


@_ref
def repeat_string(text, times):
    return text * times


@_ref
def longest_word(sentence):
    return max(sentence.split(), key=len)


@_ref
def initials(name):
    return "".join(part[0].upper() for part in name.split())


@_ref
def sign(n):
    if n > 0:
        return "positive"
    if n < 0:
        return "negative"
    return "zero"


@_ref
def is_even(n):
    return n % 2 == 0


@_ref
def max_of_two(a, b):
    return a if a >= b else b


@_ref
def grade(score):
    if score >= 90:
        return "A"
    if score >= 80:
        return "B"
    if score >= 70:
        return "C"
    return "F"


@_ref
def fizzbuzz_word(n):
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)


@_ref
def absolute_value(n):
    return n if n >= 0 else -n


@_ref
def is_leap_year(year):
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


@_ref
def clamp(x, low, high):
    return max(low, min(x, high))


@_ref
def min_of_three(a, b, c):
    return min(a, b, c)


@_ref
def is_teenager(age):
    return 13 <= age <= 19


@_ref
def factorial(n):
    result = 1
    for k in range(2, n + 1):
        result *= k
    return result


@_ref
def sum_to_n(n):
    return sum(range(1, n + 1))


@_ref
def count_digits(n):
    return len(str(n))


@_ref
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@_ref
def power(base, exponent):
    result = 1
    for _ in range(exponent):
        result *= base
    return result


@_ref
def sum_of_digits(n):
    return sum(int(d) for d in str(n))


@_ref
def count_down(n):
    return list(range(n, 0, -1))


@_ref
def multiplication_table(n):
    return [n * k for k in range(1, 11)]


@_ref
def is_prime(n):
    if n < 2:
        return False
    return all(n % k for k in range(2, int(n**0.5) + 1))


@_ref
def gcd(a, b):
    while b:
        a, b = b, a % b
    return a
