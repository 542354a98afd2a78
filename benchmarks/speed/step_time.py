"""SDPO step time / GRPO step time on the same model, data and settings (CPU by default).

    OMP_NUM_THREADS=1 python benchmarks/speed/step_time.py --steps 12 [--model tiny|embedded] [--write]

Median wall time per optimizer step (generation + rewards + teacher + loss + backward), after two
warm-up steps. Every run uses our trainer: GRPO is `SDPOConfig(enabled=False)`, SDPO the seed's pure SDPO
(`SDPOConfig()`), the per-group hybrid (`grpo_weight=1, hybrid_mode="per_group"`) and `train()`'s default, that hybrid
with the KL anchor on the distilled samples (`distill_anchor=0.1`).
Two reward mixes: "worst case", every completion wrong with feedback, so every sample pays for a teacher
forward; "half the groups succeed", one success in every other group of 4, where the per-group hybrid
trains GRPO without a teacher forward.
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
from common import ADDITION_PROMPTS, STEP_TIME_RUN, AlwaysWrong, HalfGroupsSucceed

import sdpo_unsloth.trainer
from sdpo_unsloth.train_config import SDPO_DEFAULTS


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


METHODS = {  # name -> SDPOConfig kwargs (+ the run's share_teacher_prompts and trim_teacher_prompts, default True)
    "GRPO": {"enabled": False},
    "SDPO": {},
    "SDPO, teacher prompt per row": {"share_teacher_prompts": False},  # before the shared teacher prompt
    "per-group hybrid": {**SDPO_DEFAULTS, "distill_anchor": 0.0},
    # before the teacher forward dropped the columns that are padding in every row it runs
    "per-group hybrid, untrimmed teacher prompt": {
        **SDPO_DEFAULTS,
        "distill_anchor": 0.0,
        "trim_teacher_prompts": False,
    },
    "train()'s default": SDPO_DEFAULTS,  # the per-group hybrid with the KL anchor
}
TRIM = sdpo_unsloth.trainer._trim_left_padding
MIXES = {"worst case": AlwaysWrong, "half the groups succeed": HalfGroupsSucceed}


def run(
    model_name: str, sdpo: dict, reward: object, steps: int, completion: int, beta: float = 0.0
) -> list[float]:
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer

    sdpo = dict(sdpo)
    share = sdpo.pop("share_teacher_prompts", True)
    trim = sdpo.pop("trim_teacher_prompts", True)
    # The untrimmed variant restores the earlier behaviour for its own run: every teacher row padded to the
    # generation batch's longest teacher prompt.
    sdpo_unsloth.trainer._trim_left_padding = TRIM if trim else (lambda ids, mask: (ids, mask))
    torch.manual_seed(0)
    model, tokenizer = build(model_name)
    rows = ADDITION_PROMPTS
    args = GRPOConfig(
        output_dir="/tmp/sdpo-step-time",
        max_completion_length=completion,
        max_steps=steps + 2,
        beta=beta,
        **STEP_TIME_RUN,
    )
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=SDPOConfig(**sdpo),
        processing_class=tokenizer,
        reward_funcs=[reward],
        train_dataset=Dataset.from_list(rows),
    )
    trainer.share_teacher_prompts = share
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
    rows = []
    for mix, reward in MIXES.items():
        median = {
            name: statistics.median(run(args.model, sdpo, reward(), args.steps, args.completion))
            for name, sdpo in METHODS.items()
        }
        g, default = median["GRPO"], median["train()'s default"]
        rows.append(
            f"| {args.model}, {mix} | {args.completion} | {args.steps} | {g:.3f} s | {median['SDPO']:.3f} s "
            f"| **{median['SDPO'] / g:.2f}x** | {median['SDPO, teacher prompt per row'] / g:.2f}x "
            f"| {median['per-group hybrid']:.3f} s "
            f"| **{median['per-group hybrid'] / g:.2f}x** "
            f"| {median['per-group hybrid, untrimmed teacher prompt'] / g:.2f}x "
            f"| **{default / g:.2f}x** |"
        )
        print(rows[-1], flush=True)
    if args.write:
        from common import write_section

        command = (
            f"OMP_NUM_THREADS=1 python benchmarks/speed/step_time.py --model {args.model} --steps {args.steps} "
            f"--completion {args.completion} --write"
        )
        header = (
            "## SDPO vs GRPO step time (CPU)\n\n"
            f"`{command}` on {date.today()}, {platform.machine()}, torch {torch.__version__}, 1 thread (one row "
            "per model and reward mix; each run of the script replaces its model's rows). 4 prompts x 4 "
            "generations per micro-batch, GA 2. SDPO = the seed's pure SDPO (`SDPOConfig()`); per-group hybrid = "
            "`grpo_weight=1, hybrid_mode='per_group'`; *default* = `train()`'s, that hybrid with the KL anchor on "
            "the distilled samples (`distill_anchor=0.1`: one more forward without gradient over them). Reward mixes: *worst case*, every completion wrong with feedback (every sample "
            "pays for a teacher forward, in both SDPO and the hybrid); *half the groups succeed*, one success in "
            "every other group (the hybrid trains GRPO there, without a teacher forward). Median over the steps "
            "after two warm-ups. *Prompt per row*: SDPO with the teacher run over every row's full reprompt "
            "(`share_teacher_prompts = False`, the behaviour before rows that share a reprompt ran it once), "
            "in the same run. Both mixes give every failed sibling the same reprompt (feedback that names the "
            "answer, or the same demonstration): the best case for sharing; per-sample feedback (the code "
            "task's) shares nothing. *Hybrid, untrimmed*: the per-group hybrid with its teacher rows padded to the "
            "generation batch's longest teacher prompt (the behaviour before the teacher forward dropped the columns "
            "that are padding in every row it runs; in the half-success mix the longest is a demonstration row that "
            "distils nothing), in the same run. Target (issue: fast where users wait): worst case <= 1.15x on CPU.\n\n"
            "| model, reward mix | completion tokens | steps | GRPO step | SDPO step | SDPO / GRPO "
            "| prompt per row / GRPO | per-group hybrid step | hybrid / GRPO | hybrid, untrimmed / GRPO "
            "| default / GRPO |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|"
        )
        for row in rows:
            write_section("step-time", header + "\n" + row, append_row=row)


if __name__ == "__main__":
    main()
