"""What the KL anchor costs per optimizer step (CPU): the per-group hybrid without it, with
`SDPOConfig.distill_anchor` (the penalty on the distilled samples only) and with `GRPOConfig.beta` (on every
sample), in one run on the same model, data and settings as benchmarks/speed/step_time.py.

    OMP_NUM_THREADS=1 python benchmarks/investigations/anchor_cost.py --model embedded --steps 6 --write

The anchor scores the completions once more under the initial policy (a forward without gradient; for a fresh
LoRA the base with adapters switched off): on the rows it applies to, so `distill_anchor` pays for the distilled
rows only and beta for every row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import step_time  # (sets OMP_NUM_THREADS, offline hub and the transformers backend)
from common import write_section

from sdpo_unsloth.train_config import SDPO_DEFAULTS

ANCHOR = 0.1
HYBRID = {
    **SDPO_DEFAULTS,
    "distill_anchor": 0.0,
}  # the per-group hybrid alone (train()'s default adds the anchor)
VARIANTS = {  # name -> (SDPOConfig kwargs, GRPOConfig.beta)
    "hybrid": (HYBRID, 0.0),
    "distill_anchor": ({**HYBRID, "distill_anchor": ANCHOR}, 0.0),
    "beta": (HYBRID, ANCHOR),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--completion", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="write the result into docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    for mix, reward in step_time.MIXES.items():
        median = {
            name: statistics.median(
                step_time.run(args.model, sdpo, reward(), args.steps, args.completion, beta=beta)
            )
            for name, (sdpo, beta) in VARIANTS.items()
        }
        h = median["hybrid"]
        rows.append(
            f"| {args.model}, {mix} | {args.steps} | {h:.3f} s | {median['distill_anchor']:.3f} s "
            f"| **{median['distill_anchor'] / h:.2f}x** | {median['beta']:.3f} s | **{median['beta'] / h:.2f}x** |"
        )
        print(rows[-1], flush=True)
    if args.write:
        command = (
            f"OMP_NUM_THREADS=1 python benchmarks/investigations/anchor_cost.py --model {args.model} "
            f"--steps {args.steps} --completion {args.completion} --write"
        )
        header = (
            "## What the KL anchor costs per step (CPU)\n\n"
            f"`{command}` on {date.today()}, {platform.machine()}, torch {torch.__version__}, 1 thread; settings and "
            "reward mixes as in the step-time section above, completions of "
            f"{args.completion} tokens. The per-group hybrid (`train()`'s default) alone, with "
            f"`SDPOConfig(distill_anchor={ANCHOR})` (the KL penalty to the initial policy on the distilled samples "
            f"only) and with `GRPOConfig(beta={ANCHOR})` (on every sample), each in the same run; median step after "
            "two warm-ups. In the worst case every sample is distilled, so the anchor and beta score the same rows.\n\n"
            "| model, reward mix | steps | hybrid step | with distill_anchor | / hybrid | with beta | / hybrid |\n"
            "|---|---|---|---|---|---|---|"
        )
        for row in rows:
            write_section("anchor-cost", header + "\n" + row, append_row=row)


if __name__ == "__main__":
    main()
