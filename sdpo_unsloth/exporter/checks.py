"""The checks an export must pass before it is installed: no teacher tensor in the adapter file, merged
weights == W + dW up to rounding, merged logits == the adapter model's (and the trained model's), and the
GGUF file read back against the merged model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..adapters import STUDENT_ADAPTER, adapter_is_initial, adapter_scope
from .source import ADAPTER_FILE, ExportError, _Source

# fp32 merged vs adapter logits: |merged - ref| <= LOGITS_ATOL + LOGITS_RTOL |ref| elementwise (the two
# differ only in summation order). In 16-bit the forward passes themselves round (measured on SmolLM2 in
# bf16: unmerged vs fp32 logits differ by up to 1.5, merged vs unmerged by 1.0), so there the check is on
# the weights instead: merged W == W + dW up to one rounding to the dtype, on sampled layers.
LOGITS_ATOL = 1e-4


LOGITS_RTOL = 1e-4


_FIXED_TEXTS = ("The capital of France is", "12+7=19. 34+8=", "def add(a, b):\n    return a")


# A GGUF in f16/bf16/q8_0 must pick the merged model's next token on at least this share of ~300 positions
# (sample texts + random tokens). Measured on SmolLM2-135M with a random LoRA: q8_0 93%, bf16 98%, f16
# 100%; with the rotary reordering of q/k left out (a wrong conversion) it fell to 31%.
GGUF_MIN_TOP1 = 0.75


def _check_adapter_file(
    folder: Path, teacher_names: tuple[str, ...], expected: dict | None
) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / ADAPTER_FILE))
    if not tensors:
        raise ExportError(f"{folder / ADAPTER_FILE} holds no tensors.")
    leaked = [k for k in tensors if any(name in k for name in teacher_names)]
    leaked += [str(p.name) for p in folder.iterdir() if p.name in teacher_names]
    if leaked:
        raise ExportError(f"the teacher adapter leaked into the export: {leaked[:3]}")
    saved_modules = _modules_to_save(folder)
    not_lora = [k for k in tensors if "lora_" not in k and not _is_saved_module(k, saved_modules)]
    if not_lora:
        raise ExportError(
            f"unexpected tensors in the adapter, neither LoRA nor a `modules_to_save` copy {saved_modules}: "
            f"{not_lora[:3]}"
        )
    if expected is not None:
        if set(expected) != set(tensors):
            raise ExportError("the written adapter's tensor names differ from the student adapter's.")
        if not all(torch.equal(expected[k].to(tensors[k].dtype), tensors[k]) for k in tensors):
            raise ExportError("the written adapter's tensors differ from the student adapter's.")
    return {"tensors": len(tensors), "teacher_keys": 0, "matches_student": expected is not None}


def _modules_to_save(folder: Path) -> list[str]:
    """The adapter config's `modules_to_save`: modules PEFT trains and saves as whole copies."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return list(config.get("modules_to_save") or [])


def _is_saved_module(key: str, modules: list[str]) -> bool:
    """`key` is a tensor of a `modules_to_save` copy, e.g. `base_model.model.model.embed_tokens.weight` for
    `embed_tokens` (PEFT saves the student's copy under the original module's name)."""
    module = key.rsplit(".", 1)[0]
    return any(module == name or module.endswith(f".{name}") for name in modules)


def _is_untrained(source: _Source) -> bool:
    """Every LoRA B of the student is zero and it has no `modules_to_save` copy: the adapter adds nothing."""
    if source.model is not None:
        return adapter_is_initial(source.model, STUDENT_ADAPTER)
    from safetensors import safe_open

    assert source.adapter_dir is not None
    with safe_open(str(source.adapter_dir / ADAPTER_FILE), "pt") as handle:
        keys = list(handle.keys())
        if any("lora_" not in key for key in keys):
            return False  # a saved module copy (or something else): not the base model
        b_keys = [key for key in keys if "lora_B" in key]
        return bool(b_keys) and not any(bool(handle.get_tensor(key).any()) for key in b_keys)


def _warn_if_untrained(source: _Source) -> None:
    if _is_untrained(source):
        warnings.warn(
            f"the student adapter is untrained (every LoRA B is zero), so this export equals the base model "
            f"{source.base_model}. Export the model after training, or a later checkpoint-N.",
            stacklevel=3,
        )


def _fixed_inputs(tokenizer: Any, vocab_size: int) -> list[torch.Tensor]:
    if tokenizer is not None:
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:32] for text in _FIXED_TEXTS]
        if all(rows):
            return [torch.tensor([row]) for row in rows]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 16), generator=generator) for _ in range(3)]


@torch.no_grad()
def _logits(model: Any, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]
    finally:
        model.train(was_training)


def _logit_check(
    merged: list[torch.Tensor], reference: list[torch.Tensor], *, strict: bool
) -> dict[str, Any]:
    """Max |diff| and top-1 agreement; with `strict`, pass/fail against |diff| <= atol + rtol |ref|."""
    diff = max(float((x - y).abs().max()) for x, y in zip(merged, reference, strict=True))
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(merged, reference, strict=True))
    result: dict[str, Any] = {
        "max_abs_diff": diff,
        "top1_agreement": agree / sum(x.shape[1] for x in reference),
    }
    if strict:
        ok = all(
            bool(((x - y).abs() <= LOGITS_ATOL + LOGITS_RTOL * y.abs()).all())
            for x, y in zip(merged, reference, strict=True)
        )
        result.update(atol=LOGITS_ATOL, rtol=LOGITS_RTOL, passed=ok)
    else:
        result["note"] = (
            "16-bit or 4-bit forward passes differ by rounding alone; merged_weights is the check"
        )
    return result


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight (Liu et al. 2024, arXiv 2402.09353): W' = m * (W + dW) / ||W + dW||, the norm
    taken over each output row ([out, in] weights), so each row of W' has length m.

    >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> dora_merged_weight(w, torch.tensor([[0.0, 4.0], [0.0, 1.0]]), torch.tensor([10.0, 1.0]))
    tensor([[6., 8.],
            [0., 1.]])
    """
    combined = weight + delta  # [out, in]
    return (magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1) * combined


def _expected_merges(
    peft_model: Any, limit: int = 8, rows: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For up to `limit` LoRA layers spread over the model: (the merged weight in fp32, the size of the change)
    of their first `rows` rows. LoRA: W + dW and |dW|; DoRA: `dora_merged_weight` and |W' - W| + |dW|.

    DoRA layers other than a plain [out, in] Linear (conv, embedding, fan_in_fan_out) are left to the logit check.
    """
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or STUDENT_ADAPTER not in module.lora_A:
            continue
        dora = STUDENT_ADAPTER in module.lora_magnitude_vector
        plain = module.get_base_layer().weight.ndim == 2 and not getattr(module, "fan_in_fan_out", False)
        if not dora or plain:
            layers.append((name, module, dora))
    picks = layers[:: max(1, len(layers) // limit)][:limit]
    expected = {}
    with torch.no_grad():
        for name, module, dora in picks:
            delta = module.get_delta_weight(STUDENT_ADAPTER).float()[:rows]
            weight = module.get_base_layer().weight[:rows].float()
            if dora:
                magnitude = module.lora_magnitude_vector[STUDENT_ADAPTER].weight[:rows].float()
                want = dora_merged_weight(weight, delta, magnitude)
                change = (want - weight).abs() + delta.abs()
            else:
                want, change = weight + delta, delta.abs()
            expected[name.removeprefix("base_model.model.")] = (want.cpu(), change.cpu())
    return expected


def _check_merged_weights(
    merged: Any, expected: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> dict[str, Any]:
    """Merged weights == the expected W', rounded once or twice to `dtype`: |err| <= eps (|W'| + |change|)."""
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    worst = 0.0
    for name, (want, delta) in expected.items():
        got = merged.get_submodule(name).weight[: want.shape[0]].detach().float().cpu()
        excess = (got - want).abs() - eps * (want.abs() + delta) - tiny
        worst = max(worst, float(excess.max()))
        if worst > 0:
            raise ExportError(
                f"merged weight {name} differs from base + LoRA beyond {dtype} rounding; the merge is wrong. "
                "Nothing was written."
            )
    return {"layers_checked": len(expected), "dtype": str(dtype).replace("torch.", ""), "passed": True}


def _model_logits_of_caller(model: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with adapter_scope(model, STUDENT_ADAPTER):
        return _logits(model, inputs, device)


def _check_gguf(file: Path, merged_dir: Path, tokenizer: Any, method: str) -> dict[str, Any]:
    """Load the GGUF back with transformers' reader: logits against the merged model, then the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cpu = torch.device("cpu")
    reference = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    vocab = reference.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    inputs = _fixed_inputs(tokenizer, vocab) + [
        torch.randint(0, vocab, (1, 64), generator=generator) for _ in range(4)
    ]
    expected = _logits(reference, inputs, cpu)
    del reference
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32
    )
    check = _logit_check(_logits(reloaded, inputs, cpu), expected, strict=method == "f32")
    del reloaded
    if method != "f32":
        check["note"] = f"{method} weights round; the check is next-token agreement >= {GGUF_MIN_TOP1:.0%}"
    if check.get("passed") is False:
        raise ExportError(
            f"the f32 GGUF's logits differ from the merged model's by up to {check['max_abs_diff']:.3g}: the "
            "conversion is wrong. Nothing was written."
        )
    if check["top1_agreement"] < GGUF_MIN_TOP1:
        raise ExportError(
            f"the {method} GGUF agrees with the merged model on {check['top1_agreement']:.0%} of next-token "
            f"argmaxes (at least {GGUF_MIN_TOP1:.0%} expected): the conversion is wrong. Nothing was written."
        )
    try:
        loaded = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        same = all(loaded(t)["input_ids"] == tokenizer(t)["input_ids"] for t in _FIXED_TEXTS)
        check["tokenizer_ids_equal"] = same
        if not same:
            warnings.warn(
                f"transformers' GGUF reader tokenizes {file.name} differently from the training tokenizer on "
                "sample texts; llama.cpp may too. Check the output before deploying it.",
                stacklevel=4,
            )
    except Exception as exc:  # transformers cannot rebuild every tokenizer (e.g. BPE without merges)
        check["tokenizer_ids_equal"] = f"not checked: {type(exc).__name__}: {str(exc)[:200]}"
    return check
