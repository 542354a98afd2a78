"""Export edge cases on tiny models (CPU, offline): DoRA and `modules_to_save` adapters, output folders that
cannot be written, an untrained adapter, and a base model that moved."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer
from peft import LoraConfig

from sdpo_unsloth.exporter import export
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
