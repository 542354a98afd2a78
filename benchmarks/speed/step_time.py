"""SDPO step time / GRPO step time on the same model, data and settings (CPU by default).

    OMP_NUM_THREADS=1 python benchmarks/speed/step_time.py --steps 12 [--model tiny|embedded] [--write]

Median wall time per optimizer step (generation + rewards + teacher + loss + backward), after two
warm-up steps. Both runs use our trainer: GRPO is `SDPOConfig(enabled=False)`. Every SDPO sample
gets feedback, so every sample pays for a teacher forward (the worst case).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared `common` module
from common import ADDITION_PROMPTS, STEP_TIME_RUN, AlwaysWrong


class StepTimer:
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        return _Callback()


def build(model_name: str):
    if model_name == "tiny":
        from conftest import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        return make_tiny_model(len(tokenizer), hidden=128, layers=4), tokenizer
    from sdpo_unsloth.embedded import load_embedded

    return load_embedded()


def run(model_name: str, enabled: bool, steps: int, completion: int) -> list[float]:
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer

    torch.manual_seed(0)
    model, tokenizer = build(model_name)
    rows = ADDITION_PROMPTS
    args = GRPOConfig(
        output_dir="/tmp/sdpo-step-time",
        max_completion_length=completion,
        max_steps=steps + 2,
        **STEP_TIME_RUN,
    )
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=SDPOConfig(enabled=enabled),
        processing_class=tokenizer,
        reward_funcs=[AlwaysWrong()],
        train_dataset=Dataset.from_list(rows),
    )
    timer = StepTimer()
    trainer.add_callback(timer.callback())
    trainer.train()
    return timer.times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="write the result into docs/benchmarks.md")
    args = parser.parse_args()
    grpo = run(args.model, False, args.steps, args.completion)
    sdpo = run(args.model, True, args.steps, args.completion)
    g, s = statistics.median(grpo), statistics.median(sdpo)
    row = f"| {args.model} | {args.completion} | {len(grpo)} | {g:.3f} s | {s:.3f} s | **{s / g:.2f}x** |"
    print(row)
    if args.write:
        from common import write_section

        command = f"OMP_NUM_THREADS=1 python benchmarks/speed/step_time.py --model {args.model} --steps {args.steps} --write"
        write_section(
            "step-time",
            "## SDPO vs GRPO step time (CPU)\n\n"
            f"`{command}` on {date.today()}, {platform.machine()}, torch {torch.__version__}, 1 thread. "
            "4 prompts x 4 generations per micro-batch, GA 2, every SDPO sample with feedback (worst case). "
            "Median over the steps after two warm-ups. Target: <= 1.3x on CPU.\n\n"
            "| model | completion tokens | steps | GRPO step | SDPO step | SDPO / GRPO |\n|---|---|---|---|---|---|\n"
            + row,
            append_row=row,
        )


if __name__ == "__main__":
    main()
