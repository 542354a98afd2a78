"""What to export and where: the adapter source (a PEFT model, a trainer or an adapter folder), the
output directory guard and swap, and the tokenizer files that travel with an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import STUDENT_ADAPTER
from ..preconditions import InputError, check_writable


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message says what to change."""


METADATA_FILE = "sdpo_export.json"


ADAPTER_FILE = "adapter_model.safetensors"


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


@dataclass
class _Source:
    """The adapter to export: an in-memory PEFT model, or a directory with adapter files."""

    model: Any | None
    adapter_dir: Path | None
    base_model: str | None
    tokenizer: Any | None
    sdpo_config: dict[str, Any] | None
    quantization: dict[str, Any] | None  # the training base's bitsandbytes config, if 4-bit
    lora: dict[str, Any]


def _lora_summary(config: Any) -> dict[str, Any]:
    targets = config.get("target_modules") if isinstance(config, dict) else config.target_modules
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return {
        "r": get("r"),
        "lora_alpha": get("lora_alpha"),
        "lora_dropout": get("lora_dropout"),
        "target_modules": sorted(targets) if isinstance(targets, list | set | tuple) else targets,
    }


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    return config.to_dict()


def _quantization_of(model: Any) -> dict[str, Any] | None:
    base = model.get_base_model()
    if not getattr(base, "is_loaded_in_4bit", False):
        if getattr(base, "is_loaded_in_8bit", False):
            raise ExportError("8-bit bases are not supported for export; train with load_in_4bit or 16-bit.")
        return None
    qc = getattr(base.config, "quantization_config", None)
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    data = json.loads(json.dumps(data, default=str))
    # unsloth's config can hold torch dtypes ("torch.float16" once serialised); BitsAndBytesConfig wants "float16"
    return {k: v.removeprefix("torch.") if isinstance(v, str) else v for k, v in data.items()}


def _resolve_source(model_or_dir: Any, tokenizer: Any, base_model: str | None, sdpo_config: Any) -> _Source:
    from peft import PeftModel

    if hasattr(model_or_dir, "accelerator") and hasattr(model_or_dir, "model"):  # a (SDPO)Trainer
        trainer = model_or_dir
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        sdpo_config = sdpo_config if sdpo_config is not None else getattr(trainer, "sdpo_config", None)
        model_or_dir = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model_or_dir, PeftModel):
        model = model_or_dir
        if STUDENT_ADAPTER not in model.peft_config:
            raise ExportError(
                f"the model has no student adapter '{STUDENT_ADAPTER}' (adapters: {list(model.peft_config)}); "
                "export the model returned by sdpo_unsloth.load_model / SDPOTrainer."
            )
        config = model.peft_config[STUDENT_ADAPTER]
        return _Source(
            model=model,
            adapter_dir=None,
            base_model=base_model or config.base_model_name_or_path,
            tokenizer=tokenizer,
            sdpo_config=_config_dict(sdpo_config),
            quantization=_quantization_of(model),
            lora=_lora_summary(config),
        )
    if isinstance(model_or_dir, str | os.PathLike):
        path = Path(model_or_dir)
        if not (path / "adapter_config.json").is_file():
            raise ExportError(
                f"{path} is not a LoRA adapter directory (no adapter_config.json). Pass the adapter directory "
                "written by train()/export(format='lora'), a checkpoint-N directory, or the PEFT model itself."
            )
        if not (path / ADAPTER_FILE).is_file():
            raise ExportError(
                f"{path} has no {ADAPTER_FILE}; re-save the adapter with safe_serialization=True."
            )
        config = json.loads((path / "adapter_config.json").read_text())
        previous = _read_metadata(path) or {}
        return _Source(
            model=None,
            adapter_dir=path,
            base_model=base_model or config.get("base_model_name_or_path") or previous.get("base_model"),
            tokenizer=tokenizer,
            sdpo_config=_config_dict(sdpo_config) or previous.get("sdpo_config"),
            quantization=previous.get("base_quantization"),
            lora=_lora_summary(config),
        )
    raise ExportError(
        f"cannot export a {type(model_or_dir).__name__}: pass a PEFT model (from sdpo_unsloth.load_model), an "
        "SDPOTrainer, or the path of a saved LoRA adapter directory."
    )


def _check_base_model(base_model: str | None, *, given: bool) -> None:
    """A merge needs the base: refuse a missing one, or a local path that no longer exists (a hub name of the
    form `org/name` is left to the loader), before any work."""
    if not base_model:
        raise ExportError(
            "the adapter does not name its base model; pass base_model='<hub name or local path>' "
            "(CLI: --base-model)."
        )
    path = Path(base_model).expanduser()
    local = path.is_absolute() or base_model.startswith((".", "~")) or base_model.count("/") > 1
    if local and not path.exists():
        where = "`base_model`" if given else "the base model recorded in adapter_config.json"
        raise ExportError(
            f"{where} ({base_model}) was not found: merging needs it. Pass base_model='<hub name or local path>' "
            "(CLI: --base-model) naming the same model that was trained, e.g. after a new Colab session the "
            "hub name or its new download folder."
        )


def _read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_output_dir(output_dir: Path) -> None:
    """Raise `ExportError` if `output_dir` is a file, a non-empty folder that is not an earlier export, or a
    folder that cannot be created or written (its parent is a file, or read-only)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir} is a file; choose a directory for the export.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / METADATA_FILE).is_file():
        raise ExportError(
            f"{output_dir} is not empty and is not an sdpo_unsloth export (no {METADATA_FILE}); refusing to "
            "overwrite it. Choose a new or empty directory, or delete this one first."
        )
    # the export is staged beside `output_dir` and swapped in, so an existing one's parent must take new folders
    target = output_dir.parent if output_dir.exists() else output_dir
    try:
        check_writable(target, "output_dir")
    except InputError as exc:
        raise ExportError(
            str(exc) if target == output_dir else f"cannot replace {output_dir}: {exc}"
        ) from None


def _install(staging: Path, output_dir: Path) -> None:
    """Swap the finished staging directory in for `output_dir` (an earlier export is replaced)."""
    check_output_dir(output_dir)
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / "export")
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_tokenizer(tokenizer: Any, folder: Path, *fallbacks: str | Path | None) -> bool:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        return True
    for candidate in fallbacks:
        if candidate is None:
            continue
        candidate = Path(candidate)
        if candidate.is_dir() and (candidate / "tokenizer_config.json").is_file():
            for name in _TOKENIZER_FILES:
                if (candidate / name).is_file():
                    shutil.copy2(candidate / name, folder / name)
            return True
    return False


def _load_tokenizer(*candidates: str | Path | None) -> Any:
    """The first tokenizer that loads from `candidates` (local directories or cached hub names), or None."""
    from transformers import AutoTokenizer

    for candidate in candidates:
        if candidate is None:
            continue
        if Path(candidate).is_dir() and not (Path(candidate) / "tokenizer_config.json").is_file():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except (OSError, ValueError):
            continue
    return None
