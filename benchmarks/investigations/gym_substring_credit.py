"""How often reasoning-gym's default verifier gives a wrong numeric answer partial credit, and what GRPO then sees.

    OMP_NUM_THREADS=1 python benchmarks/investigations/gym_substring_credit.py \\
        --tasks 'gym:lcm?max_value=20,gym:gcd?max_value=20'

reasoning-gym's `ProceduralDataset.score_answer` (kept by lcm, gcd, count_bits, basic_arithmetic and a third of
its tasks) scores an answer that contains the expected one len(expected) / len(answer): "14" for 4 gets 0.5, and
`GymReward`'s fallbacks (the last line, the whole text) turn a sentence that echoes the question's numbers into a
few hundredths. The untrained embedded model samples `--generations` completions for each of the first
`--prompts` training rows of the panel's split (`learning_tasks.load_task`), at the panel's temperature and
budget; each is scored with that substring credit (`GymReward(number_substring_credit=True)`) and as `GymReward`
scores now (a number is right or wrong). Printed per task: samples with a right answer, with partial credit,
and the prompt groups whose rewards differ without a right answer (GRPO divides a group's advantages by their
spread, so such a group trains as if it had a success), then a few of the credited completions.
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gym:lcm?max_value=20")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=6, help="credited completions printed per task")
    return p.parse_args(argv)


def groups_of(scores: list[float], size: int) -> list[list[float]]:
    return [scores[i : i + size] for i in range(0, len(scores), size)]


def analyse(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    from learning_tasks import load_task, sample_completions

    from sdpo_unsloth.tasks.gym import GymReward

    task = load_task(name, 32)
    rows = task.train[: args.prompts]
    n = args.generations
    texts, _ = sample_completions(model, tokenizer, rows, n, args.max_completion_length, args.temperature)
    columns = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k != "prompt"}
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    lenient = GymReward(number_substring_credit=True)(prompts=prompts, completions=texts, **columns)
    exact = GymReward()(prompts=prompts, completions=texts, **columns)
    credited = [i for i, s in enumerate(lenient) if 0 < s < 1]
    return {
        "task": name,
        "samples": len(texts),
        "right": sum(s >= 1 for s in exact),
        "substring_credit": len(credited),
        "groups": len(rows),
        "spread_without_right_answer": sum(
            1 for g in groups_of(lenient, n) if max(g) > min(g) and max(g) < 1
        ),
        "spread_exact": sum(1 for g in groups_of(exact, n) if max(g) > min(g)),
        "examples": [
            {"credit": round(lenient[i], 3), "expected": columns["answer"][i], "completion": texts[i][:160]}
            for i in credited[: args.show]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    from learning_tasks import print_for_each_task

    return print_for_each_task(analyse, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
