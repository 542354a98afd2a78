"""The `gguf` format: the merged model written as one llama.cpp file by `gguf_writer` (q8_0, f16, bf16,
f32) and read back to check it; k-quants go through unsloth's `save_pretrained_gguf`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..bootstrap import bootstrap, current_backend
from . import gguf_writer
from .checks import _check_gguf
from .lora import _write_lora
from .merge import _write_merged
from .source import ExportError, _Source


def _write_gguf(
    source: _Source,
    folder: Path,
    work: Path,
    teacher_names: tuple[str, ...],
    method: str,
    *,
    device: str | None,
    verify: bool,
) -> dict[str, Any]:

    method = method.lower()
    if method not in gguf_writer.QUANTIZATIONS:
        return _write_gguf_unsloth(source, folder, work, teacher_names, method)
    merged_dir = work / "merged"  # kept: the fp32 reference of the check is loaded from it
    name = Path(str(source.base_model or "model").rstrip("/")).name or "model"
    file = folder / f"{name}-sdpo-{method}.gguf"
    written: dict[str, Any] = {}

    def write(merged: Any) -> None:  # from the merged model in memory (its merge dtype), tensor by tensor
        try:
            written.update(gguf_writer.write_gguf(merged, source.tokenizer, file, method, f"{name} (SDPO)"))
        except gguf_writer.GGUFExportError as exc:
            raise ExportError(str(exc)) from None

    checks, _ = _write_merged(
        source,
        merged_dir,
        work,
        teacher_names,
        dtype=torch.float32 if method == "f32" else None,
        device=device,
        verify=verify,
        then=write,
    )
    checks["gguf"] = {**written, "file": file.name, "quantization": method, "bytes": file.stat().st_size}
    if verify:
        checks["gguf_vs_merged"] = _check_gguf(file, merged_dir, source.tokenizer, method)
    return checks


def _write_gguf_unsloth(
    source: _Source, folder: Path, work: Path, teacher_names: tuple[str, ...], method: str
) -> dict:

    backend = current_backend() or bootstrap()
    if backend.name != "unsloth":
        raise ExportError(
            f"GGUF {method!r} (a k-quant) needs llama.cpp's quantiser: this package writes "
            f"{', '.join(gguf_writer.QUANTIZATIONS)} itself (gguf_quantization='q8_0'), then `llama-quantize "
            f"model-q8_0.gguf model-{method}.gguf {method.upper()}` (better from f16). Or run the export with the "
            "unsloth backend on a GPU runtime, whose save_pretrained_gguf builds llama.cpp."
        )
    from unsloth import FastLanguageModel

    adapter_dir = source.adapter_dir
    if source.model is not None:
        adapter_dir = work / "adapter"
        _write_lora(source, adapter_dir, teacher_names)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), load_in_4bit=bool(source.quantization)
    )
    model.save_pretrained_gguf(str(folder), tokenizer, quantization_method=method)
    files = sorted(p.name for p in folder.rglob("*.gguf"))
    if not files:
        raise ExportError(f"unsloth's save_pretrained_gguf wrote no .gguf file into {folder}.")
    return {"gguf_files": files, "quantization_method": method, "writer": "unsloth save_pretrained_gguf"}
