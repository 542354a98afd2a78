"""Export edge cases on tiny models (CPU, offline): DoRA and `modules_to_save` adapters, output folders that
cannot be written, an untrained adapter, and a base model that moved."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from peft import LoraConfig
from safetensors.torch import load_file

from sdpo_unsloth.exporter import ExportError, export
from sdpo_unsloth.model import attach_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))


def _model(base_dir, **lora):
    """The tiny base with a student adapter moved off its initial values (B, DoRA magnitudes, saved copies)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **lora)
    model = attach_lora(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name and any(k in name for k in ("lora_B", "magnitude", "modules_to_save")):
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _merged_logits(folder):
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_merge_is_checked_with_the_magnitude(tmp_path, tiny_model_dir, dtype):
    """DoRA's merge rescales each row of W + dW to its learned magnitude; the weight check expects that."""
    model = _model(tiny_model_dir, use_dora=True)
    result = export(
        model, tmp_path / "m", format="merged_16bit", dtype=dtype, tokenizer=make_tiny_tokenizer()
    )
    assert result.verification["merged_weights"]["passed"]
    assert result.verification["merged_weights"]["layers_checked"] == 2 * len(TARGETS)
    if dtype == "float32":
        assert result.verification["merged_vs_trained_model"]["passed"]
        torch.testing.assert_close(_merged_logits(tmp_path / "m"), _logits(model), atol=1e-4, rtol=1e-4)


def test_dora_merged_weight_is_peft_s_merge():
    from peft import get_peft_model

    from sdpo_unsloth.exporter.checks import dora_merged_weight

    torch.manual_seed(0)
    net = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 6)), LoraConfig(r=2, target_modules=["0"], use_dora=True)
    )
    layer = net.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
        weight = layer.get_base_layer().weight.clone()
        want = dora_merged_weight(
            weight, layer.get_delta_weight("default"), layer.lora_magnitude_vector["default"].weight
        )
        layer.merge()
    assert (want - weight - layer.get_delta_weight("default")).abs().max() > 1e-2  # the rescaling matters
    torch.testing.assert_close(layer.get_base_layer().weight, want)


@pytest.mark.parametrize("tied", [True, False])
def test_modules_to_save_copies_are_exported(tmp_path, tied):
    """An adapter with a trained copy of embed_tokens: the LoRA export keeps PEFT's saved copy; the merged
    model uses it, and its logits equal the adapter model's (with tied embeddings too)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    base_dir = tmp_path / "base"
    make_tiny_model(len(tokenizer), tied=tied).save_pretrained(base_dir)
    model = _model(str(base_dir), modules_to_save=["embed_tokens"])
    expected = _logits(model)

    export(model, tmp_path / "lora", format="lora", tokenizer=tokenizer)
    saved = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    copy = model.get_submodule("base_model.model.model.embed_tokens").modules_to_save["default"].weight
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], copy)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora")
    torch.testing.assert_close(_logits(reloaded.eval()), expected, atol=1e-5, rtol=1e-5)

    export(model, tmp_path / "merged", format="merged_16bit", tokenizer=tokenizer)
    torch.testing.assert_close(_merged_logits(tmp_path / "merged"), expected, atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the head keeps the base embedding it trained with
    with model.disable_adapter():
        assert (expected - _logits(model)).abs().max() > 1e-2  # the copy and the LoRA changed the model


def test_modules_to_save_gguf(tmp_path):
    tokenizer = make_tiny_tokenizer()
    base_dir = tmp_path / "base"
    make_tiny_model(len(tokenizer)).save_pretrained(base_dir)
    model = _model(str(base_dir), modules_to_save=["embed_tokens"])
    with pytest.warns(UserWarning, match="no BPE merges"):
        result = export(model, tmp_path / "g", format="gguf", gguf_quantization="f32", tokenizer=tokenizer)
    assert result.verification["gguf_vs_merged"]["passed"]
    assert result.verification["merged_vs_trained_model"]["passed"]


def test_other_non_lora_tensors_are_still_refused(tmp_path, tiny_model_dir, monkeypatch):
    model = _model(tiny_model_dir)
    real = model.save_pretrained

    def save_with_extra(folder, **kwargs):
        real(folder, **kwargs)
        path = f"{folder}/adapter_model.safetensors"
        from safetensors.torch import save_file

        save_file({**load_file(path), "base_model.model.model.norm.weight": torch.ones(32)}, path)

    monkeypatch.setattr(model, "save_pretrained", save_with_extra)
    with pytest.raises(ExportError, match=r"neither LoRA nor a `modules_to_save` copy.*norm\.weight"):
        export(model, tmp_path / "x", format="lora")
    assert not (tmp_path / "x").exists()


def _untrained(base_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return attach_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))


def test_an_output_folder_under_a_file_is_refused_first(tmp_path, tiny_model_dir):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match=r"afile/sub cannot be created: .*afile is a file, not a folder"):
        export(_model(tiny_model_dir), tmp_path / "afile" / "sub", format="merged_16bit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_read_only_output_folder_is_refused_first(tmp_path, tiny_model_dir, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # a read-only folder, as a non-root user sees it (root writes anywhere, /sys aside)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(
        ExportError, match=r"out is not writable \(Permission denied in .*\); choose a folder"
    ):
        export(_model(tiny_model_dir), tmp_path / "out", format="lora")
    assert not list(tmp_path.iterdir())


def test_an_untrained_adapter_warns_that_the_export_is_the_base(tmp_path, tiny_model_dir, recwarn):
    model = _untrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="adapter is untrained .* export equals the base model"):
        export(model, tmp_path / "lora", format="lora")
    with pytest.warns(UserWarning, match="adapter is untrained"):  # from its folder too
        export(tmp_path / "lora", tmp_path / "merged", format="merged_16bit")
    recwarn.clear()
    export(_model(tiny_model_dir), tmp_path / "trained", format="lora")
    export(tmp_path / "trained", tmp_path / "trained-merged", format="merged_16bit")
    assert not [w for w in recwarn if "untrained" in str(w.message)]


def test_a_moved_base_model_is_named_before_any_work(tmp_path, tiny_model_dir):
    """A new Colab session: the local base path recorded in adapter_config.json is gone."""
    export(_model(tiny_model_dir), tmp_path / "lora", format="lora", tokenizer=make_tiny_tokenizer())
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(config))
    for fmt in ("merged_16bit", "gguf"):
        with pytest.raises(
            ExportError, match=r"recorded in adapter_config.json \(.*gone\) was not found.*--base-model"
        ):
            export(tmp_path / "lora", tmp_path / fmt, format=fmt)
    with pytest.raises(ExportError, match=r"`base_model` \(.*elsewhere\) was not found"):
        export(
            tmp_path / "lora", tmp_path / "m", format="merged_16bit", base_model=str(tmp_path / "elsewhere")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    result = export(tmp_path / "lora", tmp_path / "m", format="merged_16bit", base_model=tiny_model_dir)
    assert result.base_model == tiny_model_dir and result.verification["merged_vs_adapter"]["passed"]
    export(tmp_path / "lora", tmp_path / "lora2", format="lora")  # the adapter alone needs no base


def test_the_cli_reports_export_mistakes_as_user_mistakes(tmp_path, capsys, tiny_model_dir):
    """Exit 2 with the fix, not exit 1 (an internal failure) with a raw OSError or a hub error."""
    from sdpo_unsloth.cli import main

    export(_model(tiny_model_dir), tmp_path / "lora", format="lora")
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "afile" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    config_file = tmp_path / "lora" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace(tiny_model_dir, str(tmp_path / "gone")))
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 2
    assert "--base-model" in capsys.readouterr().err
    argv = ["export", str(tmp_path / "lora"), str(tmp_path / "merged"), "--base-model", tiny_model_dir]
    assert main(argv) == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
