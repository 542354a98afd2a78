"""GPU-only checks of the unsloth path (skipped without CUDA + unsloth).

Run on a GPU machine with unsloth installed:  python -m pytest -m gpu tests/gpu
Measured results of the same path (H200 in fp16, as on a T4) are in docs/benchmarks.md.

One SDPO run (module fixture `trained`) is shared by the checks that read a trained model, so the whole
file costs one unsloth import, one 4-bit load and two training steps.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth installed"),
]

TEACHER = "sdpo_teacher"
EMA_RATE = 0.5


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


class Feedback:
    """Always wrong, always with feedback: every sample gets a teacher (the worst case for SDPO's cost)."""

    __name__ = "feedback"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.last_feedback = ["Wrong. The answer is 7."] * len(completions)
        return [0.0] * len(completions)


def _adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


@pytest.fixture(scope="module")
def trained(small_model_dir, tmp_path_factory):
    """Two SDPO steps on unsloth (4-bit, fp16, EMA rate 0.5) with snapshots taken before training."""
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model

    model, tokenizer = load_model(
        small_model_dir, load_in_4bit=True, lora_r=8, max_seq_length=256, dtype="fp16"
    )
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("sdpo-out")),
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
        sdpo_config=SDPOConfig(teacher_update_rate=EMA_RATE),
        processing_class=tokenizer,
        reward_funcs=[Feedback()],
        train_dataset=Dataset.from_list(rows),
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    student0, teacher0 = _adapter(model, "default"), _adapter(model, TEACHER)
    hidden_env = os.environ.get("UNSLOTH_RETURN_HIDDEN_STATES")
    trainer.train()
    return {
        "model": model,
        "tokenizer": tokenizer,
        "trainer": trainer,
        "base0": base,
        "student0": student0,
        "teacher0": teacher0,
        "hidden_env": hidden_env,
    }


def test_trainer_subclasses_unsloths_patched_grpo_trainer():
    import sdpo_unsloth

    assert sdpo_unsloth.bootstrap("unsloth").name == "unsloth"
    import trl

    assert "Unsloth" in trl.GRPOTrainer.__name__
    assert issubclass(sdpo_unsloth.SDPOTrainer, trl.GRPOTrainer)
    names = [c.__name__ for c in sdpo_unsloth.SDPOTrainer.__mro__]
    assert names.index("_SDPOMixin") < names.index("UnslothGRPOTrainer")


def test_one_4bit_base_shared_by_student_and_teacher(trained):
    """No second model: every base weight is there once, in 4-bit, and the two adapters have the same shape."""
    import bitsandbytes as bnb

    model = trained["model"]
    assert set(model.peft_config) == {"default", TEACHER}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    student, teacher = _adapter(model, "default"), _adapter(model, TEACHER)
    assert student and {n.replace(f".{TEACHER}.", ".default.") for n in teacher} == set(student)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == len(student) + len(teacher)
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{TEACHER}." in n)
    # fp16 training keeps the LoRA weights in fp32 (fp16 AMP cannot unscale 16-bit gradients)
    assert {p.dtype for p in student.values()} == {torch.float32}


def test_sdpo_trains_the_student_moves_the_teacher_and_keeps_the_base(trained):
    model = trained["model"]
    history = trained["trainer"].state.log_history
    # unsloth's patched compute_loss never calls TRL's _compute_loss: the SDPO loss must still be the one run
    distill = [h["sdpo/distill_loss"] for h in history if "sdpo/distill_loss" in h]
    assert len(distill) == 2 and all(d > 0 for d in distill), f"the SDPO loss did not run: {history}"
    student, teacher = _adapter(model, "default"), _adapter(model, TEACHER)

    def change(now, before):
        return max(float((now[n].float() - before[n].float()).abs().max()) for n in now)

    assert change(student, trained["student0"]) > 1e-4, "the student LoRA did not train under unsloth"
    assert change(teacher, trained["teacher0"]) > 1e-5, "the EMA teacher did not move"
    as_student = {n.replace(f".{TEACHER}.", ".default."): p for n, p in teacher.items()}
    assert change(as_student, student) > 1e-5, "the EMA teacher equals the student (rate 0.5 must lag)"
    base_now = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert base_now.keys() == trained["base0"].keys()
    assert all(torch.equal(base_now[n], trained["base0"][n]) for n in base_now), (
        "a frozen base weight changed"
    )
    assert os.environ.get("UNSLOTH_RETURN_HIDDEN_STATES") == trained["hidden_env"]
    assert [h["step"] for h in history if "loss" in h][:2] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)


def test_adapter_switching_under_unsloths_kernels(trained):
    """After EMA steps the teacher adapter gives other logits than the student; `default` comes back active."""
    from sdpo_unsloth.adapters import adapter_scope

    model, tokenizer = trained["model"], trained["tokenizer"]
    ids = torch.tensor([tokenizer("1+2=")["input_ids"]], device=model.device)
    model.eval()
    with torch.no_grad():
        student = model(input_ids=ids).logits.float()
        with adapter_scope(model, TEACHER):
            teacher = model(input_ids=ids).logits.float()
        again = model(input_ids=ids).logits.float()
    assert model.active_adapter == "default"
    assert not torch.allclose(student, teacher), "teacher logits equal student logits after EMA steps"
    torch.testing.assert_close(again, student)  # switching back restores the student exactly
    assert torch.isfinite(student).all() and torch.isfinite(teacher).all()


def test_export_round_trip_on_gpu(trained, tmp_path):
    """LoRA export holds the student only; the fp16 merge matches W + dW and the trained model's argmax."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sdpo_unsloth import export

    model, tokenizer = trained["model"], trained["tokenizer"]
    with torch.no_grad():  # make the student's LoRA large enough for the merge to be visible
        generator = torch.Generator(device=model.device).manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator, device=param.device) * 0.05)

    lora = export(model, str(tmp_path / "lora"), format="lora", tokenizer=tokenizer)
    saved = load_file(os.path.join(lora.output_dir, "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model, adapter_name="default")
    assert saved.keys() == expected.keys() and saved
    assert all(torch.equal(saved[k].cpu(), expected[k].cpu()) for k in saved)
    assert not any(TEACHER in k for k in saved)

    with pytest.warns(UserWarning, match="dequantised nf4"):
        merged = export(model, str(tmp_path / "merged"), format="merged_16bit", tokenizer=tokenizer)
    checks = merged.verification
    assert checks["merged_weights"]["passed"] and checks["merged_weights"]["layers_checked"] > 0
    assert checks["lora_layers_remaining"] == 0
    assert checks["merged_vs_trained_model"]["top1_agreement"] > 0.9
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config

    reloaded = AutoModelForCausalLM.from_pretrained(
        merged.output_dir, dtype=torch.float16, device_map={"": 0}
    )
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(1)).to(model.device)
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits.float()
        merged_logits = reloaded(input_ids=ids).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.float()
    agreement = (merged_logits.argmax(-1) == trained_logits.argmax(-1)).float().mean().item()
    base_agreement = (merged_logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    assert agreement > 0.9, f"merged model agrees with the trained one on {agreement:.0%} of argmaxes"
    assert (merged_logits - base_logits).abs().max() > 1e-2, "the merge did not change the model"
    assert base_agreement < agreement
    assert model.active_adapter == "default"


def test_loss_logps_match_an_unpadded_forward_in_training_mode(small_model_dir, tmp_path):
    """Uneven prompts and teacher prompts on unsloth's fast decoder (which drops a padding mask in training
    mode unless told to keep it): the loss's per-token log-probs equal a one-row forward without padding."""
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model
    from sdpo_unsloth.adapters import adapter_scope

    class Mixed:
        __name__ = "mixed"

        def __init__(self):
            self.last_feedback: list[str] = []

        def __call__(self, prompts, completions, **kwargs):
            self.last_feedback = ["No. " * (1 + 10 * (i % 2)) for i in range(len(completions))]
            return [0.0] * len(completions)

    model, tokenizer = load_model(
        small_model_dir, load_in_4bit=True, lora_r=8, max_seq_length=256, dtype="fp16"
    )
    rows = [{"prompt": [{"role": "user", "content": "Think. " * (i % 4) + f"{i}+1="}]} for i in range(16)]
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=str(tmp_path / "out"),
            num_generations=4,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_completion_length=8,
            max_steps=1,
            learning_rate=0.0,
            fp16=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
        ),
        sdpo_config=SDPOConfig(distillation_topk=None),
        processing_class=tokenizer,
        reward_funcs=[Mixed()],
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    model.train()
    inputs, terms = trainer._buffered_inputs[0], trainer.sdpo_last_terms
    assert len(set(inputs["prompt_mask"].sum(1).tolist())) > 1
    assert len(set(inputs["sdpo_teacher_prompt_mask"].sum(1).tolist())) > 1
    head = trainer._head
    temperature = head.temperature(trainer.temperature)

    def one_row(prompt, completion):
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            hidden = trainer._completion_hidden(model, ids, torch.ones_like(ids), completion.numel())
        logp = (head.logits(hidden[0]) / temperature).log_softmax(-1)
        return logp.gather(1, completion[:, None]).squeeze(1)

    for i, row in enumerate(terms["rows"].tolist()):
        length = int(inputs["completion_mask"][row].sum())
        if length == 0:
            continue
        completion = inputs["completion_ids"][row, :length]
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        teacher_prompt = inputs["sdpo_teacher_prompt_ids"][row][
            inputs["sdpo_teacher_prompt_mask"][row].bool()
        ]
        student = one_row(prompt, completion)
        with adapter_scope(model, TEACHER):
            teacher = one_row(teacher_prompt, completion)
        torch.testing.assert_close(terms["student_logp"][i, :length].float(), student, rtol=0, atol=3e-2)
        torch.testing.assert_close(terms["teacher_logp"][i, :length].float(), teacher, rtol=0, atol=3e-2)


@pytest.mark.parametrize(("beta", "anchor"), [(0.1, 0.0), (0.0, 0.1)], ids=["grpo_beta", "distill_anchor"])
def test_per_group_hybrid_with_the_kl_anchor_trains_on_unsloth(small_model_dir, tmp_path, beta, anchor):
    """The per-group hybrid (GRPO where a group's rewards differ, distillation where they are equal) with a KL
    anchor on unsloth's patched trainer: `GRPOConfig.beta` (on every sample) or `SDPOConfig.distill_anchor` (on
    the distilled ones: `train()`'s default). Neither TRL nor unsloth loads a reference model (the base with the
    adapters disabled is SDPO's reference), both terms run, and the KL is 0 at the first step (the student starts
    as its reference) and positive after it."""
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model

    class Split:
        """Rows 0-7 of a batch: a reward spread in every group (GRPO); rows 8-15 all wrong with feedback."""

        __name__ = "split"

        def __init__(self):
            self.last_feedback: list[str] = []

        def __call__(self, prompts, completions, **kwargs):
            n = len(completions)
            self.last_feedback = ["Wrong. The answer is 7."] * n
            return [float(i < n // 2 and i % 2 == 0) for i in range(n)]

    model, tokenizer = load_model(
        small_model_dir, load_in_4bit=True, lora_r=8, max_seq_length=256, dtype="fp16"
    )
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}="}]} for a in range(4) for b in range(4)]
    student0 = _adapter(model, "default")
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=str(tmp_path / "out"),
            num_generations=4,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=1,
            max_completion_length=8,
            max_steps=2,
            learning_rate=5e-3,
            beta=beta,
            logging_steps=1,
            fp16=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            shuffle_dataset=False,
        ),
        sdpo_config=SDPOConfig(grpo_weight=1.0, hybrid_mode="per_group", distill_anchor=anchor),
        processing_class=tokenizer,
        reward_funcs=[Split()],
        train_dataset=Dataset.from_list(rows),
    )
    assert trainer.args.beta == beta and trainer.reference_kl_beta == beta
    assert trainer.sdpo_config.distill_anchor == anchor
    assert getattr(trainer, "ref_model", None) is None, "a reference model was loaded"
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history][:2] == [1, 2]
    kl = [h["kl"] for h in history]
    assert abs(kl[0]) < 1e-3 and kl[1] > 0, kl
    assert all(h["sdpo/distill_loss"] > 0 and "sdpo/grpo_loss" in h for h in history), history
    # two groups with a reward spread (GRPO), two all wrong with feedback (distilled): half the samples each
    assert all(h["frac_reward_zero_std"] == 0.5 and h["sdpo/frac_distilled"] == 0.5 for h in history), history
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    student = _adapter(model, "default")
    assert max(float((student[n] - student0[n]).abs().max()) for n in student) > 1e-4
