"""Two ways to a cheaper teacher forward, measured before building them (CPU, embedded SmolLM2-135M).

1. **Rows batched by length.** How much of the teacher's prompt batch is left padding on the code task, whose
   per-sample feedback gives every failed sample its own reprompt (so sharing a prompt does not apply):
   `--steps` optimizer steps of pure SDPO, the padded and real prompt tokens of every teacher forward.
2. **One teacher call per optimizer step** instead of one per micro-batch: the decoder run as the shared
   teacher pass runs it (each distinct prompt once, its KV cache repeated to its rows, the completions on
   top), for one micro-batch of 4 rows sharing a 72-token reprompt with 8 completion tokens, twice, against
   both micro-batches in one call; median of 7 repeats, no grad.

    OMP_NUM_THREADS=1 python benchmarks/investigations/teacher_options.py --steps 2 --write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: `common`, `learning_tasks`

import torch


def padding_on_code(steps: int) -> tuple[int, int, int]:
    """(teacher forwards, padded prompt tokens, real prompt tokens) over `steps` SDPO steps on the code task."""
    from common import STEP_TIME_RUN
    from datasets import Dataset
    from learning_tasks import load_task
    from trl import GRPOConfig

    import sdpo_unsloth.trainer as trainer_module
    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.embedded import load_embedded

    task = load_task("code", 16)
    seen: list[tuple[int, int]] = []
    original = trainer_module._SDPOMixin._teacher_hidden

    def recording(self, model, inputs, rows):
        mask = inputs["sdpo_teacher_prompt_mask"][rows]
        seen.append((mask.numel(), int(mask.sum())))
        return original(self, model, inputs, rows)

    trainer_module._SDPOMixin._teacher_hidden = recording
    try:
        torch.manual_seed(0)
        model, tokenizer = load_embedded()
        args = GRPOConfig(
            output_dir="/tmp/sdpo-teacher-options",
            max_completion_length=64,
            max_steps=steps,
            **{**STEP_TIME_RUN, "temperature": 0.7},
        )
        SDPOTrainer(
            model=model,
            args=args,
            sdpo_config=SDPOConfig(),
            processing_class=tokenizer,
            reward_funcs=[task.reward],
            train_dataset=Dataset.from_list(task.train),
        ).train()
    finally:
        trainer_module._SDPOMixin._teacher_hidden = original
    return len(seen), sum(p for p, _ in seen), sum(r for _, r in seen)


def one_call_per_step(repeats: int = 7) -> tuple[float, float]:
    """Median seconds: the teacher pass per micro-batch (two calls), and both micro-batches in one call."""
    from transformers import DynamicCache

    from sdpo_unsloth.embedded import load_embedded

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, _ = load_embedded()
    decoder = model.get_decoder()
    decoder.eval()
    generator = torch.Generator().manual_seed(0)

    def rows(prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randint(100, 40000, (prompts, 72), generator=generator),
            torch.randint(100, 40000, (4 * prompts, 8), generator=generator),
        )

    def shared_pass(prompt: torch.Tensor, completion: torch.Tensor) -> None:
        cache = DynamicCache(config=decoder.config)
        decoder(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, use_cache=True
        )
        cache.batch_select_indices(torch.arange(prompt.size(0)).repeat_interleave(4))
        mask = torch.ones(completion.size(0), prompt.size(1) + completion.size(1), dtype=torch.long)
        decoder(input_ids=completion, attention_mask=mask, past_key_values=cache, use_cache=True)

    one, two = rows(1), rows(2)
    runs = {"micro": lambda: (shared_pass(*one), shared_pass(*one)), "step": lambda: shared_pass(*two)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["micro"]), statistics.median(times["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="SDPO steps on the code task (padding count)")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    forwards, padded, real = padding_on_code(args.steps)
    micro, step = one_call_per_step()
    waste = 1 - real / padded
    text = "\n".join([
        "## Cheaper teacher: options measured before building them (CPU)",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/investigations/teacher_options.py --steps {args.steps} --write` on "
        f"{date.today()}, torch {torch.__version__}, 1 thread, embedded SmolLM2-135M-Instruct.",
        "",
        f"- **Rows batched by length** (code task, per-sample feedback, {args.steps} pure-SDPO steps, "
        f"{forwards} teacher forwards): {padded} padded prompt tokens for {real} real ones, "
        f"**{100 * waste:.0f}% padding**. Grouping rows by length could save at most that share of the "
        "teacher's prompt work, minus the extra calls: not built.",
        f"- **One teacher call per optimizer step** (the two micro-batches of a step together, each as the shared "
        f"pass runs it): {1000 * micro:.0f} ms as two calls, {1000 * step:.0f} ms as one, "
        f"**{100 * (1 - step / micro):.0f}% of the teacher forward** saved at this size. It would move the "
        "teacher forward into generation (where TRL splits the step's batch), be exact only while one generation "
        "batch serves one optimizer step, and hold the step's teacher hidden states until the last micro-batch: "
        "not built.",
        "- **Teacher positions outside the completion**: the teacher's head already runs on the completion "
        "positions only, and the decoder has to see the whole reprompt to attend to it.",
    ])  # fmt: skip
    print(text)
    if args.write:
        from common import write_section

        write_section("teacher-options", text)


if __name__ == "__main__":
    main()
