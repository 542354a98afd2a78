"""The embedded model's untrained held-out score with and without an nf4 base (CPU, offline).

The quickstart notebook's data and `train()` call (one-digit sums, 96 problems, 32 held out, 16 tokens), run for one
step at a negligible learning rate, so that `result.before` is the untrained model's greedy score:

    OMP_NUM_THREADS=1 python benchmarks/investigations/embedded_4bit.py
"""

from __future__ import annotations

import sys
import tempfile

import sdpo_unsloth
from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset


def main() -> int:
    rows = addition_dataset(96, seed=0, digits=1)
    for four_bit in (True, False):
        with tempfile.TemporaryDirectory() as out:
            result = sdpo_unsloth.train(
                "embedded", rows, [AdditionReward()], out, max_steps=1, learning_rate=1e-12,
                max_completion_length=16, temperature=0.7, eval_size=32, export_formats=(),
                load_in_4bit=four_bit, progress=False,
            )  # fmt: skip
        print(f"load_in_4bit={four_bit}: held-out accuracy before training {result.before:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
