"""What `train()` and `preflight()` train on: built-in tasks, dataset files and objects, the evaluation split,
and the reward functions (built-in names, 'module:function', callables).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import random
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .preconditions import UsageError, check_prompts

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["BUILTIN_TASKS", "GYM_PREFIX", "TrainInputs", "resolve_inputs", "task_completion_length"]

BUILTIN_TASKS: tuple[str, ...] = ("addition", "code", "humaneval")


GYM_PREFIX = "gym:"  # dataset="gym:<task>?key=value&...": a reasoning-gym task (sdpo_unsloth.tasks.gym)


# Completion budgets of the built-in tasks (an addition answer is a few tokens; code needs room).
_TASK_COMPLETION_LENGTH = {"addition": 8, "code": 256, "humaneval": 384, "gym": 32}


def _is_task(name: Any) -> bool:
    return isinstance(name, str) and (name in BUILTIN_TASKS or name.startswith(GYM_PREFIX))


def _task_key(name: str) -> str:
    """The task's kind: its name, or "gym" for every reasoning-gym task."""
    return "gym" if name.startswith(GYM_PREFIX) else name


def _task_rows(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    if name.startswith(GYM_PREFIX):
        from .tasks.gym import gym_dataset, parse_gym_name

        try:
            gym_task, config = parse_gym_name(name)
            return gym_dataset(gym_task, n, seed=seed, config=config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if name == "humaneval":
        from .tasks.humaneval import humaneval_tasks

        return humaneval_tasks()
    if name == "addition":
        from .tasks.addition import addition_dataset

        digits = inspect.signature(addition_dataset).parameters["digits"].default
        return addition_dataset(min(n, 100**digits), seed=seed)  # the trainer cycles over a small pool
    from .tasks.code import code_tasks

    return code_tasks(seed=seed)


def _rows_dataset(rows: list[Any], name: str, where: Callable[[int], str] | None = None) -> Dataset:
    """A Dataset from rows (dicts), each row's prompt checked first: Arrow cannot hold mixed prompt forms."""
    from datasets import Dataset

    where = where or (lambda i: f"row {i}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UsageError(
                f"`{name}` {where(i)} is a {type(row).__name__}, not a row (a dict with a 'prompt')."
            )
    if any("prompt" in row for row in rows):  # else the missing column is reported below
        try:
            check_prompts([row.get("prompt") for row in rows], name, where)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return Dataset.from_list([dict(row) for row in rows])


def _jsonl_rows(path: Path) -> tuple[list[Any], list[int]]:
    """The rows of a JSON Lines file and the line each came from (blank lines skipped)."""
    rows, lines = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"line {number} of {path} is not valid JSON ({exc.msg} at column {exc.colno}): {line[:80]!r}; "
                'fix or delete that line (each line holds one row, e.g. {"prompt": "..."}).'
            ) from None
        lines.append(number)
    return rows, lines


def _load_dataset_file(path: Path, name: str) -> Dataset:
    from datasets import Dataset, load_from_disk

    if path.is_dir():
        loaded = load_from_disk(str(path))
        if not isinstance(loaded, Dataset):
            raise UsageError(f"{path} holds several splits ({list(loaded)}); pass one split's directory.")
        return loaded
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, lines = _jsonl_rows(path)
        return _rows_dataset(rows, name, lambda i: f"row {i} (line {lines[i]} of {path})")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON ({exc}); fix the file.") from None
        if not isinstance(data, list):
            raise UsageError(f"{path} must hold a JSON list of rows (objects with a 'prompt' field).")
        return _rows_dataset(data, name, lambda i: f"row {i} of {path}")
    if suffix in (".csv", ".parquet"):
        return getattr(Dataset, f"from_{suffix[1:]}")(str(path))
    raise UsageError(
        f"cannot read a dataset from {path}: use .json, .jsonl, .csv, .parquet or a save_to_disk folder."
    )


def _resolve_dataset(
    dataset: Any, rows_needed: int, seed: int, name: str = "dataset"
) -> tuple[Dataset, str | None]:
    """(dataset, built-in task name or None)."""
    from datasets import Dataset, DatasetDict

    task = None
    if isinstance(dataset, str | os.PathLike):
        if _is_task(dataset):
            task = str(dataset)
            dataset = Dataset.from_list(_task_rows(task, rows_needed, seed))
        elif Path(dataset).exists():
            dataset = _load_dataset_file(Path(dataset), name)
        else:
            raise UsageError(
                f"unknown {name} {str(dataset)!r}: use a built-in task ({', '.join(BUILTIN_TASKS)}, "
                f"{GYM_PREFIX}<reasoning-gym task>), a "
                ".json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder, or pass a datasets.Dataset."
            )
    elif isinstance(dataset, DatasetDict):
        raise UsageError(
            f"`{name}` is a DatasetDict with splits {list(dataset)}; pass one, e.g. dataset['train']."
        )
    elif isinstance(dataset, Sequence) and not isinstance(dataset, Dataset):
        if not all(isinstance(row, Mapping) for row in dataset):
            raise UsageError(f"`{name}` as a list must hold dicts (rows with a 'prompt' key).")
        dataset = _rows_dataset(list(dataset), name)
    elif not isinstance(dataset, Dataset):
        raise UsageError(
            f"`{name}` must be a datasets.Dataset, a list of dicts or a task name, got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise UsageError(f"`{name}` is empty: give it at least a few rows with a 'prompt'.")
    if "prompt" not in dataset.column_names:
        raise UsageError(
            f"`{name}` has no 'prompt' column (columns: {dataset.column_names}); rename your question column to "
            "'prompt' (a string, or chat messages [{'role': 'user', 'content': ...}])."
        )
    try:
        check_prompts(dataset["prompt"], name)  # a Dataset or file: None cells, malformed messages
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return dataset, task


# Training rows a built-in task gets at least (`train()` asks for more when max_steps needs them).
TASK_MIN_ROWS = 64


def prompt_key(prompt: Any) -> str:
    """A row's question as one string (the prompt, or its chat messages as JSON): equal questions, equal keys."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def _split(
    data: Dataset, n_eval: int, seed: int, pool: Dataset | None = None
) -> tuple[list[dict[str, Any]], Dataset]:
    """`n_eval` seeded-random rows with distinct questions for evaluation; the rest (in order) for training,
    without any row that asks a held-out question. Generated tasks repeat questions (reasoning-gym's small
    configurations do, often): a held-out question that is also trained on, with feedback naming its answer,
    measures memory, not learning. Warns when fewer distinct questions than `n_eval` can be held out.

    `pool`: the rows the held-out ones are drawn from, when not `data` (a built-in task's shortest run: see
    `resolve_inputs`); `data` still loses every row that asks one of them."""
    pool = data if pool is None else pool
    if n_eval >= len(pool):
        raise UsageError(
            f"`eval_size` ({n_eval}) must be smaller than the dataset ({len(pool)} rows); lower eval_size or use 0 "
            "to skip evaluation."
        )
    if not n_eval:
        return [], data
    keys = [prompt_key(p) for p in pool["prompt"]]
    distinct = len(set(keys))
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    # at most half the distinct questions are held out: the rest must stay for training
    wanted = min(n_eval, distinct // 2)
    held: list[int] = []
    seen: set[str] = set()
    for i in order:
        if len(held) == wanted:
            break
        if keys[i] not in seen:
            seen.add(keys[i])
            held.append(i)
    data_keys = keys if pool is data else [prompt_key(p) for p in data["prompt"]]
    train = [i for i, key in enumerate(data_keys) if key not in seen]
    if not held or not train:
        raise UsageError(
            f"the dataset has {distinct} distinct question(s) in {len(pool)} rows: too few to hold {n_eval} out and "
            "train on the others. Use a task configuration with more distinct questions, or eval_size=0."
        )
    if len(held) < n_eval:
        warnings.warn(
            f"only {len(held)} distinct questions are held out for evaluation (eval_size={n_eval}): the dataset has "
            f"{distinct} distinct questions in {len(pool)} rows, and half are kept for training. Held-out questions "
            "never appear in training. Scores on few questions are noisy: use a task configuration with more "
            "distinct questions (e.g. a larger value range).",
            stacklevel=3,
        )
    return [pool[i] for i in held], data.select(train)


def _import_reward(spec: str) -> Any:
    """'package.module:attr' or 'path/to/file.py:attr'; a class is instantiated without arguments."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        value = getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise UsageError(
            f"cannot import reward {spec!r} ({type(exc).__name__}: {exc}); check the module and name."
        ) from None
    return value() if isinstance(value, type) else value


def _builtin_reward(name: str) -> Any:
    if name == "addition":
        from .tasks.addition import AdditionReward

        return AdditionReward()
    if name == "code":
        from .rewards.code import CodeExecutionReward

        return CodeExecutionReward()
    if name == "humaneval":
        from .tasks.humaneval import HumanEvalReward

        return HumanEvalReward()
    if name.startswith(GYM_PREFIX):
        from .tasks.gym import GymReward

        return GymReward()
    if ":" in name:
        return _import_reward(name)
    raise UsageError(
        f"unknown reward {name!r}: use a built-in reward ({', '.join(BUILTIN_TASKS)}), 'module:function', "
        "or pass a function returning list[float]."
    )


def _resolve_rewards(rewards: Any, task: str | None) -> list[Any]:
    if rewards is None:
        if task is None:
            raise UsageError(
                "`rewards` is missing: pass a function f(prompts, completions, **columns) -> list[float] (or a "
                f"built-in name: {', '.join(BUILTIN_TASKS)}); only built-in tasks have default rewards."
            )
        rewards = [task]
    items = [rewards] if isinstance(rewards, str) or callable(rewards) else list(rewards)
    if not items:
        raise UsageError("`rewards` is empty: pass at least one reward function.")
    resolved = []
    for item in items:
        if isinstance(item, str):
            item = _builtin_reward(item)
        if not callable(item):
            raise UsageError(f"reward {item!r} is not callable; pass functions, callables or built-in names.")
        resolved.append(item)
    return resolved


def task_completion_length(task: str | None) -> int | None:
    """The completion budget of a built-in task (an addition answer is a few tokens; code needs room)."""
    return _TASK_COMPLETION_LENGTH[_task_key(task)] if task and _is_task(task) else None


def _check_reward_columns(data: Dataset, reward_funcs: list[Any], name: str) -> None:
    """The tests column of each code-execution reward, parsed for every row up front: one malformed row
    would otherwise stop the run when its batch first comes up."""
    if "sdpo_unsloth.rewards.code" not in sys.modules:  # no CodeExecutionReward can exist
        return
    from .rewards.code import CodeExecutionReward, parse_tests

    for reward in reward_funcs:
        if not isinstance(reward, CodeExecutionReward):
            continue
        column = reward.tests_column
        if column not in data.column_names:
            raise UsageError(
                f"`{name}` has no '{column}' column, which the reward {reward.__name__} runs (JSON tests per row; "
                f"columns: {data.column_names}); add it or pass CodeExecutionReward(tests_column=...)."
            )
        for i, spec in enumerate(data[column]):
            try:
                parse_tests(spec)
            except ValueError as exc:
                raise UsageError(
                    f"`{name}` row {i}, column '{column}': {exc}; fix or drop that row."
                ) from None


@dataclass(frozen=True)
class TrainInputs:
    """The resolved inputs of a run: the training rows, the held-out rows and the reward functions."""

    task: str | None  # the built-in task's name, or None for the caller's own data
    train_data: Dataset
    eval_rows: list[dict[str, Any]]
    reward_funcs: list[Any]


def resolve_inputs(
    dataset: Any, rewards: Any, eval_dataset: Any, eval_size: int | None, *, rows_needed: int, seed: int
) -> TrainInputs:
    """The dataset, rewards and evaluation rows of `train()` (see its `Args:` for the accepted forms).

    A built-in task is generated with `rows_needed` training rows plus the held-out ones; the held-out rows
    depend on the seed and `eval_size` only, not on `rows_needed` (the run's length).
    """
    requested_eval = eval_size if eval_size is not None else 32
    data, task = _resolve_dataset(dataset, rows_needed + requested_eval, seed)
    reward_funcs = _resolve_rewards(rewards, task)
    _check_reward_columns(data, reward_funcs, "dataset")
    if eval_dataset is not None:
        if eval_size is not None:
            raise UsageError("pass `eval_size` (rows split off dataset) or `eval_dataset`, not both.")
        if _is_task(eval_dataset):
            raise UsageError(
                f"`eval_dataset` must be held-out rows or a file, not the task name {eval_dataset!r}; leave it out "
                "to split eval_size rows off the task."
            )
        held, _ = _resolve_dataset(eval_dataset, 0, seed, name="eval_dataset")
        _check_reward_columns(held, reward_funcs, "eval_dataset")
        eval_rows, train_data = [held[i] for i in range(len(held))], data
        trained = {prompt_key(p) for p in data["prompt"]}
        shared = sum(prompt_key(row["prompt"]) in trained for row in eval_rows)
        if shared:
            warnings.warn(
                f"{shared} of the {len(eval_rows)} `eval_dataset` rows ask a question that is also in the training "
                "data: their scores measure memory, not learning (a generated task seeded one apart repeats most "
                "rows). Drop them from one of the two, or let train() split eval_size rows off the dataset.",
                stacklevel=2,
            )
    else:
        # A built-in task generates rows for the run's length; its held-out rows come from the rows of the
        # shortest run, so runs of any length (same seed) are scored on the same questions.
        pool = data
        if task is not None and rows_needed > TASK_MIN_ROWS:
            pool, _ = _resolve_dataset(dataset, TASK_MIN_ROWS + requested_eval, seed)
        n_eval = eval_size if eval_size is not None else min(32, len(pool) // 4)
        eval_rows, train_data = _split(data, n_eval, seed, pool=pool)
    return TrainInputs(task=task, train_data=train_data, eval_rows=eval_rows, reward_funcs=reward_funcs)
