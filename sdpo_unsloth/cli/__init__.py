"""The `sdpo-unsloth` command line: train, demo, preflight, export, doctor.

Rooms: `flags` (train's flags derived from `sdpo_unsloth.api.train`, `--config` files), `parser` (the
subcommands and their options), `commands` (what each subcommand runs and prints); this module holds
`main`, the entry point, and its error policy.

User mistakes print one line to stderr and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from .commands import (
    DEMO_DATA_KEYS,
    PROG,
    cmd_demo,
    cmd_doctor,
    cmd_export,
    cmd_preflight,
    cmd_train,
    demo_settings,
    resume_command,
)
from .flags import UserError, _train_kwargs, train_parameters
from .parser import build_parser

__all__ = [
    "DEMO_DATA_KEYS",
    "PROG",
    "UserError",
    "_train_kwargs",
    "build_parser",
    "demo_settings",
    "main",
    "resume_command",
    "train_parameters",
]


def _user_mistakes() -> tuple[type[BaseException], ...]:
    from ..exporter import ExportError

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
