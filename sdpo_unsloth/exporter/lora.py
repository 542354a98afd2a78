"""The `lora` format: the student adapter only, checked tensor by tensor; the teacher never leaves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..adapters import STUDENT_ADAPTER
from .checks import _check_adapter_file
from .source import ADAPTER_FILE, _save_tokenizer, _Source


def _student_state(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=STUDENT_ADAPTER)
    return {k: v.detach().cpu() for k, v in state.items()}


def _write_lora(source: _Source, folder: Path, teacher_names: tuple[str, ...]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    if source.model is not None:
        source.model.save_pretrained(str(folder), selected_adapters=[STUDENT_ADAPTER])
        expected = _student_state(source.model)
    else:
        assert source.adapter_dir is not None
        for name in ("adapter_config.json", ADAPTER_FILE):
            shutil.copy2(source.adapter_dir / name, folder / name)
        expected = None
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's generic card; ours is written later
    _save_tokenizer(source.tokenizer, folder, source.adapter_dir)
    return _check_adapter_file(folder, teacher_names, expected)
