"""The `merged_16bit` format: the student LoRA merged into a reloaded copy of the base (a 4-bit base is
dequantised first), checked against the adapter model and the trained model before it is saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapters import STUDENT_ADAPTER
from ..bootstrap import pick_dtype
from .checks import (
    LOGITS_ATOL,
    LOGITS_RTOL,
    _check_merged_weights,
    _expected_merges,
    _fixed_inputs,
    _logit_check,
    _logits,
    _model_logits_of_caller,
)
from .lora import _write_lora
from .source import ExportError, _load_tokenizer, _save_tokenizer, _Source


def _merge_dtype(source: _Source, dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is not None:
        return pick_dtype(device, dtype) if isinstance(dtype, str) else dtype
    if source.model is not None:
        if source.quantization:
            name = str(source.quantization.get("bnb_4bit_compute_dtype", "float32"))
            return getattr(torch, name.replace("torch.", ""), torch.float32)
        return next(p for p in source.model.get_base_model().parameters() if p.is_floating_point()).dtype
    return pick_dtype(device, None)


def _write_merged(
    source: _Source,
    folder: Path,
    work: Path,
    teacher_names: tuple[str, ...],
    *,
    dtype: torch.dtype | str | None,
    device: str | None,
    verify: bool,
    then: Callable[[Any], None] | None = None,
) -> tuple[dict[str, Any], torch.dtype]:
    """Merge the student into the base and save it to `folder`; `then(merged)` runs before it is freed."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    assert source.base_model, "export() checks the base model first (_check_base_model)"
    adapter_dir = source.adapter_dir
    checks: dict[str, Any] = {}
    if source.model is not None:
        adapter_dir = work / "adapter"
        checks["adapter"] = _write_lora(source, adapter_dir, teacher_names)
    assert adapter_dir is not None
    if device is None:
        caller = next(source.model.parameters()).device if source.model is not None else None
        on_gpu = caller.type == "cuda" if caller is not None else torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
    merge_dtype = _merge_dtype(source, dtype, device)
    if source.tokenizer is None:
        source.tokenizer = _load_tokenizer(adapter_dir, source.base_model)

    kwargs: dict[str, Any] = {"dtype": merge_dtype}
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    base_config = AutoConfig.from_pretrained(source.base_model)
    quantized = bool(source.quantization) or getattr(base_config, "quantization_config", None) is not None
    if source.quantization and getattr(base_config, "quantization_config", None) is None:
        settings = {k: v for k, v in source.quantization.items() if not k.startswith("_")}
        settings.pop("quant_method", None)
        kwargs["quantization_config"] = BitsAndBytesConfig(**settings)
    base = AutoModelForCausalLM.from_pretrained(source.base_model, **kwargs)
    if quantized:
        warnings.warn(
            "the base was trained in 4-bit: merging into its dequantised nf4 weights in "
            f"{str(merge_dtype).replace('torch.', '')}. The merged model matches the trained one up to rounding, and "
            "keeps the 4-bit quantisation error of the base weights.",
            stacklevel=3,
        )
        base = base.dequantize()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=STUDENT_ADAPTER)
    run_device = next(peft_model.parameters()).device
    inputs = _fixed_inputs(source.tokenizer, base_config.get_text_config().vocab_size)
    expected = _expected_merges(peft_model) if verify else {}
    reference = _logits(peft_model, inputs, run_device) if verify else None
    merged = peft_model.merge_and_unload()
    leftover = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    leftover += [name for name, _ in merged.named_parameters() if "lora_" in name]
    if leftover:
        raise ExportError(f"LoRA layers remain after merging: {leftover[:3]}")
    if verify:
        assert reference is not None
        checks["merged_weights"] = _check_merged_weights(merged, expected, merge_dtype)
        merged_logits = _logits(merged, inputs, run_device)
        exact = merge_dtype == torch.float32
        checks["merged_vs_adapter"] = _logit_check(merged_logits, reference, strict=exact)
        if exact and not checks["merged_vs_adapter"]["passed"]:
            raise ExportError(
                f"merged logits differ from the adapter model's by up to "
                f"{checks['merged_vs_adapter']['max_abs_diff']:.3g} (allowed {LOGITS_ATOL} + {LOGITS_RTOL}|ref| in "
                "float32): the merge is wrong. Nothing was written."
            )
        if source.model is not None:
            trained = _model_logits_of_caller(source.model, inputs)
            check = _logit_check(merged_logits, trained, strict=exact and not quantized)
            checks["merged_vs_trained_model"] = {**check, "base_4bit": quantized}
            if exact and not quantized and not check["passed"]:
                raise ExportError(
                    f"merged logits differ from the trained model's by up to {check['max_abs_diff']:.3g}: the saved "
                    "adapter is not the model that was trained. Nothing was written."
                )
    merged.save_pretrained(str(folder))
    _save_tokenizer(source.tokenizer, folder, source.adapter_dir, source.base_model)
    from safetensors import safe_open

    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            if any("lora_" in key for key in handle.keys()):  # noqa: SIM118 (safe_open has no __iter__)
                raise ExportError(f"{file.name} still holds LoRA tensors after merging.")
    checks["lora_layers_remaining"] = 0
    if then is not None:
        then(merged)
    del merged, peft_model, base
    return checks, merge_dtype
