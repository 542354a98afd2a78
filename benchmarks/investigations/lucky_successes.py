"""What a gym task's successes are at the start of training: answers reasoned to, or numbers that happen to fit.

    OMP_NUM_THREADS=1 python benchmarks/investigations/lucky_successes.py \\
        --tasks 'gym:lcm?max_value=20,gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1'

The untrained embedded model samples `--generations` completions for each of the first `--prompts` training rows
of the panel's split (`learning_tasks.load_task`), at the panel's temperature and budget, scored by `GymReward`
(a number right or wrong). For the successes GRPO would reinforce, printed per task:

- `cut`: the completion ran to the token budget without ending. Its "answer" is the last number of an unfinished
  text (`GymReward` reads the last number when there is no answer tag), often one the reasoning was still
  talking about.
- `echo`: the expected answer is one of the numbers in the question (lcm of 14 and 7, gcd of 9 and 9), so a
  completion that repeats the question's numbers can end on it without computing anything.

and, over the task's held-out rows, `echo_rows`: the share whose answer is one of the question's numbers, and
`largest_number`: the score of answering every row with the largest number in its question. A student that
learns to echo the question reaches about that score and no further.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: learning_tasks

from sdpo_unsloth.heldout import question_numbers as heldout_numbers
from sdpo_unsloth.rewards.protocol import question_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gym:lcm?max_value=20")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=4, help="successes printed per task")
    return p.parse_args(argv)


def question_numbers(row: dict) -> list[float]:
    return sorted(heldout_numbers(question_text(row["prompt"])))


def is_echo(row: dict) -> bool:
    """Whether the row's answer is a number that its question states."""
    try:
        return float(row["answer"]) in question_numbers(row)
    except ValueError:
        return False


def largest_number_score(rows: list[dict]) -> float:
    """The score of answering each row with the largest number of its question (0 for a row without one)."""
    from sdpo_unsloth.tasks.gym import GymReward

    answers = [f"{max(question_numbers(r)):g}" if question_numbers(r) else "" for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = GymReward()(prompts=[r["prompt"] for r in rows], completions=answers, **columns)
    return sum(scores) / len(scores)


def analyse(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    from learning_tasks import load_task, sample_completions

    from sdpo_unsloth.tasks.gym import GymReward

    task = load_task(name, 32)
    rows = task.train[: args.prompts]
    n = args.generations
    texts, cut = sample_completions(model, tokenizer, rows, n, args.max_completion_length, args.temperature)
    sampled = [r for r in rows for _ in range(n)]
    columns = {k: [r[k] for r in sampled] for k in rows[0] if k != "prompt"}
    scores = GymReward()(prompts=[r["prompt"] for r in sampled], completions=texts, **columns)
    right = [i for i, s in enumerate(scores) if s >= 1.0]
    return {
        "task": name,
        "samples": len(texts),
        "right": len(right),
        "right_cut": sum(cut[i] for i in right),
        "right_echo": sum(is_echo(sampled[i]) for i in right),
        "right_neither": sum(not cut[i] and not is_echo(sampled[i]) for i in right),
        "cut": sum(cut),
        "held_out_rows": len(task.held),
        "echo_rows": round(sum(is_echo(r) for r in task.held) / len(task.held), 3),
        "largest_number": round(largest_number_score(task.held), 3),
        "examples": [
            {
                "question": question_text(sampled[i]["prompt"])[-60:],
                "answer": columns["answer"][i],
                "cut": cut[i],
                "completion": texts[i][-160:],
            }
            for i in right[: args.show]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    from learning_tasks import print_for_each_task

    return print_for_each_task(analyse, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
