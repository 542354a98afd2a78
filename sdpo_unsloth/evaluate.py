"""One greedy scorer: generate greedy completions for dataset rows and score them.

`train()` measures the model before and after training with it, and `tasks.addition.evaluate` (first-integer
accuracy) is built on it. Prompts are rendered with the chat template (`add_generation_prompt=True`; plain
string prompts as they are) and left-padded. Generation runs under `torch.no_grad` in eval mode; the model's
training mode and the tokenizer's padding side are restored afterwards, also on error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

from .bootstrap import bootstrap, current_backend
from .rewards.protocol import DEFAULT_REWARD_TIMEOUT

__all__ = ["evaluate_model", "evaluate_with_reward", "greedy_completions"]


def _render_prompt(tokenizer: Any, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def greedy_completions(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int, batch_size: int
) -> list[tuple[Sequence[dict[str, Any]], list[str], Any]]:
    """Greedy completions of `rows` in batches: a list of (rows of the batch, decoded texts, completion ids)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` before evaluating")
    from .adapters import dropout_off

    was_training, padding_side = model.training, tokenizer.padding_side
    # bitsandbytes repacks 4-bit weights on CPU for inference at an eval-mode forward, and nothing packs them
    # back: LoRA gradients through them are wrong afterwards. Such a model generates in training mode with its
    # dropout off (the same greedy completions).
    cpu_4bit = any(type(p).__name__ == "Params4bit" and p.device.type == "cpu" for p in model.parameters())
    batches = []
    with contextlib.ExitStack() as restore:
        restore.callback(model.train, was_training)
        restore.callback(setattr, tokenizer, "padding_side", padding_side)
        if cpu_4bit:
            restore.enter_context(dropout_off(model))
        else:
            model.eval()
        tokenizer.padding_side = "left"
        device = next(model.parameters()).device
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            texts = [_render_prompt(tokenizer, row["prompt"]) for row in batch]
            chat = not isinstance(batch[0]["prompt"], str)
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            completion_ids = out[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            batches.append((batch, decoded, completion_ids))
    return batches


def score_completions(
    rows: list[dict[str, Any]], texts: list[str], checked: Any, **extra: Any
) -> list[float | None]:
    """`checked` (a `CheckedReward`) on the completion `texts` for `rows`, called as TRL calls a reward: chat
    rows get chat-format completions, every column but the prompt is passed by name, and `extra` too."""
    chat = not isinstance(rows[0]["prompt"], str)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
    scores = checked(prompts=[row["prompt"] for row in rows], completions=completions, **extra, **columns)
    if inspect.iscoroutine(scores):  # an `async def` reward: run on an event loop of its own, in a worker
        with concurrent.futures.ThreadPoolExecutor(1) as worker:  # thread (a notebook's loop is running here)
            scores = worker.submit(asyncio.run, scores).result()
    return scores


def evaluate_with_reward(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    reward: Any,
    *,
    max_new_tokens: int,
    batch_size: int,
    graded: list[tuple[str, float | None]] | None = None,
    reward_timeout: float | None = DEFAULT_REWARD_TIMEOUT,
) -> float | None:
    """Greedy completions for `rows`, scored by `reward`: the mean score (None-scored rows skipped).

    `graded`, when given, receives (completion, score) per row in row order. `reward_timeout`: seconds one
    reward call may take, as in training (None: no limit, called in this thread, e.g. for `signal.alarm`)."""
    from .rewards.protocol import checked_reward

    checked = checked_reward(reward, timeout=reward_timeout)
    scores: list[float] = []
    for batch, decoded, completion_ids in greedy_completions(
        model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size
    ):
        values = score_completions(batch, decoded, checked, completion_ids=completion_ids.tolist())
        scores.extend(v for v in values if v is not None)
        if graded is not None:
            graded.extend(zip(decoded, values, strict=True))
    return sum(scores) / len(scores) if scores else None


def evaluate_model(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    reward: Any,
    *,
    reward_timeout: float | None = DEFAULT_REWARD_TIMEOUT,
    **kwargs: Any,
) -> float | None:
    """The score `train()` reports before and after training (None without evaluation rows).

    The addition task is scored by its own first-integer accuracy; any other reward by its mean score, each
    call under `reward_timeout` (the run's `SDPOConfig.reward_timeout`; None: no limit).
    `graded=[]` (a keyword argument) receives (greedy completion, its score) per row in row order.
    Under unsloth the model is switched to inference mode for the generation and back afterwards.
    """
    if not rows:
        return None
    unsloth = (current_backend() or bootstrap()).name == "unsloth"
    if unsloth:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    try:
        from .tasks.addition import AdditionReward, evaluate

        if isinstance(reward, AdditionReward):  # the task's own greedy-accuracy helper
            return evaluate(model, tokenizer, rows, **kwargs)
        return evaluate_with_reward(model, tokenizer, rows, reward, reward_timeout=reward_timeout, **kwargs)
    finally:
        if unsloth:
            FastLanguageModel.for_training(model)
