"""How far one optimizer step moves the student LoRA, per learning rate (the no-op watchdog's `MOVE_MIN` and `GAP_MIN`).

Runs the real `SDPOTrainer` for a few steps per learning rate and prints the per-step
`sdpo/student_relative_change` (||theta_t - theta_{t-1}|| / ||theta_{t-1}|| over the student's trainable
tensors, measured by `sdpo_unsloth.watchdog.NoOpWatchdog`) and the distillation loss.

    OMP_NUM_THREADS=1 python benchmarks/learning/lora_movement.py --model tiny --lrs 1e-5,5e-5,2e-4,5e-4
    OMP_NUM_THREADS=1 python benchmarks/learning/lora_movement.py --model embedded --lrs 1e-5,5e-5,2e-4 --steps 4

`tiny`: the tests' random 2-layer Qwen2 (hidden 32, LoRA r16), reward "has a digit". `embedded`:
SmolLM2-135M-Instruct (LoRA r16, fp32 on CPU), one-digit addition with `AdditionReward`. Both: AdamW,
linear decay, no warmup, 8 completions per step (2 prompts x 4), seed 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy


def _tiny():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model, make_tiny_tokenizer
    from datasets import Dataset

    tokenizer = make_tiny_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a in range(4)
        for b in range(4)
    ]

    def has_digit(prompts, completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c[-1]["content"])) for c in completions]

    return make_tiny_model(len(tokenizer)), tokenizer, Dataset.from_list(rows), has_digit, 6


def _embedded():
    from datasets import Dataset

    from sdpo_unsloth import load_model
    from sdpo_unsloth.tasks.addition import MAX_NEW_TOKENS, AdditionReward, addition_dataset

    model, tokenizer = load_model("embedded", load_in_4bit=False, gradient_checkpointing=False, seed=0)
    return model, tokenizer, Dataset.from_list(addition_dataset(64, seed=0)), AdditionReward(), MAX_NEW_TOKENS


def grpo_args(length: int, steps: int, lr: float) -> Any:
    """The GRPOConfig of these measurements (also used by diagnostics_overhead.py): 8 completions per step."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        num_generations=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_completion_length=length,
        max_steps=steps,
        learning_rate=lr,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        temperature=0.7,
        seed=0,
        disable_tqdm=True,
    )


def run(model_name: str, lr: float, steps: int) -> list[tuple[float, float | None]]:

    from sdpo_unsloth import SDPOConfig, SDPOTrainer

    model, tokenizer, data, reward, length = _tiny() if model_name == "tiny" else _embedded()
    args = grpo_args(length, steps, lr)
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=SDPOConfig(diagnostics_samples=0),
        processing_class=tokenizer,
        reward_funcs=[reward],
        train_dataset=data,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [e for e in trainer.state.log_history if "sdpo/student_relative_change" in e]
    return [(e["sdpo/student_relative_change"], e.get("sdpo/teacher_student_kl")) for e in logs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--lrs", default="1e-5,5e-5,2e-4,5e-4")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"model={args.model} steps={args.steps}")
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        started = time.monotonic()
        steps = run(args.model, lr, args.steps)
        rows.append((lr, steps, time.monotonic() - started))
    print("lr       relative change per step          mean     teacher-student KL per step")
    for lr, steps, _ in rows:
        moves = [m for m, _ in steps]
        cells = " ".join(f"{m:.1e}" for m in moves)
        gaps = " ".join("-" if g is None else f"{g:.1e}" for _, g in steps)
        print(f"{lr:<8g} {cells:<33} {sum(moves) / len(moves):.1e}  {gaps}")


if __name__ == "__main__":
    main()
