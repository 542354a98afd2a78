"""Output layers beyond a plain lm_head: handled exactly in the loss, or refused at construction by name."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer
from test_alignment import MixedTeachers, row_logps
from test_trainer import make_trainer
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sdpo_unsloth import SDPOConfig

SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=3,
    bos_token_id=None,
)


def tiny(model_type: str, **extra):
    from transformers import CohereConfig, FalconH1Config, Gemma2Config, GraniteConfig

    configs = {
        "granite": GraniteConfig,
        "cohere": CohereConfig,
        "gemma2": Gemma2Config,
        "falcon_h1": FalconH1Config,
    }
    torch.manual_seed(0)
    sizes = dict(SIZES)
    if model_type == "gemma2":
        sizes["head_dim"] = 8
    if model_type == "falcon_h1":
        extra = dict(
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_chunk_size=16,
            **extra,
        )
    config = configs[model_type](vocab_size=len(make_tiny_tokenizer()), **sizes, **extra)
    return AutoModelForCausalLM.from_config(config)


HANDLED = {
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
    "gemma2": {"final_logit_softcapping": 2.0},
    "falcon_h1": {"lm_head_multiplier": 3.0},
}


@pytest.mark.parametrize("model_type", HANDLED)
def test_the_loss_scores_tokens_as_the_model_does(tmp_path, model_type):
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(),
        reward=MixedTeachers(),
        model=tiny(model_type, **HANDLED[model_type]),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=0.0,
    )
    trainer.train()
    inputs, terms = trainer._buffered_inputs[0], trainer.sdpo_last_terms
    model = trainer.model
    model.eval()
    row = int(terms["rows"][0])
    length = int(inputs["completion_mask"][row].sum())
    prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
    with torch.no_grad():
        expected, _ = row_logps(model, prompt, inputs["completion_ids"][row, :length])
    torch.testing.assert_close(terms["student_logp"][0, :length], expected, rtol=0, atol=2e-5)


def test_softcap_with_trust_region_is_refused_by_name(tmp_path):
    model = tiny("gemma2", final_logit_softcapping=2.0)
    with pytest.raises(NotImplementedError, match="gemma2 model softcaps its logits"):
        make_trainer(tmp_path, SDPOConfig(teacher_mode="trust_region"), model=model)


class DoubledLogits(Qwen2ForCausalLM):
    """An output layer the loss does not know: the forward doubles the logits."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


def test_an_unknown_output_transform_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(make_tiny_tokenizer()), **SIZES)
    config.model_type = "doubled"
    with pytest.raises(NotImplementedError, match="the doubled model transforms its logits"):
        make_trainer(tmp_path, SDPOConfig(), model=DoubledLogits(config))


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        (dict(target_modules=["q_proj", "lm_head"]), "a LoRA target"),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "in modules_to_save"),
    ],
    ids=["lora", "modules_to_save"],
)
def test_a_trained_output_layer_is_refused_by_name(tmp_path, options, kind):
    """The loss projects with the output layer's frozen weight: an lm_head the user asked to train would get
    no gradient there (the audit measured an lm_head update of exactly 0) and export would fail at the end."""
    from conftest import make_tiny_model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_model(len(make_tiny_tokenizer()), tied=False), LoraConfig(r=4, **options)
    )
    with pytest.raises(NotImplementedError, match=f"the output layer \\(lm_head\\) is {kind}"):
        make_trainer(tmp_path, SDPOConfig(), model=model)
