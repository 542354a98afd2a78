"""Export the trained student: its LoRA adapter, a merged 16-bit model, or a GGUF file.

Three formats, each written to a fresh directory with `sdpo_export.json` (what was exported, from which
base, how it was checked, library versions) and a short `README.md` model card:

    lora          the student adapter only (`default`). The EMA teacher adapter (`sdpo_teacher`) is
                  training state and never leaves the checkpoints: the written tensors are checked to be
                  exactly the student's, with no teacher key.
    merged_16bit  the student LoRA merged into a reloaded copy of the base model, in the training compute
                  dtype (fp16/bf16 on a GPU, fp32 on CPU). The caller's model is never modified. A 4-bit
                  base is dequantised first (nf4 values, not the original weights): the merged model is what
                  was trained, up to rounding. Checked: on sampled layers, merged W == W + dW up to one
                  rounding to the dtype; in fp32 also merged logits == the unmerged adapter model's and the
                  trained model's on a few fixed token sequences (|diff| <= 1e-4 + 1e-4 |ref|); in 16-bit
                  the logit gap and top-1 agreement are recorded (rounding alone moves 16-bit logits by ~1);
                  no LoRA layer or tensor remains.
    gguf          the merged model as one llama.cpp file, written in Python (`gguf_writer`) for Llama- and
                  Qwen2-family models in q8_0 (default), f16, bf16 or f32, on any machine. Checked by loading
                  it back with transformers' GGUF reader: f32 logits equal the merged model's (1e-4), other
                  types pick the same next token on >= 90% of positions, and the tokenizer is compared on
                  sample texts. K-quants (q4_k_m, ...) go through unsloth's `save_pretrained_gguf` (unsloth
                  backend on a GPU runtime, which builds llama.cpp).

Exporting is idempotent: files are written to a temporary sibling directory and swapped in, so exporting
twice to the same directory gives the same files. A non-empty directory that is not an export (no
`sdpo_export.json`) is never overwritten.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import torch

from .adapters import STUDENT_ADAPTER, TEACHER_ADAPTER
from .bootstrap import bootstrap, current_backend, pick_dtype

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


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message says what to change."""


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


def _read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------ output dir


def check_output_dir(output_dir: Path) -> None:
    """Raise `ExportError` if `output_dir` is a file or a non-empty folder that is not an earlier export."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir} is a file; choose a directory for the export.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / METADATA_FILE).is_file():
        raise ExportError(
            f"{output_dir} is not empty and is not an sdpo_unsloth export (no {METADATA_FILE}); refusing to "
            "overwrite it. Choose a new or empty directory, or delete this one first."
        )


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


# ------------------------------------------------------------------------------------------ formats


def _student_state(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=STUDENT_ADAPTER)
    return {k: v.detach().cpu() for k, v in state.items()}


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
    not_lora = [k for k in tensors if "lora_" not in k]
    if not_lora:
        raise ExportError(f"unexpected non-LoRA tensors in the adapter: {not_lora[:3]}")
    if expected is not None:
        if set(expected) != set(tensors):
            raise ExportError("the written adapter's tensor names differ from the student adapter's.")
        if not all(torch.equal(expected[k].to(tensors[k].dtype), tensors[k]) for k in tensors):
            raise ExportError("the written adapter's tensors differ from the student adapter's.")
    return {"tensors": len(tensors), "teacher_keys": 0, "matches_student": expected is not None}


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


def _expected_merges(
    peft_model: Any, limit: int = 8, rows: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For up to `limit` LoRA layers spread over the model: (W + dW in fp32, |dW|) of their first `rows` rows."""
    from peft.tuners.lora import LoraLayer

    layers = [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and STUDENT_ADAPTER in module.lora_A
    ]
    picks = layers[:: max(1, len(layers) // limit)][:limit]
    expected = {}
    with torch.no_grad():
        for name, module in picks:
            delta = module.get_delta_weight(STUDENT_ADAPTER).float()[:rows]
            weight = module.get_base_layer().weight[:rows].float()
            expected[name.removeprefix("base_model.model.")] = ((weight + delta).cpu(), delta.abs().cpu())
    return expected


def _check_merged_weights(
    merged: Any, expected: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> dict[str, Any]:
    """Merged weights == W + dW, rounded once or twice to `dtype`: |err| <= eps (|W + dW| + |dW|)."""
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
    from .adapters import adapter_scope

    device = next(model.parameters()).device
    with adapter_scope(model, STUDENT_ADAPTER):
        return _logits(model, inputs, device)


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

    if not source.base_model:
        raise ExportError(
            "the adapter does not name its base model; pass base_model='<hub name or local path>'."
        )
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
    from . import gguf_writer

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


def _write_gguf_unsloth(
    source: _Source, folder: Path, work: Path, teacher_names: tuple[str, ...], method: str
) -> dict:
    from . import gguf_writer

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
            `base_model_name_or_path`.
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
