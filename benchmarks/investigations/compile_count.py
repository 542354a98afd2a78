"""How often torch.compile recompiles the decoder blocks during GRPO and SDPO steps (CPU, tiny model).

    OMP_NUM_THREADS=1 python benchmarks/investigations/compile_count.py --steps 8 [--write]

unsloth compiles each decoder block as one region, only in training mode (eval and generation with a KV
cache stay eager), and marks the sequence and batch dimensions of the block's inputs dynamic before each
call. A region is then recompiled whenever another of its guards fails: a new grad mode, a hidden state
that did or did not require grad, an attention mask given where it was None (transformers drops the mask
of a batch without padding) or the reverse. SDPO adds a teacher forward (no_grad, the teacher adapter
active), so it can add recompiles; what matters for step time is whether they stop after the first steps
or recur. This emulates that on the transformers backend, with the GPU benchmark's data (`gpu_step.py`:
its prompts, completions forced to full length, its always-wrong reward with feedback): each decoder
layer goes through `torch.compile` with a backend that only counts, and the cumulative number of compiled
graphs is recorded after every optimizer step, with the guards that failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import tempfile
from collections import Counter
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared `common` module
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))  # gpu_step: the data it emulates

import torch


def _mark_dynamic(hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """unsloth's marking: every input dimension equal to the sequence length (a float tensor's last dimension
    excepted: it is a width) and the batch dimension become dynamic before the block is called."""
    batch, length = hidden_states.shape[:2]
    stack = [hidden_states, *args, *kwargs.values()]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list | tuple):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, torch.Tensor):
            last = obj.dim() - 1 if obj.dim() == 3 and obj.is_floating_point() else None
            for dim, size in enumerate(obj.shape):
                if size == length and dim != last:
                    torch._dynamo.maybe_mark_dynamic(obj, dim)
            if batch > 1 and obj.dim() >= 2 and obj.shape[0] == batch:
                torch._dynamo.maybe_mark_dynamic(obj, 0)


class SomeFeedback:
    """Scores every completion 0.0; feedback for completions of even length only, so the number of teacher rows
    per micro-batch varies (1 to 4) as in a real run."""

    __name__ = "some_feedback"

    def __init__(self) -> None:
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        self.last_feedback = [
            "" if len(t) % 2 else "Wrong: the result must be a single integer." for t in texts
        ]
        return [0.0] * len(completions)


RUNS = {  # name -> (SDPO on, SDPOTrainer.stable_shapes)
    "GRPO": (False, True),
    "SDPO, stable_shapes off (before)": (True, False),
    "SDPO": (True, True),
}
DATA = {
    "full": "every completion full length (12 tokens), every sample a teacher (gpu_step.py's worst case)",
    "varied": "completions of natural length (up to 12 tokens), a teacher for about half the samples",
}


def compile_counts(
    enabled: bool, steps: int, stable: bool = True, data: str = "full"
) -> tuple[list[int], list[tuple[int, list[str]]]]:
    """Cumulative compiled graphs after each optimizer step, and each recompile as (step, failed guards)."""
    import torch._dynamo
    from gpu_step import FeedbackReward, ensure_model_dir, listen_to_recompiles, make_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 256  # count every recompile instead of falling back to eager
    torch._dynamo.config.accumulated_recompile_limit = 4096
    graphs: list[int] = []
    per_step: list[int] = []
    recompiles: list[tuple[int, list[str]]] = []

    listen_to_recompiles(lambda where, guards: recompiles.append((len(per_step) + 1, guards)))

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    sdpo_config = SDPOConfig(enabled=enabled)
    model_dir, _ = ensure_model_dir("tiny", os.path.join(tempfile.gettempdir(), "compile_count_models"))
    model, tokenizer = load_model(  # gpu_step's tiny stage: its model, tokenizer, chat template and LoRA
        model_dir,
        load_in_4bit=False,
        dtype="fp32",
        lora_r=16,
        teacher_adapter=sdpo_config.teacher_adapter_name if enabled else None,
        gradient_checkpointing=False,
        backend="transformers",
    )
    completion_tokens = 12
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=os.path.join(tempfile.gettempdir(), "compile_count"),
            num_generations=4,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_completion_length=completion_tokens,
            # "full", as gpu_step: every completion full length
            generation_kwargs={"min_new_tokens": completion_tokens} if data == "full" else None,
            max_steps=steps,
            learning_rate=5e-6,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            gradient_checkpointing=False,
            seed=0,
        ),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[FeedbackReward() if data == "full" else SomeFeedback()],
        train_dataset=make_dataset(),
    )
    trainer.stable_shapes = stable
    for layer in trainer.model.get_base_model().model.layers:
        eager = layer.forward
        compiled = torch.compile(eager, backend=counting_backend)

        def forward(hidden_states, *args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            if not _layer.training or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
                return _eager(hidden_states, *args, **kwargs)
            if hidden_states.dim() == 3 and hidden_states.shape[1] > 1:
                _mark_dynamic(hidden_states, args, kwargs)
            return _compiled(hidden_states, *args, **kwargs)

        layer.forward = forward

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(len(graphs))

    trainer.add_callback(Count())
    trainer.train()
    return per_step, recompiles


def kind_of(reason: str) -> str:
    """A recompile reason (one failed guard) in a few words."""
    if "grad_mode" in reason:
        return "grad mode"
    if "requires_grad mismatch" in reason:
        return "requires_grad"
    if "size mismatch" in reason:
        return "sequence length"
    if "adapter" in reason:
        return "active adapter"
    if "NoneType" in reason or "type of" in reason or " is None" in reason:
        return "attention mask given / absent"
    return re.sub(r"^\d+/\d+: ", "", reason)[:60]


def last_new_graph(counts: list[int]) -> int:
    return max((i + 1 for i in range(len(counts)) if counts[i] > (counts[i - 1] if i else 0)), default=0)


def guards_by_step(recompiles: list[tuple[int, list[str]]]) -> str:
    """`step N: kind, kind` for each step with recompiles: the kinds of guard that failed there."""
    steps: dict[int, Counter] = {}
    for step, guards in recompiles:
        steps.setdefault(step, Counter()).update(kind_of(guard) for guard in guards)
    return "; ".join(f"step {step}: " + ", ".join(sorted(kinds)) for step, kinds in sorted(steps.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, late = [], {}
    for data in DATA:
        for name, (enabled, stable) in RUNS.items():
            counts, recompiles = compile_counts(enabled, args.steps, stable, data)
            new = [counts[0]] + [b - a for a, b in itertools.pairwise(counts)]
            where = guards_by_step(recompiles)
            late[(data, name)] = last_new_graph(counts)
            rows.append(f"| {data} | {name} | {', '.join(map(str, new))} | {late[(data, name)]} | {where} |")
            print(
                f"{data} / {name}: new graphs per step {new}; last new graph at step {late[(data, name)]}; {where}"
            )
    if args.write:
        from common import write_section

        after = max(late[(data, "SDPO")] for data in DATA)
        before = max(late[(data, "SDPO, stable_shapes off (before)")] for data in DATA)
        lines = [
            f"## Recompiles of the decoder blocks: GRPO vs SDPO (CPU emulation, measured {date.today()})",
            "",
            "Each decoder layer compiled as one region in training mode, its inputs' sequence and batch dimensions",
            "marked dynamic before each call, as unsloth does, with a counting backend; generation stays eager.",
            "`gpu_step.py`'s tiny model (Qwen2, random weights, LoRA r16) and prompts; 4 generations x 12 tokens,",
            f"batch 4, GA 2, {args.steps} steps. Data: "
            + "; ".join(f"**{k}**: {v}" for k, v in DATA.items())
            + ".",
            "",
            "| data | run | new compiled graphs at step 1, 2, ... | last new graph at step | kinds of failed guard at each recompile |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "The blocks keep a graph per guard combination: a hidden state that does or does not require grad (the",
            "first layer's input comes from the frozen embeddings), for SDPO the grad mode (the teacher forward runs",
            "under no_grad), whether an attention mask is passed (transformers drops the mask of a batch without",
            "padding), and a batch of one row (torch.compile specialises size 1 even on a dynamic dimension). Before",
            f"`SDPOTrainer.stable_shapes` (on by default) SDPO compiled new graphs up to step {before}: the first",
            "micro-batch with padding, or the first with a single teacher row - the step and kind of recompile",
            "measured on the H200 with unsloth (section \"GPU\": SDPO's third step took 40-57 s). With it, SDPO's own",
            "forwards always pass a mask (a micro-batch without padding gets one masked pad column) and never a",
            f"single row (it is run as two), and its last new graph came at step {after}. GRPO's rows show the",
            "emulated TRL loss, not unsloth's own GRPO loss (which does not run the blocks this way). A counting",
            "backend says which graphs are compiled, not how long each takes; the GPU check is still to be run.",
            "",
            f"Reproduce: `OMP_NUM_THREADS=1 python benchmarks/investigations/compile_count.py --steps {args.steps} --write`",
        ]
        write_section("compile-count", "\n".join(lines))


if __name__ == "__main__":
    main()
