"""`sdpo_unsloth.train(...)` on 2 processes: `python -m torch.distributed.run --nproc_per_node 2
tests/multiprocess/train_worker.py MODEL_DIR OUT`. Writes OUT/result{rank}.json."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")

import sdpo_unsloth


class HasDigit:
    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        hits = [any(ch.isdigit() for ch in c[-1]["content"]) for c in completions]
        self.last_feedback = [
            "" if hit else f"The answer is {a}." for hit, a in zip(hits, answer, strict=True)
        ]
        return [float(hit) for hit in hits]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a in range(5)
        for b in range(5)
    ]
    result = sdpo_unsloth.train(
        model_dir,
        rows,
        HasDigit(),
        out,
        max_steps=2,
        num_generations=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_completion_length=6,
        learning_rate=5e-2,
        lora_r=4,
        eval_size=4,
        eval_batch_size=4,
        progress=False,
        export_formats=("lora",),
        preflight=False,
        seed=7,
    )
    rank = int(os.environ.get("RANK", "0"))
    fields = {"before": result.before, "after": result.after, "adapter_dir": result.adapter_dir}
    with open(os.path.join(out, f"result{rank}.json"), "w") as handle:
        json.dump(fields, handle)


if __name__ == "__main__":
    main()
