"""Preflight on the tiny model (CPU, offline): verdicts, shares, and no change to the weights."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sdpo_unsloth.model import load_model
from sdpo_unsloth.preflight import NOTHING_TO_LEARN, PreflightError, preflight
from sdpo_unsloth.train_config import SDPO_DEFAULTS


def rows(n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{a}+1="}], "answer": str(a + 1)} for a in range(n)]


def always_wrong(prompts, completions, **kwargs):
    """0 for everything, and no feedback: nothing for SDPO's teacher to go on."""
    return [0.0] * len(completions)


class WrongWithFeedback:
    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        self.last_feedback = [f"Wrong. The answer is {a}." for a in answer]
        return [0.0] * len(completions)


def first_right(prompts, completions, **kwargs):
    """1.0 for the first sample of each group of 4: every group has one success."""
    return [float(i % 4 == 0) for i in range(len(completions))]


SMALL = {"num_prompts": 2, "num_generations": 4, "max_completion_length": 4, "lora_r": 4, "seed": 5}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, load_in_4bit=False, lora_r=4, gradient_checkpointing=False, seed=0)


def test_no_success_and_no_feedback_is_nothing_to_learn(tiny):
    model, tokenizer = tiny
    before = weights(model)
    options = {k: v for k, v in SMALL.items() if k != "lora_r"}
    report = preflight(model, rows(), always_wrong, tokenizer=tokenizer, **options)
    assert report.nothing_to_learn
    assert (report.pass_rate, report.with_feedback, report.no_teacher) == (0.0, 0.0, 1.0)
    assert report.groups_with_demo == 0.0 and report.teacher_student_kl is None and report.samples == 8
    text = report.summary()
    assert NOTHING_TO_LEARN in text and "add feedback to the reward" in text
    assert (
        "easier prompts" in text
        and "max_completion_length=4" in text
        and f"hybrid_mode='{SDPO_DEFAULTS['hybrid_mode']}'" in text
    )
    after = weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_feedback_gives_every_sample_a_teacher_and_a_divergence(tiny):
    model, tokenizer = tiny
    before = weights(model)
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)  # not preflight's own seed (3407)
    rng_before = torch.random.get_rng_state()
    py_before, np_before = random.getstate(), np.random.get_state()[1].copy()
    options = {k: v for k, v in SMALL.items() if k != "lora_r"}
    report = preflight(model, rows(), WrongWithFeedback(), tokenizer=tokenizer, **options)
    assert not report.nothing_to_learn
    assert (report.pass_rate, report.with_feedback, report.no_teacher) == (0.0, 1.0, 0.0)
    assert report.distilled == 1.0  # equal rewards: the per-group hybrid distils every group
    assert report.teacher_student_kl is not None and report.teacher_student_kl > 0  # random LoRA-free model
    text = report.summary()
    assert (
        "samples with feedback:        100%" in text
        and "the distillation term trains 100% of the samples" in text
    )
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # teacher forwards, no step
    assert torch.equal(rng_before, torch.random.get_rng_state())  # sampling ran on a forked generator
    # and the trainer's constructor (transformers seeds every generator) left the user's generators as they were
    assert random.getstate() == py_before and (np.random.get_state()[1] == np_before).all()


def test_successes_become_demonstrations(tiny_model_dir):
    import sdpo_unsloth

    # the package-level name works even after the module was imported (it is callable)
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    report = sdpo_unsloth.preflight(tiny_model_dir, rows(), first_right, backend="transformers", **SMALL)
    assert torch.equal(before, torch.random.get_rng_state())  # loading by name reseeds nothing of ours
    assert report.pass_rate == 0.25 and report.groups_with_demo == 1.0
    assert report.groups_with_reward_spread == 1.0
    assert report.no_teacher == 0.25  # the successful sample itself has no other success to learn from
    assert not report.nothing_to_learn
    # train()'s default, the per-group hybrid: every group has a reward spread, so GRPO trains them all and
    # no teacher is used; the report says so instead of "SDPO has a signal"
    assert report.grpo_weight == 1.0 and report.distilled == 0.0 and report.teacher_student_kl is None
    text = report.summary()
    assert "GRPO has a signal in 100% of the prompt groups" in text and "trains 0% of the samples" in text
    assert (
        "n/a (no sample is distilled)" in text
        and "grpo_weight=0.0" in text
        and "SDPO has a signal" not in text
    )
    assert "groups with a reward spread:  100%" in text and "samples distilled:            0%" in text


def test_pure_sdpo_distils_every_sample_with_a_teacher(tiny):
    from sdpo_unsloth import SDPOConfig

    model, tokenizer = tiny
    options = {k: v for k, v in SMALL.items() if k != "lora_r"}
    pure = SDPOConfig(grpo_weight=0.0)
    report = preflight(model, rows(), first_right, tokenizer=tokenizer, sdpo_config=pure, **options)
    assert (report.no_teacher, report.distilled) == (0.25, 0.75) and report.teacher_student_kl is not None
    assert "75% of the samples have a teacher; SDPO has a signal" in report.summary()


def test_train_stops_before_training_when_there_is_nothing_to_learn(tmp_path, tiny_model_dir):
    from sdpo_unsloth import train

    out = tmp_path / "run"
    with pytest.raises(PreflightError, match=NOTHING_TO_LEARN) as caught:
        train(
            tiny_model_dir,
            rows(),
            always_wrong,
            str(out),
            max_steps=1,
            num_generations=4,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_completion_length=4,
            lora_r=4,
            eval_size=0,
            progress=False,
            export_formats=("lora",),
        )
    assert "preflight=False" in str(caught.value) and caught.value.report.no_teacher == 1.0
    assert not (out / "adapter").exists() and not (out / "train_result.json").exists()


def test_preflight_command_prints_the_report(capsys, tmp_path, tiny_model_dir):
    from sdpo_unsloth import cli

    common = ["--model", tiny_model_dir, "--num-prompts", "2", "--num-generations", "2"]
    common += ["--max-completion-length", "4", "--lora-r", "4", "--backend", "transformers"]
    # a gym task: its verifier's misses come with feedback, so every sample has a teacher
    code = cli.main(["preflight", "--dataset", "gym:basic_arithmetic?max_terms=2&max_digits=1", *common])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SDPO preflight on 2 prompts x 2 samples" in out and "samples with feedback:        100%" in out
    (tmp_path / "score.py").write_text(
        "def zero(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1="}) for i in range(4)))
    code = cli.main(
        ["preflight", "--dataset", str(data), "--rewards", f"{tmp_path / 'score.py'}:zero", *common]
    )
    out = capsys.readouterr().out
    assert code == 1 and NOTHING_TO_LEARN in out and "add feedback to the reward" in out


def test_with_sdpo_off_only_the_reward_spread_counts(tiny):
    from sdpo_unsloth import SDPOConfig

    model, tokenizer = tiny
    options = {k: v for k, v in SMALL.items() if k != "lora_r"}
    grpo = SDPOConfig(enabled=False)
    flat = preflight(model, rows(), always_wrong, tokenizer=tokenizer, sdpo_config=grpo, **options)
    assert flat.nothing_to_learn and flat.grpo_weight == 1.0 and "GRPO sees equal rewards" in flat.summary()
    varied = preflight(model, rows(), first_right, tokenizer=tokenizer, sdpo_config=grpo, **options)
    assert not varied.nothing_to_learn and varied.groups_with_reward_spread == 1.0


@pytest.mark.parametrize(("model", "expected"), [("embedded", False), ("some/hub-model", True)])
def test_preflight_loads_the_base_as_train_does_on_a_gpu(monkeypatch, load_stopped_on, model, expected):
    """On a (pretended) GPU: nf4 for a named model, 16-bit for the embedded one, as `train()` (stopped at
    `from_pretrained`)."""
    import sdpo_unsloth.preflight as preflight_module
    from sdpo_unsloth.bootstrap import Backend

    seen = load_stopped_on("cuda")
    monkeypatch.setattr(preflight_module, "bootstrap", lambda *a: Backend("transformers", "cuda", "test"))
    with pytest.raises(RuntimeError, match="stop here"):
        preflight(model, "addition")
    assert seen["path"] == model and seen["load_in_4bit"] is expected
