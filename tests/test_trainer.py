"""SDPOTrainer on a tiny Qwen2-architecture model built from a config (CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from sdpo_unsloth import SDPOConfig, SDPOTrainer
from sdpo_unsloth.adapters import adapter_parameter_count, adapter_scope
from sdpo_unsloth.model import default_lora_config
from sdpo_unsloth.rewards import RewardError

TEACHER = "sdpo_teacher"


def dataset(n: int = 16) -> Dataset:
    rows = [
        {
            "prompt": [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{a}+{b}="}],
            "answer": str(a + b),
        }
        for a in range(4)
        for b in range(4)
    ]
    return Dataset.from_list(rows[:n])


class HasDigit:
    """Succeeds when the completion contains a digit (about half of random tiny-model samples)."""

    __name__ = "has_digit"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        self.last_feedback = [
            "" if any(ch.isdigit() for ch in t) else f"No number. The answer is {a}."
            for t, a in zip(texts, answer, strict=True)
        ]
        return [float(any(ch.isdigit() for ch in t)) for t in texts]


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    options = dict(
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=6,
        max_steps=3,
        learning_rate=2e-2,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        temperature=1.0,
        seed=7,
        data_seed=7,
        disable_tqdm=True,
    )
    options.update(overrides)
    return GRPOConfig(**options)


def make_trainer(tmp_path, sdpo_config=None, reward=None, model=None, **overrides):
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    return SDPOTrainer(
        model=model if model is not None else make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, **overrides),
        sdpo_config=sdpo_config or SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[reward or HasDigit()],
        train_dataset=dataset(),
    )


def adapter_tensors(model, adapter: str) -> dict[str, torch.Tensor]:
    marker = f".{adapter}."
    return {n.replace(marker, "."): p.detach().clone() for n, p in model.named_parameters() if marker in n}


class Recorder:
    """Snapshots the student adapter after every optimizer step."""

    def __init__(self):
        self.students: list[dict[str, torch.Tensor]] = []

    def callback(self, trainer):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                recorder.students.append(adapter_tensors(trainer.model, "default"))

        return _Callback()


def test_sdpo_steps_move_student_and_ema_teacher_and_leave_base_untouched(tmp_path):
    trainer = make_trainer(tmp_path, SDPOConfig(teacher_update_rate=0.3))
    model = trainer.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    student0 = adapter_tensors(model, "default")
    assert all(torch.equal(student0[k], v) for k, v in adapter_tensors(model, TEACHER).items())
    recorder = Recorder()
    trainer.add_callback(recorder.callback(trainer))
    trainer.train()

    students = recorder.students
    assert len(students) == 3
    moved = [k for k in student0 if not torch.equal(student0[k], students[-1][k])]
    assert len(moved) == len(student0)  # every student LoRA tensor trained
    # EMA: t_k = (1 - r) t_{k-1} + r s_k with t_0 = s_0
    expected = dict(student0)
    for snapshot in students:
        expected = {k: 0.7 * expected[k] + 0.3 * snapshot[k] for k in expected}
    teacher = adapter_tensors(model, TEACHER)
    for k in expected:
        torch.testing.assert_close(teacher[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(teacher[k], students[-1][k]) for k in teacher)  # lags the student
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    logged = {k for entry in trainer.state.log_history for k in entry}
    for key in (
        "sdpo/distill_loss",
        "sdpo/frac_with_demo",
        "sdpo/frac_with_feedback",
        "sdpo/frac_masked",
        "sdpo/frac_distilled",
        "sdpo/is_clip_frac",
        "sdpo/teacher_student_kl",
        "sdpo/teacher_update_norm",
    ):
        assert key in logged, key


def test_teacher_costs_exactly_one_adapter_and_no_second_model(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    model = trainer.model
    base_count = sum(p.numel() for p in make_tiny_model(len(make_tiny_tokenizer())).parameters())
    student = adapter_parameter_count(model, "default")
    teacher = adapter_parameter_count(model, TEACHER)
    total = sum(p.numel() for p in model.parameters())
    assert teacher == student > 0
    assert total == base_count + student + teacher
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{TEACHER}." in n)
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters())


def first_inputs(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def test_the_teacher_really_is_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, SDPOConfig(distillation_topk=None))
    inputs = first_inputs(trainer)
    assert inputs["sdpo_sample_mask"].sum() > 0
    model = trainer.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss = trainer._compute_loss(model, inputs).detach()
    assert float(loss) >= 0
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():  # perturb the teacher adapter only
        for n, p in model.named_parameters():
            if f"lora_B.{TEACHER}." in n:
                p.add_(torch.randn_like(p) * 0.5)
    perturbed = trainer._compute_loss(model, inputs).detach()
    assert abs(float(perturbed) - float(loss)) > 1e-4
    student_before = adapter_tensors(model, "default")
    trainer._compute_loss(model, inputs)
    assert all(torch.equal(v, adapter_tensors(model, "default")[k]) for k, v in student_before.items())


def test_adapter_scope_restores_state_when_the_block_raises(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    model = trainer.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for target in (TEACHER, None):
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), adapter_scope(model, target):
            assert model.active_adapter == (target or "default")
            raise RuntimeError("boom")
        assert model.active_adapter == "default"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_adapter_scope_switches_as_peft_does(tmp_path):
    # The fast switch (each LoRA layer, no module walk) gives the forward PEFT's own set_adapter gives.
    from sdpo_unsloth.adapters import _switchable_layers

    model = make_trainer(tmp_path, max_steps=1).model
    assert _switchable_layers(model) is not None  # plain LoRA: the fast switch applies
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{TEACHER}." in name and "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.1)  # a teacher that differs from the student
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with adapter_scope(model, TEACHER):
            fast = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        model.set_adapter(TEACHER)
        peft = model(input_ids=ids).logits
        model.set_adapter("default")
    assert torch.equal(fast, peft) and not torch.allclose(fast, student)
    assert torch.equal(after, student)  # the student is back


def test_teacher_module_caches_keep_no_model_alive(tmp_path):
    # adapter_scope, dropout_off and checkpointing_off remember modules per model; a finished trainer's model
    # (and its decoder, which is one of its own checkpointing modules) must still be freed.
    import gc
    import weakref

    from sdpo_unsloth import adapters

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    model = trainer.model
    refs = [weakref.ref(model), weakref.ref(model.get_base_model().get_decoder())]
    assert all(r() in adapters._FOUND for r in refs)  # the caches were filled by the teacher forwards
    del trainer, model
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_run_preflight_leaves_the_random_generators_as_they_were(tmp_path):
    # train() runs it on its own trainer before training: sampling must not move the generators training uses.
    import random

    import numpy as np

    from sdpo_unsloth.preflight import run_preflight

    trainer = make_trainer(tmp_path, max_steps=1)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    before = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    run_preflight(trainer, [dict(dataset()[0])])
    assert torch.equal(before[0], torch.random.get_rng_state())
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_ema_with_rate_zero_equals_frozen(tmp_path):
    # Each trainer is built right before it trains: the Trainer seeds the global RNG at construction.
    initial = adapter_tensors(make_trainer(tmp_path / "c").model, "default")
    ema = make_trainer(tmp_path / "a", SDPOConfig(teacher_mode="ema", teacher_update_rate=0.0))
    ema.train()
    frozen = make_trainer(tmp_path / "b", SDPOConfig(teacher_mode="frozen"))
    assert adapter_parameter_count(frozen.model, TEACHER) == 0  # frozen needs no teacher adapter
    frozen.train()
    a, b = adapter_tensors(ema.model, "default"), adapter_tensors(frozen.model, "default")
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["live", "trust_region"])
def test_other_teacher_modes_train(tmp_path, mode):
    trainer = make_trainer(tmp_path, SDPOConfig(teacher_mode=mode, teacher_update_rate=0.5), max_steps=1)
    before = adapter_tensors(trainer.model, "default")
    trainer.train()
    after = adapter_tensors(trainer.model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_disabled_is_plain_grpo_without_teacher_cost(tmp_path):
    tokenizer = make_tiny_tokenizer()
    sdpo = make_trainer(tmp_path / "s", SDPOConfig(enabled=False), learning_rate=1e-1)
    assert adapter_parameter_count(sdpo.model, TEACHER) == 0
    sdpo.train()
    torch.manual_seed(0)
    plain = GRPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path / "p", learning_rate=1e-1),
        processing_class=tokenizer,
        reward_funcs=[HasDigit()],
        train_dataset=dataset(),
        peft_config=default_lora_config(),
    )
    plain.train()
    a, b = adapter_tensors(sdpo.model, "default"), adapter_tensors(plain.model, "default")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not any(k.startswith("sdpo/") for entry in sdpo.state.log_history for k in entry)


def test_broken_reward_stops_training_with_its_name(tmp_path):
    def returns_dicts(prompts, completions, **kwargs):
        return [{"score": 0.0} for _ in completions]

    trainer = make_trainer(tmp_path, reward=returns_dicts, max_steps=1)
    with pytest.raises(RewardError, match=r"'returns_dicts'.*list\[float\], not list\[dict\]"):
        trainer.train()


def test_exported_model_has_no_teacher(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and not any(TEACHER in k for k in keys)
    assert not (out / TEACHER).exists()


def test_resume_continues_with_the_same_teacher(tmp_path):
    """4 steps straight vs 2 steps, a checkpoint, and 2 resumed steps: same student and teacher."""
    straight = make_trainer(tmp_path / "a", SDPOConfig(teacher_update_rate=0.3), max_steps=4)
    straight.train()
    first = make_trainer(
        tmp_path / "b", SDPOConfig(teacher_update_rate=0.3), max_steps=4, save_strategy="steps", save_steps=2
    )
    first.train()  # writes checkpoint-2 (and checkpoint-4)
    checkpoint = tmp_path / "b" / "run" / "checkpoint-2"
    assert (checkpoint / "sdpo_teacher.safetensors").exists()
    assert not any(
        TEACHER in k
        for k in __import__("safetensors.torch").torch.load_file(
            str(checkpoint / "adapter_model.safetensors")
        )
    )
    resumed = make_trainer(tmp_path / "c", SDPOConfig(teacher_update_rate=0.3), max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for adapter in ("default", TEACHER):
        a, b = adapter_tensors(straight.model, adapter), adapter_tensors(resumed.model, adapter)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # tolerance: fp32 reordering only
    assert os.path.exists(checkpoint / "trainer_state.json")


def test_a_resume_with_other_sdpo_settings_names_them(tmp_path):
    """Each checkpoint keeps the SDPOConfig it was trained with; resuming with other values that decide the
    update (here the KL anchor, as when train()'s default changed) says which, and from a checkpoint without the
    record (an earlier version) says it cannot check. Settings that only pace or watch a run are not named."""
    import json
    import warnings

    from sdpo_unsloth.checkpoints import SETTINGS_FILE

    sdpo = SDPOConfig(teacher_update_rate=0.3)
    first = make_trainer(tmp_path / "a", sdpo, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "a" / "run" / "checkpoint-2"
    assert json.loads((checkpoint / SETTINGS_FILE).read_text()) == sdpo.to_dict()

    def resume(name, config):
        trainer = make_trainer(tmp_path / name, config, max_steps=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=str(checkpoint))
        assert trainer.state.global_step == 3  # it trained on from the checkpoint
        return [str(w.message) for w in caught if "SDPOConfig" in str(w.message)]

    same = dict(
        teacher_update_rate=0.3, diagnostics_samples=0, logit_chunk_size=64
    )  # pacing and watching only
    assert resume("same", SDPOConfig(**same)) == []
    (changed,) = resume("other", SDPOConfig(**same, distill_anchor=0.1, alpha=1.0))
    assert "checkpoint-2 was trained with other SDPOConfig settings" in changed
    assert "alpha: 0.5 -> 1.0" in changed and "distill_anchor: 0.0 -> 0.1" in changed
    assert "diagnostics_samples" not in changed and "logit_chunk_size" not in changed
    (checkpoint / SETTINGS_FILE).unlink()  # saved by an earlier version
    (unknown,) = resume("old", SDPOConfig(teacher_update_rate=0.3, distill_anchor=0.1))
    assert f"has no {SETTINGS_FILE}" in unknown and "pass distill_anchor=0.0" in unknown


@pytest.mark.parametrize(
    "options",
    [dict(steps_per_generation=2, gradient_accumulation_steps=1), dict(num_iterations=2)],
    ids=["two_steps_per_generation", "two_iterations"],
)
def test_resume_inside_a_generation_batch_equals_an_uninterrupted_run(tmp_path, options):
    """One generation batch serves two optimizer steps: a checkpoint after the first keeps TRL's buffer and
    micro-step counter, so the resumed run trains the second step on the same slice as the uninterrupted run
    (without them it generated again: the helper's audit measured a 0.047 difference in the student)."""
    from sdpo_unsloth.checkpoints import GENERATION_FILE

    sdpo = SDPOConfig(teacher_update_rate=0.3)
    straight = make_trainer(tmp_path / "a", sdpo, max_steps=4, **options)
    straight.train()
    first = make_trainer(tmp_path / "b", sdpo, max_steps=4, save_strategy="steps", save_steps=1, **options)
    first.train()
    run = tmp_path / "b" / "run"
    buffer = GENERATION_FILE.format(rank=0)
    assert (run / "checkpoint-1" / buffer).exists() and (run / "checkpoint-3" / buffer).exists()
    assert not (run / "checkpoint-2" / buffer).exists()  # at a generation boundary there is nothing to keep
    resumed = make_trainer(tmp_path / "c", sdpo, max_steps=4, **options)
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    for adapter in ("default", TEACHER):
        a, b = adapter_tensors(straight.model, adapter), adapter_tensors(resumed.model, adapter)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # tolerance: fp32 reordering only
    (run / "checkpoint-3" / buffer).unlink()  # e.g. a checkpoint written by an older version
    late = make_trainer(tmp_path / "d", sdpo, max_steps=4, **options)
    with pytest.warns(UserWarning, match="saved inside a generation batch"):
        late._load_from_checkpoint(str(run / "checkpoint-3"))
    other = make_trainer(tmp_path / "e", sdpo, max_steps=4, **{**options, "per_device_train_batch_size": 8})
    with pytest.warns(UserWarning, match="other batch settings or process count"):
        other._load_from_checkpoint(str(run / "checkpoint-1"))  # its buffer has another layout: not used
    assert other._buffered_inputs is None and other._step == 0


class FailsOnCall(HasDigit):
    """HasDigit that raises on its `n`-th call (an API error mid-run)."""

    def __init__(self, n: int | None):
        super().__init__()
        self.n, self.calls = n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise ConnectionError("the judge's API is down")
        return super().__call__(*args, **kwargs)


def test_a_checkpoint_saved_after_a_reward_error_mid_step_resumes_exactly(tmp_path):
    """gradient_accumulation_steps 3 over generation batches of 2 micro-batches: the third generation starts in
    the middle of step 2. A reward error there leaves TRL's micro-step counter past step 1, whose last
    micro-batch is the second half of the second generation: the checkpoint of step 1 (what train() writes on a
    reward error) keeps that buffer, and resuming from it gives the uninterrupted run's weights."""
    from sdpo_unsloth.rewards import RewardError

    options = dict(per_device_train_batch_size=4, gradient_accumulation_steps=3, steps_per_generation=2)
    sdpo = SDPOConfig(teacher_update_rate=0.3)
    straight = make_trainer(tmp_path / "a", sdpo, reward=FailsOnCall(None), max_steps=3, **options)
    straight.train()
    broken = make_trainer(tmp_path / "b", sdpo, reward=FailsOnCall(3), max_steps=3, **options)
    with pytest.raises(RewardError, match="the judge's API is down"):
        broken.train()
    assert broken.state.global_step == 1 and broken._step == 4  # one micro-batch of step 2 ran
    broken.save_completed_steps()  # what train() does on a reward error
    checkpoint = tmp_path / "b" / "run" / "checkpoint-1"
    resumed = make_trainer(tmp_path / "c", sdpo, reward=FailsOnCall(None), max_steps=3, **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for adapter in ("default", TEACHER):
        a, b = adapter_tensors(straight.model, adapter), adapter_tensors(resumed.model, adapter)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_refuses_the_step(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    before = param.detach().clone()
    param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.raises(
        FloatingPointError, match="non-finite gradient at step 1: the optimizer step was refused"
    ):
        trainer.train()
    assert torch.equal(param.detach(), before), f"{name} was updated from a NaN gradient"
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_ema_skips_steps_the_optimizer_skipped(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=2)
    teacher0 = adapter_tensors(trainer.model, TEACHER)
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    trainer.train()
    teacher = adapter_tensors(trainer.model, TEACHER)
    assert all(torch.equal(teacher0[k], teacher[k]) for k in teacher0)
    assert any("sdpo/teacher_update_skipped" in entry for entry in trainer.state.log_history)


def test_total_reward_skips_none_like_trl(tmp_path):
    def first(prompts, completions, **kwargs):
        return [1.0, None, None, 0.5] * (len(completions) // 4)

    def second(prompts, completions, **kwargs):
        return [None, 2.0, None, 0.25] * (len(completions) // 4)

    trainer = make_trainer(tmp_path, reward=first, max_steps=1)
    trainer._checked_rewards.append(type(trainer._checked_rewards[0])(second))
    trainer.reward_weights = torch.tensor([1.0, 0.5])
    for reward in trainer._checked_rewards:
        reward(prompts=["q"] * 4, completions=["a"] * 4)
    totals = trainer._total_rewards(4)
    assert totals[0] == 1.0 and totals[1] == 1.0 and totals[3] == 0.625
    assert totals[2] != totals[2]  # all None: NaN, never a demonstration


def test_long_demonstration_is_cut_never_the_template(tmp_path):
    from sdpo_unsloth.teacher import build_reprompt

    trainer = make_trainer(tmp_path, SDPOConfig(max_reprompt_length=120), max_steps=1)
    cfg = trainer.sdpo_config
    prompt = [{"role": "user", "content": "1+2="}]
    reprompt = build_reprompt(
        prompt,
        demo="3" * 400,
        feedback=None,
        reprompt_template=cfg.reprompt_template,
        solution_template=cfg.solution_template,
        feedback_template=cfg.feedback_template,
    )
    ids = trainer._fit_teacher_prompt(reprompt, prompt)
    text = trainer.processing_class.decode(ids)
    assert len(ids) <= 120
    assert "1+2=\nCorrect solution:\n\n333" in text
    assert text.endswith("\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n")


def test_resume_without_teacher_file_restarts_teacher_from_student(tmp_path):
    first = make_trainer(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "a" / "run" / "checkpoint-2"
    (checkpoint / "sdpo_teacher.safetensors").unlink()
    resumed = make_trainer(tmp_path / "b", max_steps=2)
    with pytest.warns(UserWarning, match="the EMA teacher restarts from the resumed student"):
        resumed._load_from_checkpoint(str(checkpoint))
    student, teacher = adapter_tensors(resumed.model, "default"), adapter_tensors(resumed.model, TEACHER)
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert all(not p.requires_grad for n, p in resumed.model.named_parameters() if f".{TEACHER}." in n)
    assert resumed.model.active_adapter == "default"


class _OwnLossGRPOTrainer(GRPOTrainer):
    """Like unsloth's patched GRPOTrainer: `compute_loss` is its own GRPO loss and never calls `_compute_loss`."""

    own_loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _OwnLossGRPOTrainer.own_loss_calls += 1
        logits = model(input_ids=inputs["completion_ids"]).logits
        return logits.float().mean() * 0.0


@pytest.mark.parametrize("enabled", [True, False])
def test_sdpo_loss_runs_when_the_parent_replaces_compute_loss(tmp_path, enabled):
    """Found on the GPU: under unsloth the SDPO loss never ran (loss 0, no sdpo/distill_loss) because
    unsloth's compute_loss bypasses `_compute_loss`. SDPOTrainer must own `compute_loss` when enabled."""
    from sdpo_unsloth.trainer import _SDPOMixin

    cls = type("OnOwnLoss", (_SDPOMixin, _OwnLossGRPOTrainer), {})
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    _OwnLossGRPOTrainer.own_loss_calls = 0
    trainer = cls(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, max_steps=1),
        sdpo_config=SDPOConfig(enabled=enabled),
        processing_class=tokenizer,
        reward_funcs=[HasDigit()],
        train_dataset=dataset(),
    )
    student0 = adapter_tensors(trainer.model, "default")
    trainer.train()
    distill = [e["sdpo/distill_loss"] for e in trainer.state.log_history if "sdpo/distill_loss" in e]
    moved = any(not torch.equal(v, adapter_tensors(trainer.model, "default")[k]) for k, v in student0.items())
    if enabled:
        assert _OwnLossGRPOTrainer.own_loss_calls == 0
        assert distill and distill[0] > 0
        assert moved
    else:  # plain GRPO keeps the parent's loss (here a zero loss: nothing moves)
        assert _OwnLossGRPOTrainer.own_loss_calls == 2  # GA 2: one call per micro-batch
        assert not distill and not moved


class _OwnTrainingStepGRPOTrainer(GRPOTrainer):
    """A parent whose training step computes its own loss and never calls `compute_loss` at all."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._prepare_inputs(inputs)
        loss = model(input_ids=inputs["completion_ids"]).logits.float().mean()
        self.accelerator.backward(loss)
        return loss.detach()


def test_a_parent_that_bypasses_the_sdpo_loss_stops_before_any_update(tmp_path):
    from sdpo_unsloth.trainer import _SDPOMixin

    cls = type("OnOwnStep", (_SDPOMixin, _OwnTrainingStepGRPOTrainer), {})
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    trainer = cls(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, max_steps=1),
        processing_class=tokenizer,
        reward_funcs=[HasDigit()],
        train_dataset=dataset(),
    )
    student0 = adapter_tensors(trainer.model, "default")
    with pytest.raises(RuntimeError, match=r"SDPO loss did not run.*_OwnTrainingStepGRPOTrainer.*doctor"):
        trainer.train()
    after = adapter_tensors(trainer.model, "default")
    assert all(torch.equal(v, after[k]) for k, v in student0.items())  # no optimizer step was taken


def test_logits_where_hidden_states_were_expected_are_named(tmp_path, monkeypatch):
    """A patched forward that hands back logits (unsloth's UNSLOTH_RETURN_HIDDEN_STATES, inverted) is caught."""
    from sdpo_unsloth.trainer import _SDPOMixin

    def logits_instead(self, model, ids, mask, length):
        return model(input_ids=ids, attention_mask=mask).logits[:, -length - 1 : -1, :]

    trainer = make_trainer(tmp_path, max_steps=1)
    monkeypatch.setattr(_SDPOMixin, "_completion_hidden", logits_instead)
    with pytest.raises(RuntimeError, match="hidden states of size 32 were expected"):
        trainer.train()


class Secret:
    """Gives feedback the teacher must never see when this reward is weighted 0."""

    __name__ = "secret"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.last_feedback = ["SECRET" for _ in completions]
        return [0.0 for _ in completions]


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_feedback_of_a_reward_weighted_zero_does_not_reach_the_teacher(tmp_path, weight):
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    trainer = SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(
            tmp_path,
            reward_weights=[1.0, weight],
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
        ),
        sdpo_config=SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[HasDigit(), Secret()],
        train_dataset=dataset(),
    )
    inputs = first_inputs(trainer)
    texts = tokenizer.batch_decode(inputs["sdpo_teacher_prompt_ids"])
    assert any("SECRET" in t for t in texts) == (weight != 0)


def test_async_reward_trains(tmp_path):
    import asyncio

    async def judge(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(any(ch.isdigit() for ch in c[-1]["content"])) for c in completions]

    trainer = make_trainer(tmp_path, reward=judge, max_steps=1)
    before = adapter_tensors(trainer.model, "default")
    trainer.train()
    after = adapter_tensors(trainer.model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_vllm_rollout_correction_scales_the_distillation_term(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    inputs = first_inputs(trainer)
    plain = float(trainer._compute_loss(trainer.model, inputs).detach())
    inputs["importance_sampling_ratio"] = torch.full_like(inputs["completion_mask"], 3.0, dtype=torch.float32)
    corrected = float(trainer._compute_loss(trainer.model, inputs).detach())
    assert plain > 0 and corrected == pytest.approx(3 * plain, rel=1e-5)


def test_unsloth_packed_old_logps_are_realigned():
    """Unsloth scores left-packed rows (prompt pads moved right) over the last L + max_left_pad positions."""
    from sdpo_unsloth.trainer import align_old_logps

    pad = 0
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    completion_ids = torch.tensor([[21, 22, 23], [24, 25, 0], [26, 27, 28]])
    rows = torch.cat([prompt_ids, completion_ids], dim=1)
    order = torch.argsort(rows != pad, dim=1, descending=True, stable=True)
    packed = rows.gather(1, order)  # unsloth's left_pack_padding
    max_left_pad = 2
    window = packed[:, -(completion_ids.size(1) + max_left_pad) :].float()  # "log-prob" = the token's own id
    inputs = {
        "completion_ids": completion_ids,
        "prompt_mask": (prompt_ids != pad).long(),
        "max_left_pad": torch.full((3, 1), max_left_pad),
    }
    aligned = align_old_logps(window, inputs)
    real = completion_ids != pad
    assert torch.equal(aligned[real], completion_ids[real].float())
    assert torch.equal(align_old_logps(completion_ids.float(), inputs), completion_ids.float())
    with pytest.raises(RuntimeError, match="layout is not known"):
        align_old_logps(
            window, {**inputs, "max_left_pad": None} if False else {"completion_ids": completion_ids}
        )


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: first factor
        b: second factor
    """
    return a * b


def told_the_answer(prompts, completions, answer, **kwargs):
    """Every sample fails with feedback: every sample has a teacher."""
    told_the_answer.last_feedback = [f"Wrong. The answer is {a}." for a in answer]
    return [0.0] * len(completions)


def test_the_teacher_prompt_carries_the_tool_schemas_of_the_student_prompt(tmp_path):
    """With `tools=`, TRL renders the tool schemas into the student's prompt; the teacher must see them too,
    or distillation pulls the student away from calling the tools it was offered."""
    import trl

    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = template.read_text()
    torch.manual_seed(0)
    trainer = SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, max_steps=1),
        sdpo_config=SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[told_the_answer],
        train_dataset=dataset(),
        tools=[multiply],
    )
    inputs = first_inputs(trainer)
    rows = inputs["sdpo_sample_mask"].nonzero().flatten().tolist()
    assert rows
    for row in rows:
        student = tokenizer.decode(inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()])
        teacher = tokenizer.decode(
            inputs["sdpo_teacher_prompt_ids"][row][inputs["sdpo_teacher_prompt_mask"][row].bool()]
        )
        assert '"name": "multiply"' in student and '"name": "multiply"' in teacher


def test_the_ema_teacher_follows_a_lora_on_the_embeddings(tmp_path):
    """An embedding's LoRA tensors are named `...lora_embedding_A.default` (the adapter name ends the path):
    the teacher copy, the EMA and the frozen flags must find them as they find `...lora_A.default.weight`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        make_tiny_model(len(make_tiny_tokenizer()), tied=False),
        LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
    )
    trainer = make_trainer(tmp_path, SDPOConfig(teacher_update_rate=1.0), model=model, max_steps=2)
    embedding = [n for n, _ in trainer.model.named_parameters() if "lora_embedding_A" in n]
    assert any(n.endswith(f".{TEACHER}") for n in embedding)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if n.endswith(f".{TEACHER}"))
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_embedding" in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    moved = 0.0
    for name in start:
        if name.endswith(".default"):  # rate 1: the teacher is the student after every step
            teacher = name[: -len("default")] + TEACHER
            torch.testing.assert_close(params[teacher], params[name], rtol=0, atol=0)
            moved = max(moved, float((params[name].detach() - start[name]).abs().max()))
    assert moved > 0  # the student's embedding LoRA trained


class FirstOfGroupWins:
    """The first sample of each group of 4 succeeds; the others fail with feedback naming the answer."""

    __name__ = "first_of_group"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        scores = [1.0 if i % 4 == 0 else 0.0 for i in range(len(completions))]
        self.last_feedback = [
            "" if s else f"Wrong. The answer is {a}." for s, a in zip(scores, answer, strict=True)
        ]
        return scores


def test_a_demonstration_with_no_room_falls_back_to_the_feedback(tmp_path):
    """When the question and the reprompt template alone fill max_reprompt_length, the demonstration is cut to
    nothing: the teacher saw 'Correct solution:' followed by nothing (and not the feedback, dropped because a
    demonstration existed). The sample now uses its own feedback, and the user is told."""
    trainer = make_trainer(
        tmp_path, SDPOConfig(max_reprompt_length=40), reward=FirstOfGroupWins(), per_device_train_batch_size=8
    )
    with pytest.warns(UserWarning, match="had no room for their demonstration"):
        inputs = first_inputs(trainer)
    rows = inputs["sdpo_sample_mask"].nonzero().flatten().tolist()
    assert len(rows) == 6  # the 6 failures (2 groups of 4, one success each), the successes have no teacher
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sdpo/frac")}
    assert logged == {  # the metrics count the rows as the loss sees them, the demonstrations dropped
        "sdpo/frac_with_demo": 0.0,
        "sdpo/frac_with_feedback": 0.75,
        "sdpo/frac_masked": 0.25,
        "sdpo/frac_distilled": 0.75,
    }
    for row in rows:
        ids = inputs["sdpo_teacher_prompt_ids"][row][inputs["sdpo_teacher_prompt_mask"][row].bool()]
        text = trainer.processing_class.decode(ids)
        assert "Wrong. The answer is" in text and "Correct solution:" not in text
    roomy = make_trainer(
        tmp_path / "roomy", SDPOConfig(), reward=FirstOfGroupWins(), per_device_train_batch_size=8
    )
    inputs = first_inputs(roomy)  # the default budget keeps the demonstration
    row = inputs["sdpo_sample_mask"].nonzero().flatten().tolist()[0]
    ids = inputs["sdpo_teacher_prompt_ids"][row][inputs["sdpo_teacher_prompt_mask"][row].bool()]
    assert "Correct solution:" in roomy.processing_class.decode(ids)
