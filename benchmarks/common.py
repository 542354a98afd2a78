"""What the benchmark scripts share: the CPU run settings, the settings, prompts and reward of the step-time runs,
the optimizer settings of the learning runs, and `write_section`, which writes one benchmark's section of docs/benchmarks.md between its markers.

Scripts in the folders below import it after `sys.path.insert(0, <benchmarks/>)`; it imports nothing heavy,
so sdpo-rl's venv (vs_sdpo_rl/) can import it too.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

# GRPOConfig settings of every CPU benchmark run: fp32, no checkpointing, no checkpoints, no reports.
CPU_RUN = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": [],
    "save_strategy": "no",
}

# The step-time runs (speed/step_time.py, vs_sdpo_rl/throughput.py): 4 completions per micro-batch from 4
# generations per prompt, GA 2, lr 1e-4, temperature 1, nothing logged during the timed steps.
STEP_TIME_RUN = {
    **CPU_RUN,
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-4,
    "temperature": 1.0,
    "seed": 0,
    "disable_tqdm": True,
    "logging_steps": 1000,
}

# The learning runs (learning.py, learning/demo_tuning.py): AdamW as `train()` sets it up, logged every step.
LEARNING_RUN = {
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 1,
    "disable_tqdm": True,
}

# The step-time prompts: 100 one-digit additions as chat messages.
ADDITION_PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}]} for a in range(10) for b in range(10)
]


class AlwaysWrong:
    """Reward 0 with feedback for every completion: every SDPO sample gets a teacher (both protocols)."""

    __name__ = "always_wrong"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.last_feedback = ["Wrong. The answer is 7, not 5."] * len(completions)
        return [0.0] * len(completions)


class HalfGroupsSucceed:
    """Reward 1 for the first completion of every other prompt group (by position), 0 with feedback otherwise: half
    of the prompt groups have a reward spread (the per-group hybrid trains GRPO there, without a teacher)."""

    __name__ = "half_groups_succeed"

    def __init__(self, group_size: int = STEP_TIME_RUN["num_generations"]):
        self.group_size = group_size
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = [1.0 if i % (2 * self.group_size) == 0 else 0.0 for i in range(len(completions))]
        self.last_feedback = ["Right." if r else "Wrong. The answer is 7, not 5." for r in rewards]
        return rewards


def write_section(name: str, text: str, append_row: str | None = None, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` of `doc` (docs/benchmarks.md by
    default; appended if absent).

    With `append_row` (a line of `text`'s table), the section becomes `text`, and the rows of the old table that
    have the same columns and another first cell (other models measured by earlier runs) are kept before it.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = doc.read_text() if doc.exists() else "# Benchmarks\n"
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), content, flags=re.DOTALL)
    if match and append_row:
        key, columns = append_row.split("|")[1], append_row.count("|")
        ours = set(text.splitlines())
        kept = [
            line
            for line in match.group(1).splitlines()
            if line.startswith("|")
            and line.count("|") == columns
            and line.split("|")[1] != key
            and not set(line) <= set("|-: ")
            and line not in ours
        ]
        text = text.replace(append_row, "\n".join([*kept, append_row]), 1)
    block = f"{begin}\n{text}\n{end}"
    content = content.replace(match.group(0), block) if match else content.rstrip() + f"\n\n{block}\n"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(content)
