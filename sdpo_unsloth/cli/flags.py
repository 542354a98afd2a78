"""`train`'s flags, derived from `sdpo_unsloth.api.train`'s signature and docstring so the two never drift
apart: bools become --x/--no-x, sequences take comma lists, Literal types become choices, and
`--config file.yaml|json` supplies any of them (plus `sdpo_config:` / `grpo_config:` mappings).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


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
            "comma list of built-in rewards (addition, code, humaneval, gym:<task>) or module:function / "
            "file.py:function (a class is instantiated); default: the built-in task's reward"
        )
        parser.add_argument(flag, type=_comma_list(), metavar="NAMES", **options)
        return True
    if name == "dataset":
        options["help"] = (
            "a built-in task (addition, code, humaneval, gym:<task>?key=value&...), or a "
            ".json/.jsonl/.csv/.parquet file or save_to_disk folder with a 'prompt' column; other columns go "
            "to the rewards (default: addition)"
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
    from .. import api

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


def _expected(hint: Any) -> str:
    """How a config value of type `hint` is written, for an error message."""
    hints, optional = _split_union(hint)
    plain = [h for h in hints if typing.get_origin(h) is not Literal]
    words = [repr(v) for v in _literal_values(hints)]
    kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    names = [kinds.get(h, "a list") for h in plain if h in kinds or typing.get_origin(h)] + (
        [f"one of {', '.join(words)}"] if words else []
    )
    names += ["null"] if optional else []
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _config_value(name: str, hint: Any, value: Any, source: str) -> Any:
    """`value` from a config file as the type `hint` says (YAML reads 2e-4 as the string '2e-4')."""
    hints, optional = _split_union(hint)
    plain = [h for h in hints if typing.get_origin(h) is not Literal]
    literals = _literal_values(hints)
    if value is None and optional:
        return None
    if isinstance(value, bool):
        if bool in plain:
            return value
    elif value in literals:
        return value
    elif int in plain and (
        isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value))
    ):
        return int(value)
    elif float in plain and isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            if str not in plain:  # a duration such as 11h30m is a string
                raise UserError(
                    f"`{name}` in {source} must be a number (e.g. 2.0e-4), got {value!r}."
                ) from None
    if str in plain and isinstance(value, str):
        return value
    sequence = next(
        (h for h in plain if typing.get_origin(h) in (list, tuple, typing.get_origin(Sequence[str]))), None
    )
    if sequence is not None and isinstance(value, str | list | tuple):
        inner = _literal_values(list(typing.get_args(sequence)))
        items = tuple(
            _comma_list()(value) if isinstance(value, str) else value
        )  # "a,b" as on the command line
        bad = [item for item in items if inner and item not in inner]
        if bad:
            raise UserError(f"`{name}` in {source} may hold {', '.join(map(str, inner))}; got {bad}.")
        return items
    if any(h not in (int, float, str, bool, sequence) for h in plain):
        return value  # objects (a Dataset, callables) pass through to train(), which checks them
    raise UserError(f"`{name}` in {source} must be {_expected(hint)}, got {value!r}.")


def _config_values(values: dict[str, Any], hints: dict[str, Any], source: str) -> dict[str, Any]:
    return {k: _config_value(k, hints[k], v, source) if k in hints else v for k, v in values.items()}


def _train_kwargs(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    from .. import api

    valid = set(inspect.signature(api.train).parameters)
    kwargs = _read_config(args.config) if args.config else {}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise UserError(
            f"unknown setting(s) {', '.join(unknown)} in {args.config}; valid: {', '.join(sorted(valid))}."
        )
    kwargs = _config_values(kwargs, {name: hint for name, hint, _ in train_parameters()}, args.config)
    if isinstance(kwargs.get("sdpo_config"), dict):
        from ..config import SDPOConfig

        hints = typing.get_type_hints(SDPOConfig)
        source = f"{args.config} (sdpo_config)"
        try:
            kwargs["sdpo_config"] = SDPOConfig(**_config_values(kwargs["sdpo_config"], hints, source))
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
