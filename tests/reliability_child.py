"""Child side of tests/test_reliability.py: one `sdpo-unsloth train` run in a forked process.

The test starts a multiprocessing forkserver that imports this module (and so the trainer) once; each
run is a fresh fork of it that calls `sdpo_unsloth.cli.main(argv)` with its output in a log file, and
can be killed with SIGKILL. Besides the library's own fault point (`save`, inside a checkpoint write),
two points are added here with hooks on the loaded model, counted per call in this process:

    generate:N  the 3rd model forward inside the N-th `generate` call (mid-sampling)
    backward:N  the gradient of a LoRA weight during the N-th backward pass
"""

from __future__ import annotations

import json
import os
import sys
import time

import sdpo_unsloth.trainer  # noqa: F401  (preloaded in the forkserver: each fork starts warm)
from sdpo_unsloth import model as model_module
from sdpo_unsloth.faults import fault_point

SLEEP_ENV = "RELIABILITY_REWARD_SLEEP"


class HasDigit:
    """1.0 when the completion contains a digit; feedback names the answer otherwise.

    `$RELIABILITY_REWARD_SLEEP=S[:N]` makes it sleep S seconds per call from its N-th call on (default
    the 1st): a slow or hanging reward whose scores are unchanged.
    """

    def __init__(self):
        self.last_feedback: list[str] = []
        self.calls = 0

    def __call__(self, prompts, completions, answer, **kwargs):
        self.calls += 1
        seconds, _, first = os.environ.get(SLEEP_ENV, "0").partition(":")
        if self.calls >= int(first or 1):
            time.sleep(float(seconds))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        hits = [any(ch.isdigit() for ch in t) for t in texts]
        self.last_feedback = [
            "" if hit else f"The answer is {a}." for hit, a in zip(hits, answer, strict=True)
        ]
        return [float(hit) for hit in hits]


def _add_fault_hooks(peft_model) -> None:
    calls = {"generate": 0, "forward": 0, "backward": 0}
    generate = peft_model.generate

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        calls["forward"] = 0
        return generate(*args, **kwargs)

    def forward_hook(module, args, output):
        calls["forward"] += 1
        if calls["forward"] == 3:  # a few tokens into sampling
            fault_point("generate", calls["generate"])

    def grad_hook(grad):
        calls["backward"] += 1
        fault_point("backward", calls["backward"])
        return grad

    peft_model.generate = counting_generate
    peft_model.get_base_model().get_output_embeddings().register_forward_hook(forward_hook)
    lora = next(p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n)
    lora.register_hook(grad_hook)


def run_cli(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Target of the forked process: set `env`, send output to `log_path`, run the CLI, exit with its code."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    load_model = model_module.load_model

    def load_with_hooks(*args, **kwargs):
        peft_model, tokenizer = load_model(*args, **kwargs)
        _add_fault_hooks(peft_model)
        return peft_model, tokenizer

    model_module.load_model = load_with_hooks
    from sdpo_unsloth.cli import main

    start = time.monotonic()
    code = main(argv)
    print(json.dumps({"exit": code, "seconds": time.monotonic() - start}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
