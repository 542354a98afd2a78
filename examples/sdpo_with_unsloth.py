"""SDPO with Unsloth + QLoRA: reasoning in <think> tags, 4-bit base, LoRA rank 16, 8-bit AdamW.

The model is asked to reason inside <think>...</think> and then give the answer. When a sibling
completion succeeded, SDPO shows it to the teacher as a demonstration with the <think> block removed
(`remove_thinking_from_demonstration=True`), so the teacher learns from the answer, not from a long
chain of thought it would otherwise copy.

The critical import order (the first lines below): unsloth patches TRL's GRPOTrainer, then
sdpo_unsloth builds `SDPOTrainer` on the patched class.

    python examples/sdpo_with_unsloth.py                                # Colab/Kaggle T4 or any CUDA GPU
    python examples/sdpo_with_unsloth.py --model embedded --max-steps 2  # CPU smoke run, no download

Without a CUDA GPU (or without unsloth) the script says so in one line and runs the same training on
the transformers + peft backend, in fp32 without 4-bit and with short completions.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import torch

if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
    from unsloth import FastLanguageModel, PatchFastRL

    PatchFastRL("GRPO", FastLanguageModel)  # Patch FIRST
    USE_UNSLOTH = True
else:  # unsloth needs a CUDA GPU (on CPU it imports without PatchFastRL), so it is not imported here
    USE_UNSLOTH = False
    print("note: no CUDA GPU or unsloth not installed: using the transformers + peft backend instead.")

from sdpo_unsloth import SDPOConfig, SDPOTrainer, export, load_model  # Import SECOND
from sdpo_unsloth.api import DEFAULTS
from sdpo_unsloth.bootstrap import bf16_supported
from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset

# isort: split
from datasets import Dataset
from trl import GRPOConfig

SYSTEM_PROMPT = "Think step by step inside <think> and </think>. After </think>, answer with just the number."
_THINK = re.compile(r"<think>.*?</think>", re.S)


class ThinkThenAnswerReward:
    """1.0 when the number after the reasoning is the right sum, else 0.0, with feedback for SDPO.

    The <think>...</think> block is removed before scoring; an unclosed block (the completion ran out
    of tokens while reasoning) leaves no answer and scores 0.

    >>> reward = ThinkThenAnswerReward()
    >>> reward(prompts=["12+5="] * 3, answer=["17"] * 3,
    ...        completions=["<think>12+5 is 17</think>17", "<think>12+5", "<think>hmm</think>15"])
    [1.0, 0.0, 0.0]
    >>> reward.last_feedback[2]
    'Wrong. The answer is 17, not 15.'
    """

    __name__ = "think_then_answer"

    def __init__(self) -> None:
        self.last_feedback: list[str] = []
        self._answer = AdditionReward()

    def __call__(self, prompts, completions, answer, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        finals = [_THINK.sub("", text) for text in texts]
        finals = ["" if "<think>" in final else final for final in finals]  # unclosed reasoning
        scores = self._answer(prompts=prompts, completions=finals, answer=answer)
        self.last_feedback = list(self._answer.last_feedback)
        return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SDPO with Unsloth + QLoRA (4-bit, LoRA r16, 8-bit AdamW) on addition with <think> reasoning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="hub name, local model directory, or 'embedded' (SmolLM2-135M-Instruct, no download)",
    )
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument(
        "--output-dir", default="outputs/sdpo_with_unsloth", help="checkpoints and the adapter/"
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
        help="tokens per completion, reasoning included (default: 128 on GPU, 24 on CPU)",
    )
    parser.add_argument("--digits", type=int, default=2, help="digits per operand")
    parser.add_argument("--train-size", type=int, default=64, help="training problems")
    parser.add_argument("--eval-size", type=int, default=16, help="held-out problems scored before/after")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and bf16_supported()  # native bf16 (a T4: fp16)

    # 4-bit base + LoRA r16 student + EMA teacher adapter; unsloth's loader when it is the backend.
    # load_model's default base: 4-bit on a GPU (the embedded model excepted: it is dequantised from a 4-bit
    # file), unquantised on CPU.
    model, tokenizer = load_model(args.model, lora_r=16, gradient_checkpointing=on_gpu, seed=args.seed)

    common = {"seed": args.seed, "digits": args.digits, "system_prompt": SYSTEM_PROMPT}
    train_rows = addition_dataset(args.train_size, **common)
    eval_rows = addition_dataset(args.eval_size, **{**common, "seed": args.seed + 1}, exclude=train_rows)

    grpo_config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=4,
        max_completion_length=args.max_completion_length or (128 if on_gpu else 24),
        temperature=0.7,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        optim="adamw_8bit" if on_gpu else "adamw_torch",  # bitsandbytes' 8-bit AdamW needs a GPU
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
    sdpo_config = SDPOConfig(remove_thinking_from_demonstration=True)  # the seed's defaults otherwise
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[ThinkThenAnswerReward()],
        args=grpo_config,
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
    )

    # TRL's evaluation: sampled completions on the held-out problems, scored by the same reward.
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]  # every process evaluates its share
    if not trainer.accelerator.is_main_process:  # under `accelerate launch`: export and report once
        return

    adapter = export(trainer, Path(args.output_dir) / "adapter", format="lora")
    backend = "unsloth" if USE_UNSLOTH else "transformers + peft"
    print(
        f"backend: {backend}; held-out mean reward ({len(eval_rows)} problems): {before:.3f} -> {after:.3f}"
    )
    print(f"student adapter saved to {adapter.output_dir}")


if __name__ == "__main__":
    main()
