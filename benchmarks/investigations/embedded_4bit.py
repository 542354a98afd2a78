"""What an nf4 base costs the embedded model (CPU, offline): untrained and after the quickstart's training.

The embedded SmolLM2-135M-Instruct is dequantised from a Q4_1 GGUF. This measures, with and without
`load_in_4bit` (bitsandbytes nf4, transformers backend, fp32 compute):

1. the untrained model's greedy accuracy on all 100 one-digit sums;
2. the quickstart notebook's `train()` call (96 problems, 32 held out, 30 steps, its other parameters), its
   held-out accuracy before and after.

    OMP_NUM_THREADS=1 python benchmarks/investigations/embedded_4bit.py --write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import sdpo_unsloth
from sdpo_unsloth import load_model
from sdpo_unsloth.evaluate import evaluate_model
from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def untrained(four_bit: bool) -> float:
    model, tokenizer = load_model(
        "embedded", load_in_4bit=four_bit, backend="transformers", gradient_checkpointing=False, seed=0
    )
    rows = addition_dataset(100, seed=0, digits=1)  # every one-digit sum once
    assert len({r["prompt"][-1]["content"] for r in rows}) == 100
    return evaluate_model(model, tokenizer, rows, AdditionReward(), max_new_tokens=16, batch_size=25)


def quickstart(four_bit: bool, steps: int) -> tuple[float, float, float]:
    rows = addition_dataset(96, seed=0, digits=1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = sdpo_unsloth.train(
            "embedded", rows, [AdditionReward()], out, max_steps=steps, learning_rate=5e-4,
            max_completion_length=16, temperature=0.7, eval_size=32, export_formats=(),
            load_in_4bit=four_bit, progress=False, backend="transformers",
        )  # fmt: skip
    return result.before, result.after, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="the quickstart's MAX_STEPS")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    lines = [
        "## The embedded model with an nf4 base (CPU)",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/investigations/embedded_4bit.py --steps {args.steps} --write` on "
        f"{date.today()}, torch {torch.__version__}, 1 thread, transformers backend, fp32 compute. The embedded "
        "SmolLM2-135M-Instruct is dequantised from a Q4_1 GGUF; `load_in_4bit` quantises it again (nf4). "
        "Untrained: greedy accuracy on all 100 one-digit sums. Quickstart: the notebook's `train()` call "
        f"(96 problems, 32 held out, {args.steps} steps, learning rate 5e-4, default seed), held-out accuracy.",
        "",
        "| base | untrained, 100 sums | quickstart before | quickstart after | quickstart run (s) |",
        "|---|---|---|---|---|",
    ]
    for four_bit in (False, True):
        score = untrained(four_bit)
        before, after, seconds = quickstart(four_bit, args.steps)
        name = "nf4 (`load_in_4bit=True`)" if four_bit else "as loaded (fp32)"
        lines.append(f"| {name} | {score:.1%} | {before:.1%} | {after:.1%} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.write:
        from common import write_section

        write_section("embedded-4bit", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
