"""SDPO samples per second on 1 vs 2 CPU processes (torch.distributed.run, gloo), same global batch.

The embedded SmolLM2-135M-Instruct, one-digit additions with the demo's feedback reward, 8 completions
(2 prompts x 4 generations) of up to 16 tokens per optimizer step, GA 1, one thread per process. The
median step time over the measured steps (after one warm-up step) gives samples/s = 8 / median.

    python benchmarks/speed/multiprocess_throughput.py --steps 5 --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared `common` module
from common import CPU_RUN

GLOBAL_BATCH = 8
COMMAND = "python benchmarks/speed/multiprocess_throughput.py --steps 5 --write"


def worker(out: Path, steps: int) -> None:
    os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
    import sdpo_unsloth

    sdpo_unsloth.bootstrap()  # before transformers and trl
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = sdpo_unsloth.load_model("embedded", load_in_4bit=False, gradient_checkpointing=False)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer = sdpo_unsloth.SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=str(out / "run"),
            num_generations=4,
            per_device_train_batch_size=GLOBAL_BATCH // processes,
            gradient_accumulation_steps=1,
            max_completion_length=16,
            max_steps=steps + 1,
            learning_rate=1e-4,
            **CPU_RUN,
            seed=0,
            disable_tqdm=True,
        ),
        sdpo_config=sdpo_unsloth.SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[AdditionReward()],
        train_dataset=Dataset.from_list(addition_dataset(64, seed=0)),
    )
    trainer.add_callback(Clock())
    trainer.train()
    if trainer.accelerator.is_main_process:
        median = statistics.median(times[1:])
        result = {"processes": processes, "median_step_s": median, "samples_per_s": GLOBAL_BATCH / median}
        (out / f"p{processes}.json").write_text(json.dumps(result))
    torch.distributed.barrier() if processes > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", SDPO_UNSLOTH_BACKEND="transformers", HF_HUB_OFFLINE="1")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
            command += [__file__, "--worker", tmp, "--steps", str(args.steps)]
            subprocess.run(command, env=env, check=True)
            results.append(json.loads((Path(tmp) / f"p{processes}.json").read_text()))
    rows = [
        "| processes | per-process batch | median step (s) | samples/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['processes']} | {GLOBAL_BATCH // r['processes']} | {r['median_step_s']:.2f} | "
            f"{r['samples_per_s']:.2f} | {r['samples_per_s'] / results[0]['samples_per_s']:.2f}x |"
        )
    table = "\n".join(rows)
    print(table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from common import write_section

        write_section(
            "multiprocess",
            f"Command: `{COMMAND}` (2-core CPU machine, one thread per process, gloo; embedded model, "
            f"global batch {GLOBAL_BATCH}, {args.steps} measured steps after one warm-up).\n\n{table}",
        )


if __name__ == "__main__":
    main()
