"""GPU-only checks of the unsloth path (skipped without CUDA + unsloth).

Run on a GPU machine with unsloth installed:  python -m pytest -m gpu tests/gpu
Measured results of the same path (H200 in fp16) are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth installed"),
]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A 2-layer Qwen2 model from a config (random weights), saved in fp16 with a byte-level tokenizer."""
    import sdpo_unsloth

    sdpo_unsloth.bootstrap("unsloth")  # unsloth before transformers
    from conftest import make_tiny_model, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("qwen2-small")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), hidden=256, layers=2).half()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_trainer_subclasses_unsloths_patched_grpo_trainer():
    import sdpo_unsloth

    assert sdpo_unsloth.bootstrap("unsloth").name == "unsloth"
    import trl

    assert "Unsloth" in trl.GRPOTrainer.__name__
    assert issubclass(sdpo_unsloth.SDPOTrainer, trl.GRPOTrainer)


def test_sdpo_steps_on_unsloth_train_and_switch_adapters(small_model_dir, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model
    from sdpo_unsloth.teacher import adapter_scope

    model, tokenizer = load_model(
        small_model_dir, load_in_4bit=True, lora_r=8, max_seq_length=256, dtype="fp16"
    )

    class Feedback:
        __name__ = "feedback"

        def __init__(self):
            self.last_feedback: list[str] = []

        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = ["Wrong. The answer is 7."] * len(completions)
            return [0.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            num_generations=4,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_completion_length=8,
            max_steps=2,
            learning_rate=5e-3,
            fp16=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
        ),
        sdpo_config=SDPOConfig(teacher_update_rate=0.5),
        processing_class=tokenizer,
        reward_funcs=[Feedback()],
        train_dataset=Dataset.from_list(rows),
    )
    student0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    trainer.train()
    moved = [n for n, p in model.named_parameters() if ".default." in n and not torch.equal(p, student0[n])]
    assert moved, "the student LoRA did not train under unsloth"
    ids = torch.tensor([tokenizer("1+2=")["input_ids"]], device=model.device)
    with torch.no_grad():
        student = model(input_ids=ids).logits.float()
        with adapter_scope(model, "sdpo_teacher"):
            teacher = model(input_ids=ids).logits.float()
    assert model.active_adapter == "default"
    assert not torch.allclose(student, teacher), "teacher logits equal student logits after EMA steps"


def test_export_round_trip_on_gpu(small_model_dir, tmp_path):
    from sdpo_unsloth import export, load_model

    model, tokenizer = load_model(
        small_model_dir, load_in_4bit=False, lora_r=8, max_seq_length=256, dtype="fp16"
    )
    result = export(model, str(tmp_path / "lora"), format="lora", tokenizer=tokenizer)
    assert result is not None
