"""Code generation with test feedback: SDPO learning from detailed error messages.

Forty small Python tasks in four types (list ops, strings, conditionals, loops), each with hidden
tests. `CodeExecutionReward` runs every completion's code in a sandboxed child process (never in the
trainer), scores the share of tests passed, and explains the failures on `last_feedback`, e.g.

    2 of 5 tests failed:
    input=[1, 2, 3]: expected 6, got 0

SDPO puts that feedback into the teacher's prompt, so the teacher knows what went wrong and the
student is distilled towards what the teacher then predicts. The settings are the paper's for rich
feedback: reverse KL (alpha=1.0), top-20 logits, a slow EMA teacher (rate 0.01), as pure SDPO (an
`SDPOConfig`'s grpo_weight defaults to 0): every sample with a teacher is distilled, and there is no
GRPO term. `sdpo_unsloth.train()` defaults to the per-group hybrid with the KL anchor instead (GRPO in
prompt groups whose rewards differ), because on the learning panel's code task pure SDPO scored below GRPO
(docs/benchmarks.md, "Learning panel"); notebooks/rich_feedback_code.ipynb trains that way.

    python examples/sdpo_rich_feedback.py                                # Qwen2.5-0.5B-Instruct, GPU
    python examples/sdpo_rich_feedback.py --model embedded --max-steps 2  # CPU smoke run, no download

On CPU the script says so and uses fp32, no gradient checkpointing and short completions (too short
for whole functions: a CPU run checks the pipeline, a GPU run shows the learning).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Import sdpo_unsloth before trl/transformers: it picks the backend (unsloth on a GPU when installed).
from sdpo_unsloth import SDPOConfig, SDPOTrainer, export, load_model
from sdpo_unsloth.api import DEFAULTS
from sdpo_unsloth.bootstrap import bf16_supported
from sdpo_unsloth.rewards.code import CodeExecutionReward
from sdpo_unsloth.tasks.code import TASK_TYPES, code_tasks

# isort: split
import torch
from datasets import Dataset
from trl import GRPOConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SDPO on code generation: sandboxed tests, per-test failure feedback in the teacher prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="hub name, local model directory, or 'embedded' (SmolLM2-135M-Instruct, no download)",
    )
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument(
        "--output-dir", default="outputs/sdpo_rich_feedback", help="checkpoints and the adapter/"
    )
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
        help="tokens per completion (default: 256 on GPU, 48 on CPU)",
    )
    parser.add_argument(
        "--task-types",
        nargs="+",
        default=list(TASK_TYPES),
        choices=TASK_TYPES,
        help="which task types to train and evaluate on",
    )
    parser.add_argument("--eval-size", type=int, default=8, help="tasks held out and scored before/after")
    parser.add_argument("--seed", type=int, default=0, help="test inputs, split and training seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and bf16_supported()  # native bf16 (a T4: fp16)
    completion_length = args.max_completion_length or (256 if on_gpu else 48)
    if not on_gpu:
        print(
            "note: no CUDA GPU, running on CPU with CPU-friendly settings: fp32, no gradient checkpointing, "
            f"completions of at most {completion_length} tokens, no 4-bit."
        )

    # load_model's default base: 4-bit on a GPU (the embedded model excepted: it is dequantised from a 4-bit
    # file), unquantised on CPU.
    model, tokenizer = load_model(args.model, lora_r=16, gradient_checkpointing=on_gpu, seed=args.seed)

    # Rows: {"prompt": [system, user], "tests": "<json>", "task_type", "function"}; shuffled by seed.
    rows = code_tasks(seed=args.seed, task_types=args.task_types)
    if not 0 < args.eval_size < len(rows):
        raise SystemExit(f"--eval-size must be between 1 and {len(rows) - 1} for these task types")
    eval_rows, train_rows = rows[: args.eval_size], rows[args.eval_size :]
    reward = CodeExecutionReward(timeout_s=2.0)  # fraction of tests passed; feedback per failing test

    grpo_config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=4,
        max_completion_length=completion_length,  # code needs more room than the seed's 128
        temperature=0.7,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        bf16=bf16,
        fp16=on_gpu and not bf16,  # a T4 has no bf16
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,
        remove_unused_columns=False,  # required for SDPO: the reward reads the `tests` column
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
    )
    sdpo_config = SDPOConfig(
        alpha=1.0,  # reverse KL, as in the paper's rich-feedback runs
        distillation_topk=20,
        teacher_mode="ema",
        teacher_update_rate=0.01,
        include_environment_feedback=True,
        environment_feedback_only_without_solution=True,  # a passing sibling is shown instead when there is one
    )
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=grpo_config,
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
    )

    # TRL's evaluation: sampled completions for the held-out tasks, run against their tests.
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]  # every process evaluates its share
    if not trainer.accelerator.is_main_process:  # under `accelerate launch`: export and report once
        return
    print(f"sandbox isolation level: {reward.isolation.level}")

    adapter = export(trainer, Path(args.output_dir) / "adapter", format="lora")
    print(f"held-out share of tests passed ({len(eval_rows)} tasks): {before:.3f} -> {after:.3f}")
    print(f"student adapter saved to {adapter.output_dir}")


if __name__ == "__main__":
    main()
