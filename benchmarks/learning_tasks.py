"""The tasks of the learning panel: one fixed held-out split, the task's own reward, greedy scoring.

Every task goes through the library's own resolution (`sdpo_unsloth.api._resolve_dataset`,
`_resolve_rewards`, `_split`, `_evaluate`), the same path as `sdpo_unsloth.train(dataset=...)`:

- ``addition``: the demo's one-digit additions (100 distinct problems), `AdditionReward`;
- ``code``: the 40 sandboxed Python tasks of `sdpo_unsloth.tasks.code`, `CodeExecutionReward`
  (reward = fraction of hidden tests passed, feedback names the failing inputs);
- ``gym:<task>?key=value&...``: a reasoning-gym task, `GymReward` (the task's verifier + feedback).

Held-out score = mean reward of greedy completions on the held-out rows (for addition and the
gym tasks that is the accuracy; for code the mean fraction of tests passed). The split does not depend
on the training seed: every run of a task is scored on the same rows.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

SPLIT_SEED = 0  # the task rows and the held-out split; training seeds vary separately
POOL = 100  # rows drawn per task (one-digit addition has exactly 100 distinct problems)


@dataclass
class PanelTask:
    name: str
    held: list[dict[str, Any]]
    train: list[dict[str, Any]]
    reward: Any  # a fresh instance of the task's reward (it carries `last_feedback`)


def load_task(name: str, held_size: int) -> PanelTask:
    """`held_size` rows held out (at most half the rows: the code task has 40), the rest for training."""
    from sdpo_unsloth.data import _resolve_dataset, _resolve_rewards, _split

    data, task = _resolve_dataset(name, POOL, SPLIT_SEED)
    if task is None:
        raise SystemExit(f"{name!r} is not a built-in task: use addition, code or gym:<task>?key=value&...")
    held, train = _split(data, min(held_size, len(data) // 2), SPLIT_SEED)
    return PanelTask(name, held, [train[i] for i in range(len(train))], _resolve_rewards(None, task)[0])


@functools.cache
def split_unchanged(name: str, held: int) -> bool:
    """Whether runs recorded before `_split` kept held-out questions out of training (it drew `held` seeded-random
    rows, repeated questions or not) were scored and trained on the rows the current split gives `name`.

    The current split holds out the first `held` distinct questions in the same seeded order and drops every other
    row asking one of them: if it keeps `held` rows out and trains on all the others, no question repeated among
    them, so it skipped no row and both splits are the same rows (addition and code: yes; count_bits up to 16: no).
    """
    from sdpo_unsloth.data import _resolve_dataset

    rows = len(_resolve_dataset(name, POOL, SPLIT_SEED)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split warns when it holds out fewer than asked: counted below
        task = load_task(name, held)
    return (len(task.held), len(task.train)) == (held, rows - held)


def score(
    model: Any, tokenizer: Any, task: PanelTask, max_new_tokens: int, graded: list | None = None
) -> float:
    """Mean reward of greedy completions on the held-out rows (eval mode; training mode restored); `graded`
    receives (completion, score) per row."""
    from sdpo_unsloth.evaluate import evaluate_model

    value = evaluate_model(
        model, tokenizer, task.held, task.reward, max_new_tokens=max_new_tokens, batch_size=16, graded=graded
    )
    if value is None:
        raise RuntimeError(f"{task.name}: every held-out row was skipped by the reward; nothing to score")
    return value


def top_share(graded: list[tuple[str, Any]]) -> float:
    """The share of the held-out rows given the most common completion (1/rows: all differ; 1.0: a constant).

    >>> top_share([("The answer is 2.", 1.0)] * 3 + [("3", 0.0)])
    0.75
    """
    from sdpo_unsloth.heldout import most_common_completion

    return most_common_completion(graded)[1] / len(graded) if graded else 0.0


def echo_share(task: PanelTask, graded: list[tuple[str, Any]]) -> float | None:
    """The share of the held-out rows whose completion ends on a number that its question states
    (`sdpo_unsloth.heldout.repeats_question`, the check of `EchoAnswerWarning`). None for rows without an
    `answer` column.

    >>> rows = [{"prompt": [{"role": "user", "content": f"LCM of {a} and {b}?"}], "answer": "0"} for a, b in [(14, 7), (3, 4)]]
    >>> echo_share(PanelTask("t", rows, [], None), [("It is 14.", 1.0), ("3 and 4 give 12.", 1.0)])
    0.5
    """
    from sdpo_unsloth.heldout import repeats_question
    from sdpo_unsloth.rewards.protocol import question_text

    rows = task.held
    if not rows or "answer" not in rows[0] or len(graded) != len(rows):
        return None
    echoes = sum(
        repeats_question(str(completion), question_text(row["prompt"]))
        for row, (completion, _) in zip(rows, graded, strict=True)
    )
    return echoes / len(rows)


def print_for_each_task(analyse: Any, args: Any) -> int:
    """For each task of `args.tasks`, print `analyse(model, tokenizer, task name, args)` as a JSON line: the
    untrained embedded model in eval mode, torch seeded with `args.seed` (the investigation scripts' main)."""
    import json

    import torch

    from sdpo_unsloth.embedded import load_embedded

    torch.manual_seed(args.seed)
    model, tokenizer = load_embedded()
    model.eval()
    for name in split_tasks(args.tasks):
        print(json.dumps(analyse(model, tokenizer, name, args), ensure_ascii=False), flush=True)
    return 0


def sample_completions(
    model: Any, tokenizer: Any, rows: list[dict], n: int, max_new_tokens: int, temperature: float
) -> tuple[list[str], list[bool]]:
    """`n` sampled completions per row, in row order (the panel's generation: chat template, left padding), and
    whether each ran to `max_new_tokens` without ending (cut at the budget)."""
    import torch

    texts_in = [
        tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts_in, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = out[:, batch["input_ids"].shape[1] :]
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    cut = [not any(int(t) in ends for t in row) for row in generated]
    return tokenizer.batch_decode(generated, skip_special_tokens=True), cut


def constant_baseline(task: PanelTask) -> tuple[float, str] | None:
    """The best held-out score of one fixed completion, "The answer is X." for every row, over the held-out
    answers X, scored by the task's own reward: what a student that ignores the question can reach.
    None for a task without an `answer` column (the code task)."""
    from sdpo_unsloth.evaluate import score_completions
    from sdpo_unsloth.rewards.protocol import checked_reward
    from sdpo_unsloth.tasks.addition import AdditionReward, answer_mark

    rows = task.held
    if not rows or "answer" not in rows[0]:
        return None
    checked = checked_reward(task.reward)
    best = None
    for answer in sorted({str(row["answer"]) for row in rows}):
        text = f"The answer is {answer}."
        if isinstance(task.reward, AdditionReward):  # scored as `train()` scores addition: first integer
            values = [answer_mark(text, row) for row in rows]
        else:
            values = score_completions(rows, [text] * len(rows), checked)
        scored = [v for v in values if v is not None]
        value = sum(scored) / len(scored) if scored else 0.0
        if best is None or value > best[0]:
            best = (value, answer)
    return best


def short_name(name: str) -> str:
    """'gym:chain_sum?max_terms=2' -> 'chain_sum'; plot titles and table headers use it."""
    return name.removeprefix("gym:").partition("?")[0]


def split_tasks(text: str) -> list[str]:
    """Comma-separated task names; commas inside [...] (a gym config's list value) do not split.

    >>> split_tasks('addition,gym:basic_arithmetic?operators=["+","-"]&max_terms=2,code')
    ['addition', 'gym:basic_arithmetic?operators=["+","-"]&max_terms=2', 'code']
    """
    names, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += ch
    return [n for n in [*names, current] if n]
