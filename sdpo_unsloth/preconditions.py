"""Bad inputs caught before training starts, each with one error naming the problem and the fix.

Checked here: a model path that does not exist; an empty dataset; no `prompt` column; a prompt that is
neither a string nor chat messages, or rows that mix the two; chat prompts with a tokenizer that has no chat
template; a tokenizer with neither a pad nor an eos token (with an eos token, TRL pads with it); a
prompt longer than `max_seq_length` leaves for the completion; `num_generations` not dividing the
completions per optimizer step (the message lists the values that work); an output folder that
cannot be written. A disk that fills during a save is handled where checkpoints are written
(`checkpoints.py`).

The errors are `ValueError`s (`InputError`; `UsageError` for an argument of `train`), so `train()` and the CLI report them as user mistakes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any


class UsageError(ValueError):
    """A bad argument to `train`; the message names the problem and the fix."""


class InputError(ValueError):
    """A bad training input; the message names it and the fix."""


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, Sequence) and not isinstance(prompt, str)


def check_dataset(dataset: Any, name: str = "train_dataset") -> None:
    """Non-empty, with a `prompt` column (iterable datasets without a length are not counted)."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise InputError(f"`{name}` is empty: give it at least a few rows with a 'prompt'.")
    if columns is not None and "prompt" not in columns:
        raise InputError(
            f"`{name}` has no 'prompt' column (columns: {columns}); rename your question column to 'prompt' "
            "(a string, or chat messages [{'role': 'user', 'content': ...}])."
        )
    if columns is not None and hasattr(dataset, "__len__"):
        check_prompts(dataset["prompt"], name)


def _prompt_problem(prompt: Any) -> str | None:
    """What is wrong with one row's prompt, or None for a string or a list of chat messages."""
    message = "[{'role': 'user', 'content': ...}]"
    if prompt is None:
        return "has no prompt (None: an empty cell, or a row without a 'prompt' key)"
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, Mapping):
        return f"has one message (a dict) as its prompt; wrap it in a list: {message}"
    if not _is_chat(prompt):
        return f"has a {type(prompt).__name__} prompt; use a string or a list of chat messages {message}"
    if not prompt:
        return f"has an empty list of messages as its prompt; give at least one, e.g. {message}"
    for j, msg in enumerate(prompt):
        no_content = (
            msg.get("content") is None and not msg.get("tool_calls") if isinstance(msg, Mapping) else True
        )
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or no_content:
            return f"has message {j} {msg!r:.80}, which lacks a 'role' or a 'content'; each message is like {message}"
    return None


def check_prompts(prompts: Sequence[Any], name: str = "train_dataset", where: Any = None) -> None:
    """Every prompt is a string or a list of chat messages with 'role' and 'content', and all rows use the same
    form; `where(i)` names row i in the errors (default "row i")."""
    where = where or (lambda i: f"row {i}")
    first: tuple[int, bool] | None = None
    for i, prompt in enumerate(prompts):
        problem = _prompt_problem(prompt)
        if problem:
            raise InputError(f"`{name}` {where(i)} {problem}.")
        chat = _is_chat(prompt)
        if first is None:
            first = (i, chat)
        elif chat != first[1]:
            forms = {True: "chat messages", False: "plain text"}
            raise InputError(
                f"`{name}` mixes prompt forms: {where(first[0])} is {forms[first[1]]} but {where(i)} is {forms[chat]}; "
                "use one form for every row (e.g. wrap each text as [{'role': 'user', 'content': text}])."
            )


def _text_tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def check_tokenizer(processing_class: Any, dataset: Any = None) -> None:
    """A chat template when the prompts are chat messages; a pad token (or an eos token to pad with)."""
    tokenizer = _text_tokenizer(processing_class)
    if tokenizer is None:
        return
    name = type(tokenizer).__name__
    has_prompts = dataset is not None and hasattr(dataset, "__len__") and len(dataset)
    chat = has_prompts and "prompt" in dataset.column_names and _is_chat(dataset[0]["prompt"])
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"the prompts are chat messages but the tokenizer ({name}) has no chat template; set "
            "tokenizer.chat_template (e.g. from the instruct version of the model) or pass plain-string prompts."
        )
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is None:
        raise InputError(
            f"the tokenizer ({name}) has neither a pad token nor an eos token, so completions cannot be padded; "
            "set tokenizer.pad_token (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the "
            "model's embeddings) before training."
        )


def check_prompt_lengths(
    tokenizer: Any, dataset: Any, max_seq_length: int, max_completion_length: int
) -> None:
    """Every prompt plus `max_completion_length` fits in `max_seq_length` (tokens)."""
    room = max_seq_length - max_completion_length
    if room <= 0:
        raise InputError(
            f"`max_completion_length` ({max_completion_length}) leaves no room for a prompt in `max_seq_length` "
            f"({max_seq_length}); raise max_seq_length or lower max_completion_length."
        )
    longest, where = 0, 0
    for i, prompt in enumerate(dataset["prompt"]):
        if _is_chat(prompt):
            ids = tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > longest:
            longest, where = len(ids), i
    if longest > room:
        raise InputError(
            f"prompt {where} is {longest} tokens; with max_completion_length {max_completion_length} it needs "
            f"max_seq_length >= {longest + max_completion_length} (now {max_seq_length}). Raise max_seq_length or "
            "shorten or drop the long prompts."
        )


def group_size_error(batch: int, accumulation: int, num_generations: int, processes: int = 1) -> str | None:
    """The message when `num_generations` does not divide the completions of one step, else None.

    >>> group_size_error(4, 1, 3)[:60]
    'num_generations (3) must divide the completions per step: pe'
    >>> group_size_error(4, 2, 4) is None
    True
    >>> group_size_error(0, 2, 4) is None  # an empty batch divides by anything, but trains nothing
    False
    """
    total = batch * accumulation * processes
    if total >= 1 and num_generations >= 2 and total % num_generations == 0:
        return None
    groups = [g for g in range(2, total + 1) if total % g == 0]
    batches = [num_generations * k for k in range(1, 4)]
    return (
        f"num_generations ({num_generations}) must divide the completions per step: per_device_train_batch_size x "
        f"gradient_accumulation_steps{' x processes' if processes > 1 else ''} = {total}, and be >= 2 (the "
        "generation batch must be divisible by num_generations). With this batch, num_generations can be "
        f"{', '.join(map(str, groups)) or f'none (the batch is {total})'}; or keep {num_generations} and use a "
        f"per_device_train_batch_size x gradient_accumulation_steps of {', '.join(map(str, batches))}, ..."
    )


def check_model_path(name: str, what: str = "model") -> None:
    """A `name` written as a local path (/x, ./x, ../x, ~/x, a/b/c) names a folder that exists; hub names
    ("org/name") pass. Without this, transformers reads a missing folder as a malformed hub id."""
    if not isinstance(name, str | os.PathLike):
        raise UsageError(
            f"`{what}` must be a hub name, a model folder or 'embedded', got {type(name).__name__}."
        )
    text = os.fspath(name)
    path = os.path.abspath(os.path.expanduser(text))
    looks_local = (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text.count("/") >= 2 or "\\" in text
    )
    if not looks_local or os.path.exists(path):
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    raise UsageError(
        f"`{what}` folder {path} does not exist ({parent} does; was it moved or misspelt?); pass an existing "
        "model folder, a hub name such as 'Qwen/Qwen2.5-0.5B-Instruct', or 'embedded'."
    )


def check_writable(folder: str | os.PathLike[str], what: str = "output_dir") -> None:
    """`folder` (or its nearest existing parent, where it would be created) accepts a new file."""
    path = os.path.abspath(os.fspath(folder))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(
            f"`{what}` {path} cannot be created: {probe} is a file, not a folder. Choose another {what}."
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".sdpo-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InputError(
            f"`{what}` {path} is not writable ({exc.strerror} in {probe}); choose a folder you can write to "
            "(on Colab, a Drive folder under /content/drive/MyDrive)."
        ) from None


def check_trainer_inputs(args: Any, train_dataset: Any, processing_class: Any) -> None:
    """What `SDPOTrainer` checks before building the GRPO trainer."""
    check_dataset(train_dataset)
    check_tokenizer(processing_class, train_dataset)
    if args is not None and getattr(args, "output_dir", None):
        check_writable(args.output_dir)
