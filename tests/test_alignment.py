"""The per-token log-probs the SDPO loss uses equal an independent, unpadded forward of what each teacher
mode promises, on uneven prompts and uneven teacher prompts (long demonstrations beside short feedback).

Each run trains two optimizer steps (GA 1) and snapshots the adapters at the start of every step, so the
last step's loss terms (`trainer.sdpo_last_terms`) can be recomputed row by row with the weights it saw.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_trainer import adapter_tensors, make_trainer
from transformers import TrainerCallback

from sdpo_unsloth import SDPOConfig
from sdpo_unsloth.adapters import adapter_scope
from sdpo_unsloth.model import attach_lora

TEACHER = "sdpo_teacher"


def uneven_dataset() -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{'Think. ' * (i % 4)}{i}+{i % 3}="}],
            "answer": str(i + i % 3),
        }
        for i in range(16)
    ]
    return Dataset.from_list(rows)


class MixedTeachers:
    """Succeeds on a digit; failures get short feedback or (every third) a long one."""

    __name__ = "mixed"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        ok = [any(ch.isdigit() for ch in t) for t in texts]
        self.last_feedback = [
            "" if good else ("No. " * 12 if i % 3 == 0 else "No.") for i, good in enumerate(ok)
        ]
        return [float(good) for good in ok]


class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.states: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.states.append({n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n})


def restore(model, state):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])


def row_logps(model, prompt_ids, completion_ids):
    """log p(y_t) for one unpadded row: [L]."""
    ids = torch.cat([prompt_ids, completion_ids])[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.numel() - 1 : -1]
    return logits.float().log_softmax(-1).gather(1, completion_ids[:, None]).squeeze(1), logits.float()


def pretrained_student(tokenizer_size: int):
    """A PEFT model whose student adapter was trained before SDPO (random non-zero LoRA B)."""
    from conftest import make_tiny_model

    model = attach_lora(make_tiny_model(tokenizer_size), teacher_adapter=None)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("mode", ["ema", "frozen", "live", "trust_region"])
def test_loss_logps_equal_an_unpadded_forward_of_the_promised_teacher(tmp_path, mode):
    from conftest import make_tiny_tokenizer

    model = pretrained_student(len(make_tiny_tokenizer())) if mode in ("frozen", "trust_region") else None
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(teacher_mode=mode, teacher_update_rate=0.3, distillation_topk=None),
        reward=MixedTeachers(),
        model=model,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
    )
    trainer.train_dataset = uneven_dataset()
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    snapshots = Snapshots(model)
    trainer.add_callback(snapshots)
    trainer.train()
    assert any(not torch.equal(initial[n], p) for n, p in model.named_parameters() if ".default." in n)

    inputs = trainer._buffered_inputs[0]
    terms = trainer.sdpo_last_terms
    assert terms is not None
    prompt_lengths = inputs["prompt_mask"].sum(1)
    teacher_lengths = inputs["sdpo_teacher_prompt_mask"].sum(1)
    active = inputs["sdpo_sample_mask"].bool()
    assert len(set(prompt_lengths.tolist())) > 1  # uneven prompts
    assert len(set(teacher_lengths[active].tolist())) > 1  # uneven teacher prompts
    model.eval()
    checked = 0
    for i, row in enumerate(terms["rows"].tolist()):
        length = int(inputs["completion_mask"][row].sum())
        if not active[row] or length == 0:
            continue
        completion = inputs["completion_ids"][row, :length]
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        teacher_prompt = inputs["sdpo_teacher_prompt_ids"][row][
            inputs["sdpo_teacher_prompt_mask"][row].bool()
        ]
        with torch.no_grad():
            restore(model, snapshots.states[-1])
            student, _ = row_logps(model, prompt, completion)
            if mode == "ema":
                with adapter_scope(model, TEACHER):
                    teacher, _ = row_logps(model, teacher_prompt, completion)
            elif mode == "live":
                teacher, _ = row_logps(model, teacher_prompt, completion)
            else:
                _, live = row_logps(model, teacher_prompt, completion)
                restore(model, {n: v for n, v in initial.items() if ".default." in n})
                teacher, first = row_logps(model, teacher_prompt, completion)
                if mode == "trust_region":
                    mixed = torch.lerp(first, live, 0.3).log_softmax(-1)
                    teacher = mixed.gather(1, completion[:, None]).squeeze(1)
        torch.testing.assert_close(terms["student_logp"][i, :length], student, rtol=0, atol=2e-5)
        torch.testing.assert_close(terms["teacher_logp"][i, :length], teacher, rtol=0, atol=2e-5)
        checked += 1
    assert checked >= 2
    if mode in ("frozen", "trust_region"):  # the loaded adapter is the initial policy, not the bare base
        assert adapter_tensors(model, TEACHER)


def test_teacher_forward_has_no_dropout(tmp_path):
    """With lora_dropout 0.5 the student's logps vary between forwards; the teacher's used by the loss do not."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    from sdpo_unsloth.model import default_lora_config

    tokenizer = make_tiny_tokenizer()
    model = attach_lora(
        make_tiny_model(len(tokenizer)), default_lora_config(lora_dropout=0.5), teacher_adapter=None
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(teacher_mode="live"),
        reward=MixedTeachers(),
        model=model,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=0.0,
    )
    trainer.train()
    inputs = trainer._buffered_inputs[0]
    model.train()
    rows = inputs["sdpo_sample_mask"].bool()
    first = trainer._teacher_hidden(model, inputs, rows)
    second = trainer._teacher_hidden(model, inputs, rows)
    assert torch.equal(first, second)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    length = inputs["completion_ids"].size(1)
    noisy = [trainer._completion_hidden(model, ids, attention, length).detach() for _ in range(2)]
    assert not torch.equal(*noisy)  # the student keeps its dropout


def test_decoder_padding_flag_set_by_unsloth_is_restored(tmp_path):
    """The loss sets unsloth's `_unsloth_keep_padding_mask` around its decoder calls and puts back any value
    unsloth itself had set on the module (its distillation paths set and clear it too)."""
    trainer = make_trainer(tmp_path, SDPOConfig(), reward=MixedTeachers(), max_steps=1)
    decoder = trainer.model.get_base_model().get_decoder()
    decoder._unsloth_keep_padding_mask = False
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer._completion_hidden(trainer.model, ids, torch.ones_like(ids), 2)
    assert decoder._unsloth_keep_padding_mask is False
    del decoder._unsloth_keep_padding_mask
    trainer._completion_hidden(trainer.model, ids, torch.ones_like(ids), 2)
    assert "_unsloth_keep_padding_mask" not in decoder.__dict__


def test_stable_shapes_leave_the_hidden_states_unchanged(tmp_path):
    """A micro-batch without padding gets a masked pad column, a single row is run as two: the hidden states
    at the completion positions are those of the plain forward (same weights, same tokens)."""
    trainer = make_trainer(tmp_path, SDPOConfig())
    model = trainer.model
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 40, (3, 9))
    full = torch.ones_like(ids)
    padded = full.clone()
    padded[1, :2] = 0  # one left-padded row
    with torch.no_grad():
        for batch, mask in ((ids, full), (ids[:1], full[:1]), (ids, padded), (ids[1:2], padded[1:2])):
            trainer.stable_shapes = True
            stable = trainer._completion_hidden(model, batch, mask, 4)
            trainer.stable_shapes = False
            plain = trainer._completion_hidden(model, batch, mask, 4)
            assert stable.shape == plain.shape == (batch.size(0), 4, plain.size(-1))
            torch.testing.assert_close(stable, plain, rtol=1e-5, atol=1e-5)
