"""Integer addition: the built-in task of the demo and ``examples/basic_sdpo.py``.

Designed so that a few dozen SDPO steps on SmolLM2-135M-Instruct (CPU, LoRA) show held-out accuracy
rising; ``docs/demo-design.md`` holds the measurements behind every default here:

- one-digit operands (``digits=1``): the untrained model answers ~20% of held-out problems greedily
  (3-digit: 0%, 2-digit: 0-2%), so sampled groups sometimes hold a correct sibling;
- the prompt ``"{a}+{b}="`` under the system prompt ``"Answer with just the number."``: the model
  replies ``"The answer is 7."``, the same shape as a teacher that was told the right answer
  (``"The answer is 8."``, 100% greedy), so distillation acts on the answer digits themselves;
- answers are the *first* integer of the completion, within ``MAX_NEW_TOKENS = 8``;
- feedback on a wrong answer names the right one (``"Wrong. The answer is 8, not 7."``).

With these settings a minimal SDPO loop (LoRA r16, lr 1e-3, 8 completions per step, frozen teacher)
lifted held-out greedy accuracy from 20% to 55-67% within 20-40 steps. With the real ``SDPOTrainer``
the lift is seed-dependent (see ``DEMO_SETTINGS`` and docs/demo-design.md).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..rewards.protocol import completion_text, question_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEMO_SETTINGS",
    "MAX_NEW_TOKENS",
    "QUESTION_TEMPLATE",
    "SYSTEM_PROMPT",
    "AdditionReward",
    "DemoSettings",
    "addition_dataset",
    "evaluate",
    "parse_answer",
]

SYSTEM_PROMPT = "Answer with just the number."
QUESTION_TEMPLATE = "{a}+{b}="
EXAMPLES: tuple[tuple[int, int], ...] = ()
# SmolLM2 writes one token per digit; "The answer is 17." is 7 tokens, then <|im_end|>.
MAX_NEW_TOKENS = 8

_NUMBER = re.compile(r"[-\u2212]?\d+(?:\.\d+)?")  # a decimal counts whole: "7.9" is not 7; U+2212 is a minus


@dataclass(frozen=True)
class DemoSettings:
    """Defaults of the ``sdpo-unsloth demo`` run: CPU, embedded SmolLM2-135M-Instruct, one-digit addition.

    Verified with the real ``SDPOTrainer`` (``benchmarks/learning/demo_tuning.py``); the runs, seeds and wall
    times are in docs/demo-design.md, section "Verified with SDPOTrainer". Split:
    ``held = addition_dataset(held_size, seed=held_seed)``,
    ``train = addition_dataset(train_size, seed=train_seed, exclude=held)``.
    LoRA alpha equals ``lora_r`` (``load_model``'s default). SDPO and sampling settings are the seed's
    (alpha 0.5, top-K 100 + tail, EMA 0.05, temperature 0.7) with lr 5e-4, trained with `train()`'s default,
    the per-group hybrid with the KL anchor: over 3 training seeds held-out greedy accuracy went 25.0% -> 100.0% /
    87.5% / 65.6% in 30 steps (without the anchor 90.6% / 90.6% / 65.6%; pure SDPO, grpo_weight=0: 96.9% / 84.4% /
    34.4%; seed 0 is the demo's default).
    """

    model: str = "embedded"
    train_size: int = 68
    train_seed: int = 0
    held_size: int = 32
    held_seed: int = 1
    max_steps: int = 30
    learning_rate: float = 5e-4
    num_generations: int = 4
    per_device_train_batch_size: int = 8  # completions per step: 2 prompts x 4 samples
    gradient_accumulation_steps: int = 1
    temperature: float = 0.7
    max_completion_length: int = MAX_NEW_TOKENS
    lora_r: int = 16
    alpha: float = 0.5
    distillation_topk: int | None = 100
    teacher_mode: str = "ema"
    teacher_update_rate: float = 0.05
    tail: bool = True  # SDPOConfig.distillation_add_tail
    grpo_weight: float = 1.0  # train()'s default hybrid: GRPO in groups whose rewards differ, SDPO elsewhere
    hybrid_mode: str = "per_group"
    distill_anchor: float = 0.1  # train()'s default: KL to the initial policy on the distilled samples
    seed: int = 0  # the training seed the settings were tuned with (demo_tuning.py --seeds 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keys(self) -> list[str]:  # so that dict(DEMO_SETTINGS) and **DEMO_SETTINGS work
        return list(self.as_dict())

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


# The recommended demo run; see docs/demo-design.md ("Verified with SDPOTrainer") for the measurements.
DEMO_SETTINGS = DemoSettings()


def _question(a: int, b: int, template: str) -> str:
    return template.format(a=a, b=b)


def addition_dataset(
    n: int,
    *,
    seed: int,
    digits: int = 1,
    min_digits: int = 1,
    system_prompt: str | None = SYSTEM_PROMPT,
    question_template: str = QUESTION_TEMPLATE,
    examples: Sequence[tuple[int, int]] = EXAMPLES,
    exclude: Iterable[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """``n`` distinct addition problems as chat rows, reproducible from ``seed``.

    Each operand has between ``min_digits`` and ``digits`` digits (uniform over the numbers in that
    range). ``exclude`` takes other rows (e.g. the training split) whose questions must not repeat, so
    ``addition_dataset(64, seed=1, exclude=train)`` is a held-out set.

    Args:
        n: number of rows.
        seed: random seed.
        digits: maximum digits per operand.
        min_digits: minimum digits per operand.
        system_prompt: system message; ``None`` leaves it out (the chat template may add its own).
        question_template: user message, formatted with ``a`` and ``b``.
        examples: worked examples ``(a, b)``, each added as a user turn and an assistant turn with the
            bare sum before the question.
        exclude: rows whose user questions are not drawn again.

    Returns:
        Rows ``{"prompt": [system?, (user, assistant) per example, user], "answer": str(a + b)}``.

    >>> rows = addition_dataset(2, seed=0, digits=1, system_prompt="Add.")
    >>> rows[0]["prompt"][0], rows[0]["prompt"][1]["role"]
    ({'role': 'system', 'content': 'Add.'}, 'user')
    >>> rows[0]["prompt"][1]["content"]
    '6+6='
    >>> a, b = map(int, rows[0]["prompt"][1]["content"].rstrip("=").split("+"))
    >>> rows[0]["answer"] == str(a + b)
    True
    """
    if not 1 <= min_digits <= digits:
        raise ValueError(f"`min_digits` must be in [1, digits={digits}], got {min_digits}")
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    high = 10**digits - 1
    taken = {question_text(row["prompt"]) for row in exclude}
    taken |= {_question(x, y, question_template) for x, y in examples}  # never ask a worked example
    available = (high - low + 1) ** 2 - len(taken)
    if n > available:
        raise ValueError(f"only {available} distinct problems with digits={digits}, min_digits={min_digits}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        question = _question(a, b, question_template)
        if question in taken:
            continue
        taken.add(question)
        prompt = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        for x, y in examples:  # worked examples as earlier chat turns
            prompt.append({"role": "user", "content": _question(x, y, question_template)})
            prompt.append({"role": "assistant", "content": str(x + y)})
        prompt.append({"role": "user", "content": question})
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


def answer_mark(completion: str, row: dict[str, Any]) -> float:
    """1.0 when the completion's first number is the row's answer, else 0.0: how `evaluate` scores a row.

    >>> answer_mark("The answer is 12.", {"answer": 12}), answer_mark("12 or 13", {"answer": 13})
    (1.0, 0.0)
    """
    return float(parse_answer(completion) == int(row["answer"]))


def parse_answer(completion: str | Sequence[dict[str, str]]) -> int | float | None:
    """The first number in the completion (an int, or a float when it has a fractional part), or ``None`` when it
    has none. A sentence's full stop is not a decimal point; a decimal is not read as its integer part.

    >>> parse_answer("19")
    19
    >>> parse_answer(" 42 is the sum")
    42
    >>> parse_answer([{"role": "assistant", "content": "-3, I think"}])
    -3
    >>> parse_answer("To add these numbers") is None
    True
    >>> parse_answer("7.9"), parse_answer("The sum is 7."), parse_answer("7.0"), parse_answer("\u22123")
    (7.9, 7, 7, -3)
    """
    match = _NUMBER.search(completion_text(completion))
    if not match:
        return None
    value = float(match.group().replace("\u2212", "-"))
    return int(value) if value.is_integer() else value


def feedback_for(predicted: int | float | None, answer: int) -> str:
    """Feedback for SDPO's teacher: ``""`` when correct, else the right answer and what went wrong.

    >>> feedback_for(7, 7)
    ''
    >>> feedback_for(5, 7)
    'Wrong. The answer is 7, not 5.'
    >>> feedback_for(None, 7)
    'Wrong. The answer is 7; reply with just the number.'
    """
    if predicted == answer:
        return ""
    if predicted is None:
        return f"Wrong. The answer is {answer}; reply with just the number."
    return f"Wrong. The answer is {answer}, not {predicted}."


class AdditionReward:
    """1.0 when the first number of the completion equals ``answer``, else 0.0, with feedback.

    Follows the reward protocol: TRL's signature, one float per completion, and ``last_feedback``
    (one string per completion, ``""`` when correct) set by every call.

    >>> reward = AdditionReward()
    >>> reward(prompts=["1+2", "3+4", "5+5"], completions=["3", "8", "ten"], answer=["3", "7", "10"])
    [1.0, 0.0, 0.0]
    >>> reward.last_feedback
    ['', 'Wrong. The answer is 7, not 8.', 'Wrong. The answer is 10; reply with just the number.']
    """

    __name__ = "addition_correct"

    def __init__(self) -> None:
        self.last_feedback: list[str] = []

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str | Sequence[dict[str, str]]],
        answer: Sequence[str | int],
        **kwargs: Any,
    ) -> list[float]:
        if len(answer) != len(completions):
            raise ValueError(
                f"{self.__name__}: got {len(completions)} completions but {len(answer)} answers; "
                "pass the dataset's `answer` column (one per completion)"
            )
        scores: list[float] = []
        feedback: list[str] = []
        for completion, expected in zip(completions, answer, strict=True):
            target = int(expected)
            predicted = parse_answer(completion)
            scores.append(1.0 if predicted == target else 0.0)
            feedback.append(feedback_for(predicted, target))
        self.last_feedback = feedback
        return scores


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    graded: list[tuple[str, float | None]] | None = None,
) -> float:
    """Greedy accuracy of ``model`` on ``rows`` (first-integer scoring), in [0, 1]; ``graded``, when given,
    receives (completion, 1.0 or 0.0) per row in row order.

    Prompts are rendered with the chat template (``add_generation_prompt=True``) and left-padded;
    the tokenizer's padding side is restored afterwards. Runs under ``torch.no_grad`` in eval mode
    and restores the model's training mode.
    """
    from ..evaluate import greedy_completions

    if not rows:
        raise ValueError("`rows` is empty: nothing to evaluate")
    batches = greedy_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    marks = [
        (text, answer_mark(text, row))
        for batch, texts, _ in batches
        for text, row in zip(texts, batch, strict=True)
    ]
    if graded is not None:
        graded.extend(marks)
    correct = sum(mark for _, mark in marks)
    return correct / len(rows)
