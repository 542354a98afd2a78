"""Export the trained student: its LoRA adapter, a merged 16-bit model, or a GGUF file.

Three formats, each written to a fresh directory with `sdpo_export.json` (what was exported, from which
base, how it was checked, library versions) and a short `README.md` model card:

    lora          the student adapter only (`default`), with its trained `modules_to_save` copies (e.g.
                  `embed_tokens`) as PEFT saves them. The EMA teacher adapter (`sdpo_teacher`) is
                  training state and never leaves the checkpoints: the written tensors are checked to be
                  exactly the student's, with no teacher key.
    merged_16bit  the student LoRA merged into a reloaded copy of the base model, in the training compute
                  dtype (fp16/bf16 on a GPU, fp32 on CPU). The caller's model is never modified. A 4-bit
                  base is dequantised first (nf4 values, not the original weights): the merged model is what
                  was trained, up to rounding. Checked: on sampled layers, merged W == W + dW (DoRA:
                  m (W + dW) / ||W + dW|| per row) up to one rounding to the dtype; in fp32 also merged
                  logits == the unmerged adapter model's and the trained model's on a few fixed token
                  sequences (|diff| <= 1e-4 + 1e-4 |ref|); in 16-bit
                  the logit gap and top-1 agreement are recorded (rounding alone moves 16-bit logits by ~1);
                  no LoRA layer or tensor remains. A `modules_to_save` module is replaced by the student's
                  trained copy, as PEFT's `merge_and_unload` does (a tied output layer keeps the base
                  weights it used in training and is saved untied).
    gguf          the merged model as one llama.cpp file, written in Python (`exporter.gguf_writer`) for Llama- and
                  Qwen2-family models in q8_0 (default), f16, bf16 or f32, on any machine. Checked by loading
                  it back with transformers' GGUF reader: f32 logits equal the merged model's (1e-4), other
                  types pick the same next token on >= 90% of positions, and the tokenizer is compared on
                  sample texts. K-quants (q4_k_m, ...) go through unsloth's `save_pretrained_gguf` (unsloth
                  backend on a GPU runtime, which builds llama.cpp).

Rooms: `source` (what is exported, the output folder), `lora`, `merge`, `gguf` (+ `gguf_writer`, the file
format) and `checks` (everything verified before an export is installed).

Exporting is idempotent: files are written to a temporary sibling directory and swapped in, so exporting
twice to the same directory gives the same files. A non-empty directory that is not an export (no
`sdpo_export.json`) is never overwritten; an output folder that cannot be created or written is refused
before any work. An adapter that was never trained (every LoRA B zero) exports with a warning: the export
equals the base model.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import torch

from ..adapters import STUDENT_ADAPTER, TEACHER_ADAPTER
from .checks import LOGITS_ATOL, LOGITS_RTOL, _warn_if_untrained
from .gguf import _write_gguf
from .lora import _write_lora
from .merge import _write_merged
from .source import (
    METADATA_FILE,
    ExportError,
    _check_base_model,
    _install,
    _resolve_source,
    check_output_dir,
)

__all__ = [
    "FORMATS",
    "LOGITS_ATOL",
    "LOGITS_RTOL",
    "METADATA_FILE",
    "ExportError",
    "ExportResult",
    "check_output_dir",
    "export",
]

ExportFormat = Literal["lora", "merged_16bit", "gguf"]
FORMATS: tuple[str, ...] = ("lora", "merged_16bit", "gguf")


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote.

    Attributes:
        format: "lora", "merged_16bit" or "gguf".
        output_dir: the export directory.
        files: file names in it, sorted.
        base_model: the base model path or hub name the adapter belongs to.
        dtype: dtype of the merged weights ("float32", "bfloat16", ...); None for lora/gguf.
        verification: the checks that ran and their numbers (also in `sdpo_export.json`).
    """

    format: str
    output_dir: str
    files: tuple[str, ...]
    base_model: str | None
    dtype: str | None = None
    verification: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ source


# ------------------------------------------------------------------------------------------ output dir


# ------------------------------------------------------------------------------------------ formats


# ------------------------------------------------------------------------------------------ metadata


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("sdpo-unsloth", "torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _model_card(meta: dict[str, Any]) -> str:
    fmt, base = meta["format"], meta["base_model"]
    lora = meta["lora"]
    usage = {
        "lora": (
            "from peft import AutoPeftModelForCausalLM\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")'
        ),
        "merged_16bit": (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            'model = AutoModelForCausalLM.from_pretrained("<this directory>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")'
        ),
        "gguf": "llama-cli -m <this directory>/<file>.gguf",
    }[fmt]
    sdpo = meta.get("sdpo_config") or {}
    sdpo_line = (
        f"alpha={sdpo.get('alpha')}, top-K={sdpo.get('distillation_topk')}, teacher={sdpo.get('teacher_mode')} "
        f"(rate {sdpo.get('teacher_update_rate')})"
        if sdpo
        else "not recorded"
    )
    return (
        "---\n"
        f"base_model: {base}\n"
        f"library_name: {'peft' if fmt == 'lora' else 'transformers'}\n"
        "tags: [sdpo, sdpo-unsloth, self-distillation, lora]\n"
        "---\n\n"
        f"# {fmt} export of an SDPO-trained student\n\n"
        "Trained with sdpo_unsloth: Self-Distilled Policy Optimization (arXiv 2601.20802) on TRL's "
        "GRPOTrainer.\n\n"
        f"- Base model: `{base}`{' (trained on its 4-bit nf4 quantisation)' if meta.get('base_quantization') else ''}\n"
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, targets {lora.get('target_modules')}\n"
        f"- SDPO: {sdpo_line}\n"
        + (f"- Weights dtype: {meta['dtype']}\n" if meta.get("dtype") else "")
        + f"- Exported {meta['date']}; details in `{METADATA_FILE}`.\n\n"
        f"```python\n{usage}\n```\n"
    )


def _write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "README.md").write_text(_model_card(meta))
    meta = {**meta, "files": sorted([p.name for p in folder.iterdir()] + [METADATA_FILE])}
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


# ------------------------------------------------------------------------------------------ public


def export(
    model_or_dir: Any,
    output_dir: str | os.PathLike[str],
    *,
    format: ExportFormat = "lora",
    tokenizer: Any = None,
    base_model: str | None = None,
    verify: bool = True,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    sdpo_config: Any = None,
    teacher_adapter: str = TEACHER_ADAPTER,
    gguf_quantization: str = "q8_0",
) -> ExportResult:
    """Export the student model in one of `FORMATS`; the caller's model is left untouched.

    Args:
        model_or_dir: the trained PEFT model (from `sdpo_unsloth.load_model`), an `SDPOTrainer`, or a saved
            adapter directory (a `lora` export, `trainer.save_model()` output, or a `checkpoint-N`). Only a
            model or a `lora` export records that the base was trained in 4-bit; from other folders the merge
            uses the base's original weights.
        output_dir: a new or empty directory, or an earlier export (replaced).
        format: "lora" (student adapter only), "merged_16bit" (adapter merged into the base), or "gguf"
            (one llama.cpp file; see `gguf_quantization`).
        tokenizer: saved beside the weights; default: the adapter directory's, then the base model's.
        base_model: the base model's hub name or path; default: the adapter config's
            `base_model_name_or_path`. A merge whose local base path no longer exists (a new Colab session)
            is refused before any work, naming this argument (CLI `--base-model`).
        verify: check the result (teacher never leaks; merged logits match the adapter model's).
        dtype: merged weights' dtype; default the training compute dtype (fp32 on CPU).
        device: where to merge ("cuda" / "cpu"); default the model's device, else CPU.
        sdpo_config: recorded in `sdpo_export.json` (taken from an SDPOTrainer automatically).
        teacher_adapter: the teacher adapter's name, checked to be absent from the export.
        gguf_quantization: "q8_0" (default), "f16", "bf16" or "f32", written here for Llama/Qwen2-family
            models and checked by loading the file back; a k-quant such as "q4_k_m" goes through unsloth's
            `save_pretrained_gguf` (unsloth backend on a GPU runtime only).

    Returns:
        An `ExportResult` naming the directory, its files and the checks that ran.

    Raises:
        ExportError: unsupported input or format, a non-export directory in the way, or a failed check
            (nothing is written then).
    """
    if format not in FORMATS:
        raise ExportError(f"`format` must be one of {', '.join(FORMATS)}, got {format!r}.")
    output = Path(output_dir).expanduser().resolve()
    check_output_dir(output)
    source = _resolve_source(model_or_dir, tokenizer, base_model, sdpo_config)
    if format != "lora":
        _check_base_model(source.base_model, given=base_model is not None)
    _warn_if_untrained(source)
    teacher_names = tuple(dict.fromkeys((teacher_adapter, TEACHER_ADAPTER)))
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work-", dir=output.parent))
    merged_dtype: torch.dtype | None = None
    try:
        if format == "lora":
            checks = _write_lora(source, staging, teacher_names)
        elif format == "merged_16bit":
            checks, merged_dtype = _write_merged(
                source, staging, work, teacher_names, dtype=dtype, device=device, verify=verify
            )
        else:
            checks = _write_gguf(
                source, staging, work, teacher_names, gguf_quantization, device=device, verify=verify
            )
        meta = {
            "sdpo_unsloth_export": 1,
            "format": format,
            "base_model": source.base_model,
            "base_quantization": source.quantization,
            "dtype": str(merged_dtype).replace("torch.", "") if merged_dtype is not None else None,
            "lora": source.lora,
            "adapter": STUDENT_ADAPTER,
            "sdpo_config": source.sdpo_config,
            "verification": checks,
            "versions": _versions(),
            "date": datetime.date.today().isoformat(),
        }
        _write_metadata(staging, meta)
        _install(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(
        format=format,
        output_dir=str(output),
        files=tuple(sorted(p.name for p in output.iterdir())),
        base_model=source.base_model,
        dtype=meta["dtype"],
        verification=meta["verification"],
    )
