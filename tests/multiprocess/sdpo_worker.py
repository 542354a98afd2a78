"""One SDPO run on the tiny model, for `python -m torch.distributed.run --nproc_per_node N` (CPU, gloo).

Greedy decoding and SGD, so the same global batch gives the same update on 1 or N processes. The reward
succeeds only on the first sample of each prompt group (by its position in the global generation batch),
gives no feedback, so a sample has a teacher only if it sees that success: on 2 processes with 2 samples
each, the rows of rank 1 have a teacher only if the group is gathered across processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess/sdpo_worker.py OUT --batch 2
Writes OUT/rank{r}.pt: the student and teacher adapters and the last generation batch's masks and texts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny model

os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from datasets import Dataset
from trl import GRPOConfig

import sdpo_unsloth

GROUP = 4


class FirstOfGroup:
    __name__ = "first_of_group"

    def __call__(self, prompts, completions, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        offset = rank * len(completions)  # position in the global, process-major generation batch
        return [float((offset + i) % GROUP == 0) for i in range(len(completions))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume")
    parser.add_argument("--time-budget", type=float)
    args = parser.parse_args()
    out = Path(args.out)
    tokenizer = make_tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    trainer = sdpo_unsloth.SDPOTrainer(
        model=make_tiny_model(len(tokenizer), tied=False),  # tied: greedy repeats "\n", a blank answer
        args=GRPOConfig(
            output_dir=str(out / "run"),
            num_generations=GROUP,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_completion_length=5,
            max_steps=args.max_steps,
            learning_rate=0.5,
            optim="sgd",
            generation_kwargs={"do_sample": False},
            gradient_checkpointing=False,
            use_cpu=True,
            bf16=False,
            report_to=[],
            logging_steps=1,
            save_strategy="steps" if args.save_steps else "no",
            save_steps=args.save_steps or 500,
            seed=7,
            data_seed=7,
            disable_tqdm=True,
        ),
        sdpo_config=sdpo_unsloth.SDPOConfig(teacher_update_rate=0.5, time_budget=args.time_budget),
        processing_class=tokenizer,
        reward_funcs=[FirstOfGroup()],
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train(resume_from_checkpoint=args.resume)
    model = trainer.accelerator.unwrap_model(trainer.model)
    buffered = trainer._buffered_inputs
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "student": {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n},
            "teacher": {n: p.detach().clone() for n, p in model.named_parameters() if ".sdpo_teacher." in n},
            "sample_mask": torch.cat([b["sdpo_sample_mask"] for b in buffered]),
            "lengths": torch.cat([b["completion_mask"].sum(1) for b in buffered]),
            "logs": trainer.state.log_history,
            "global_step": trainer.state.global_step,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
