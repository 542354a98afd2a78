"""Export on tiny models (CPU, offline): adapter only, merged fp32, idempotence, no teacher leak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

from sdpo_unsloth.adapters import add_teacher_adapter
from sdpo_unsloth.exporter import LOGITS_ATOL, LOGITS_RTOL, METADATA_FILE, ExportError, export
from sdpo_unsloth.model import attach_lora, default_lora_config

TEACHER = "sdpo_teacher"
FP32_ATOL, FP32_RTOL = 1e-4, 1e-4  # merged vs adapter logits in fp32: summation order only


def trained_like_model(base_dir: str, *, load_in_4bit: bool = False):
    """The tiny base with a student and a teacher adapter whose LoRA B weights are non-zero and different.

    LoRA starts with B = 0 (the adapter is a no-op); random B's make the merge and the teacher-vs-student
    distinction observable, as after real training.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    torch.manual_seed(0)
    model = attach_lora(base, default_lora_config(r=4, lora_alpha=8), teacher_adapter=None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.normal_(0.0, 0.2)
    add_teacher_adapter(model, TEACHER)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{TEACHER}." in name:
                param.normal_(0.0, 0.2)  # the teacher now differs from the student
    return model


def student_tensors(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name="default")


def test_lora_export_is_the_student_only(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    result = export(model, tmp_path / "lora", format="lora", tokenizer=make_tiny_tokenizer())
    saved = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    expected = student_tensors(model)
    assert saved.keys() == expected.keys() and saved
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert not any(TEACHER in k for k in saved)
    assert not (tmp_path / "lora" / TEACHER).exists()
    meta = json.loads((tmp_path / "lora" / METADATA_FILE).read_text())
    assert meta["format"] == "lora" and meta["base_model"] == tiny_model_dir
    assert meta["lora"]["r"] == 4 and meta["lora"]["lora_alpha"] == 8
    assert meta["verification"]["teacher_keys"] == 0
    assert {"README.md", METADATA_FILE, "adapter_config.json", "tokenizer.json"} <= set(result.files)
    assert model.active_adapter == "default"


def test_merged_logits_equal_adapter_logits_fp32(tmp_path, tiny_model_dir):
    """Round trip: merged fp32 model == student adapter model (not the teacher), atol 1e-4 + rtol 1e-4."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = trained_like_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = export(model, tmp_path / "merged", format="merged_16bit", tokenizer=make_tiny_tokenizer())
    assert result.dtype == "float32"
    assert (LOGITS_ATOL, LOGITS_RTOL) == (FP32_ATOL, FP32_RTOL)
    checks = result.verification
    assert checks["merged_vs_adapter"]["passed"] and checks["merged_vs_trained_model"]["passed"]
    assert checks["merged_weights"]["passed"] and checks["merged_weights"]["layers_checked"] > 0
    # the caller's model is untouched: same tensors, both adapters still there, student active
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert set(model.peft_config) == {"default", TEACHER} and model.active_adapter == "default"

    merged = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.randint(4, 90, (3, 20), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the LoRA really changed the model
    model.set_adapter(TEACHER)
    with torch.no_grad():
        teacher_logits = model(input_ids=ids).logits
    model.set_adapter("default")
    assert (merged_logits - teacher_logits).abs().max() > 1e-2  # it is the student, not the teacher


def test_merge_from_an_adapter_directory(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    export(model, tmp_path / "lora", format="lora", tokenizer=make_tiny_tokenizer())
    result = export(tmp_path / "lora", tmp_path / "merged", format="merged_16bit")
    assert result.verification["merged_vs_adapter"]["max_abs_diff"] <= FP32_ATOL
    assert "tokenizer.json" in result.files  # taken from the adapter directory


def test_4bit_base_is_dequantised_for_merging(tmp_path):
    base_dir = tmp_path / "base64"  # bitsandbytes' CPU 4-bit kernel needs rows of >= 64 (its block size)
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer), hidden=64).save_pretrained(base_dir)
    model = trained_like_model(str(base_dir), load_in_4bit=True)
    with pytest.warns(UserWarning, match="dequantised nf4"):
        result = export(model, tmp_path / "merged", format="merged_16bit", tokenizer=make_tiny_tokenizer())
    meta = json.loads((tmp_path / "merged" / METADATA_FILE).read_text())
    assert meta["base_quantization"]["bnb_4bit_quant_type"] == "nf4"
    checks = result.verification
    assert checks["merged_weights"]["passed"] and checks["merged_vs_adapter"]["passed"]  # fp32: strict
    assert "passed" not in checks["merged_vs_trained_model"]  # vs the 4-bit kernels: recorded only
    assert checks["merged_vs_trained_model"]["top1_agreement"] > 0.9
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_export_is_idempotent_and_refuses_foreign_directories(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    out = tmp_path / "lora"
    first = export(model, out, format="lora")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    second = export(model, out, format="lora")
    assert first.files == second.files
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an sdpo_unsloth export"):
        export(model, foreign, format="lora")
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_bad_inputs_name_the_fix(tmp_path, tiny_model_dir):
    with pytest.raises(ExportError, match="format"):
        export(tiny_model_dir, tmp_path / "x", format="onnx")
    with pytest.raises(ExportError, match=r"no adapter_config\.json"):
        export(tiny_model_dir, tmp_path / "x", format="lora")
    with pytest.raises(ExportError, match="cannot export"):
        export(make_tiny_model(10), tmp_path / "x")


def _gguf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    name = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_f32_is_the_student_exactly(tmp_path, tiny_model_dir):
    """GGUF written in Python, read back by transformers: the student's logits, not the teacher's."""
    model = trained_like_model(tiny_model_dir)
    with pytest.warns(UserWarning, match="no BPE merges: llama.cpp refuses"):  # the test tokenizer has none
        result = export(
            model, tmp_path / "gguf", format="gguf", gguf_quantization="f32", tokenizer=make_tiny_tokenizer()
        )
    checks = result.verification
    assert checks["gguf"]["architecture"] == "qwen2" and checks["gguf"]["tensor_types"] == {"F32": 26}
    assert checks["gguf_vs_merged"]["passed"] and checks["gguf_vs_merged"]["max_abs_diff"] <= FP32_ATOL
    assert [f for f in result.files if f.endswith(".gguf")] == [f"{Path(tiny_model_dir).name}-sdpo-f32.gguf"]
    ids = torch.randint(4, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        student = model(input_ids=ids).logits
        model.set_adapter(TEACHER)
        teacher = model(input_ids=ids).logits
        model.set_adapter("default")
    gguf_logits = _gguf_logits(tmp_path / "gguf", ids)
    torch.testing.assert_close(gguf_logits, student, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert (gguf_logits - teacher).abs().max() > 1e-2
    meta = json.loads((tmp_path / "gguf" / METADATA_FILE).read_text())
    assert meta["format"] == "gguf" and meta["verification"]["gguf"]["pre_tokenizer"] == "qwen2"


def _tiny_llama_dir(tmp_path):
    tokenizer = make_tiny_tokenizer()
    path = tmp_path / "tiny-llama"
    make_tiny_model(len(tokenizer), hidden=64, arch="llama", tied=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_gguf_llama_layout_and_a_wrong_conversion_is_refused(tmp_path, monkeypatch):
    """`llama` GGUFs store q/k rows in pairwise rotary order: with the reordering, f32 logits match exactly;
    without it (a broken writer) the check refuses the file and writes nothing."""
    from sdpo_unsloth.exporter import gguf_writer

    model = trained_like_model(_tiny_llama_dir(tmp_path))
    result = export(
        model, tmp_path / "ok", format="gguf", gguf_quantization="f32", tokenizer=make_tiny_tokenizer()
    )
    assert result.verification["gguf"]["architecture"] == "llama"
    assert result.verification["gguf"]["tied_output"] is False
    assert result.verification["gguf_vs_merged"]["max_abs_diff"] <= FP32_ATOL
    monkeypatch.setattr(gguf_writer, "_interleave_rotary", lambda weight, heads: weight)
    with pytest.raises(ExportError, match="conversion is wrong"):
        export(
            model, tmp_path / "bad", format="gguf", gguf_quantization="f32", tokenizer=make_tiny_tokenizer()
        )
    assert not (tmp_path / "bad").exists()


def test_gguf_defaults_to_q8_0(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    result = export(model, tmp_path / "q8", format="gguf", tokenizer=make_tiny_tokenizer())
    checks = result.verification
    assert checks["gguf"]["quantization"] == "q8_0"
    assert checks["gguf"]["tensor_types"] == {"Q8_0": 15, "F32": 11}  # matrices quantised, norms/biases f32
    assert checks["gguf_vs_merged"]["top1_agreement"] >= 0.75
    f32 = export(
        model, tmp_path / "f32", format="gguf", gguf_quantization="f32", tokenizer=make_tiny_tokenizer()
    )
    assert checks["gguf"]["bytes"] < 0.5 * f32.verification["gguf"]["bytes"]


def test_k_quants_without_unsloth_say_how(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    with pytest.raises(ExportError, match=r"llama-quantize.*Q4_K_M.*unsloth"):
        export(model, tmp_path / "gguf", format="gguf", gguf_quantization="q4_k_m")
    assert not (tmp_path / "gguf").exists()


def test_gguf_writer_refuses_what_it_cannot_convert(tmp_path):
    from types import SimpleNamespace

    from sdpo_unsloth.exporter.gguf_writer import GGUFExportError, write_gguf

    config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(GGUFExportError, match=r"'gpt2'.*merged_16bit.*convert_hf_to_gguf"):
        write_gguf(SimpleNamespace(config=config), make_tiny_tokenizer(), tmp_path / "x.gguf", "f16", "x")
    with pytest.raises(GGUFExportError, match="llama-quantize"):
        write_gguf(SimpleNamespace(config=config), make_tiny_tokenizer(), tmp_path / "x.gguf", "q4_0", "x")


def test_gguf_pre_tokenizer_names_and_the_unknown_case(tmp_path):
    from sdpo_unsloth.exporter.gguf_writer import pre_tokenizer_name

    assert pre_tokenizer_name("qwen2", 151936) == "qwen2"
    assert pre_tokenizer_name("llama", 49152) == "smollm"
    assert pre_tokenizer_name("llama", 128256) == "llama-bpe"
    assert pre_tokenizer_name("llama", 260) == "default"
    model = trained_like_model(_tiny_llama_dir(tmp_path))  # a llama vocabulary llama.cpp has no name for
    with pytest.warns(UserWarning, match="no llama.cpp pre-tokenizer is known"):
        result = export(model, tmp_path / "g", format="gguf", tokenizer=make_tiny_tokenizer())
    assert result.verification["gguf"]["pre_tokenizer"] == "default"


def test_bf16_merge_is_checked_on_the_weights(tmp_path, tiny_model_dir):
    model = trained_like_model(tiny_model_dir)
    result = export(
        model, tmp_path / "bf16", format="merged_16bit", dtype="bf16", tokenizer=make_tiny_tokenizer()
    )
    assert result.dtype == "bfloat16"
    checks = result.verification
    assert checks["merged_weights"] == {
        "layers_checked": checks["merged_weights"]["layers_checked"],
        "dtype": "bfloat16",
        "passed": True,
    }
    assert "passed" not in checks["merged_vs_adapter"] and checks["merged_vs_adapter"]["top1_agreement"] > 0.8
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_a_wrong_merge_is_caught_and_nothing_is_written(tmp_path, tiny_model_dir, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def sloppy_merge(self, *args, **kwargs):
        merged = real(self, *args, **kwargs)
        with torch.no_grad():
            for name, module in merged.named_modules():
                if name.endswith("q_proj"):
                    module.weight.add_(1e-3)  # a merge that is off by a little
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", sloppy_merge)
    with pytest.raises(ExportError, match=r"merged weight .*q_proj differs from base \+ LoRA"):
        export(trained_like_model(tiny_model_dir), tmp_path / "merged", format="merged_16bit")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.iterdir())  # no staging leftovers either


def test_export_stays_the_function_after_the_module_is_imported():
    import sdpo_unsloth
    import sdpo_unsloth.api  # imports the exporter module internally
    import sdpo_unsloth.exporter

    assert callable(sdpo_unsloth.export) and sdpo_unsloth.export is sdpo_unsloth.exporter.export


def test_quantization_settings_with_torch_dtypes_rebuild_a_bnb_config():
    """Found on the GPU: unsloth's model config holds torch dtypes, serialised as "torch.float16", which
    BitsAndBytesConfig rejected when the merge re-created the 4-bit base."""
    from types import SimpleNamespace

    from transformers import BitsAndBytesConfig

    from sdpo_unsloth.exporter.source import _quantization_of

    config = SimpleNamespace(
        quantization_config={
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": torch.float16,
            "bnb_4bit_quant_storage": torch.uint8,
            "quant_method": "bitsandbytes",
        }
    )
    base = SimpleNamespace(is_loaded_in_4bit=True, config=config)
    settings = _quantization_of(SimpleNamespace(get_base_model=lambda: base))
    assert settings["bnb_4bit_compute_dtype"] == "float16" and settings["bnb_4bit_quant_storage"] == "uint8"
    settings.pop("quant_method")
    rebuilt = BitsAndBytesConfig(**settings)
    assert rebuilt.bnb_4bit_compute_dtype == torch.float16 and rebuilt.bnb_4bit_quant_storage == torch.uint8
