"""What each `sdpo-unsloth` subcommand does once its arguments are parsed (train, demo, preflight, export,
doctor), and the lines it prints.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..doctor import doctor
from .flags import _train_kwargs

PROG = "sdpo-unsloth"


# Demo settings that choose the data (and the tail), not arguments of train().
DEMO_DATA_KEYS = ("tail", "train_size", "train_seed", "held_size", "held_seed")


def demo_settings() -> dict[str, Any]:
    """The demo's settings: `sdpo_unsloth.tasks.addition.DEMO_SETTINGS` as a dict (one source of truth)."""
    from ..tasks.addition import DEMO_SETTINGS

    return dict(DEMO_SETTINGS)


def _print_result(result: Any, score_name: str, count: int | None = None) -> None:
    def show(value: float | None) -> str:
        if value is None:
            return "not measured"
        if score_name != "accuracy":
            return f"{value:.3f}"
        return f"{value:.1%}" + (f" ({round(value * count)}/{count})" if count else "")

    print(f"held-out {score_name} before: {show(result.before)}")
    print(f"held-out {score_name} after:  {show(result.after)}")
    for label, path in (
        ("adapter", result.adapter_dir),
        ("merged model", result.merged_dir),
        ("gguf", result.gguf_file),
        ("reward curve", result.reward_curve_png),
    ):
        if path:
            print(f"{label + ':':14s}{path}")
    print(f"{'summary:':14s}{Path(result.output_dir) / 'train_result.json'}")


def resume_command(argv: Sequence[str]) -> str:
    """The `train` command line `argv` with `--resume` (any earlier --resume [PATH] dropped).

    >>> resume_command(["train", "--max-steps", "9", "--resume", "ck/checkpoint-2", "--time-budget", "1h"])
    'sdpo-unsloth train --max-steps 9 --time-budget 1h --resume'
    """
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            if not token.startswith("-"):
                continue
        if token == "--resume":
            skip = True
            continue
        if token.startswith("--resume="):
            continue
        kept.append(token)
    return shlex.join([PROG, *kept, "--resume"])


def cmd_train(args: argparse.Namespace, names: list[str]) -> int:
    from ..api import train

    result = train(**_train_kwargs(args, names))
    _print_result(result, "reward")
    if result.stopped_early:
        print(f"stopped early: {result.stopped_early}")
        print(f"to resume: {resume_command(getattr(args, 'argv', ['train']))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..api import train
    from ..bootstrap import bootstrap
    from ..config import SDPOConfig
    from ..preconditions import UsageError
    from ..tasks.addition import addition_dataset

    settings = demo_settings()
    overrides = {
        "max_steps": args.max_steps,
        "held_size": args.eval_size,
        "learning_rate": args.learning_rate,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.seed is not None:
        settings["seed"] = args.seed
    if settings["held_size"] < 0:
        raise UsageError(f"--eval-size {settings['held_size']}: give 0 (no held-out score) or more problems.")
    held = (
        addition_dataset(settings["held_size"], seed=settings["held_seed"]) if settings["held_size"] else []
    )
    train_rows = addition_dataset(settings["train_size"], seed=settings["train_seed"], exclude=held)
    knobs = {k: v for k, v in settings.items() if k not in DEMO_DATA_KEYS}
    model = knobs.pop("model", "embedded")
    steps = settings["max_steps"]
    scored = (
        f"scored on {len(held)} held-out problems by greedy decoding"
        if held
        else "not scored (--eval-size 0)"
    )
    print(
        f"SDPO demo: SmolLM2-135M-Instruct (embedded, no download) trained on one-digit addition on "
        f"{bootstrap().device}: {steps} step{'s' if steps != 1 else ''} over {len(train_rows)} problems, "
        f"{settings['num_generations']} samples each, {scored}."
    )
    result = train(
        model,
        train_rows,
        "addition",
        output_dir=args.output_dir,
        eval_dataset=held or None,
        eval_size=None if held else 0,
        export_formats=("lora",) if args.no_merge else ("lora", "merged_16bit"),
        progress=not args.quiet,
        sdpo_config=SDPOConfig(distillation_add_tail=settings.get("tail", True)),
        **knobs,
    )
    _print_result(result, "accuracy", len(held))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Print the preflight report; exit status 1 when there is nothing to learn from."""
    from ..preflight import preflight

    rewards = list(args.rewards) if args.rewards else None
    report = preflight(
        args.model,
        args.dataset,
        rewards,
        num_prompts=args.num_prompts,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        seed=args.seed,
        lora_r=args.lora_r,
        backend=args.backend,
    )
    print(report.summary())
    return 1 if report.nothing_to_learn else 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..exporter import export

    result = export(
        args.source,
        args.output_dir,
        format=args.format,
        base_model=args.base_model,
        verify=not args.no_verify,
        dtype=args.dtype,
        gguf_quantization=args.gguf_quantization,
    )
    print(f"{result.format} export written to {result.output_dir}")
    for name, check in result.verification.items():
        print(f"  check {name}: {check}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    print(
        doctor(
            model=args.model,
            dtype=args.dtype,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_generations=args.num_generations,
            prompt_length=args.prompt_length,
            max_completion_length=args.max_completion_length,
            lora_r=args.lora_r,
            load_in_4bit=args.load_in_4bit,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    )
    return 0
