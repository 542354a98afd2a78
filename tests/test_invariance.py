"""The SDPO update does not depend on how a generation batch is split: checked through `trainer.train()`.

Every run generates the same rollouts (8 per generation batch, sampled from the same seed: the batch
is generated whole whatever the split), trains with plain SGD, and is compared with the run that
takes the same optimizer steps on unsplit micro-batches. The reward leaves some failed samples
without feedback, so samples without a teacher fall unevenly into the micro-batches: the case that
breaks a per-micro-batch mean. Tolerance: the weight *updates* agree to rtol 1e-4 and the logged losses
to rtol 1e-3 (float32 sums in another order; the divergences are ~1e-5, so their float32 rounding shows),
while a normalisation error shows as a factor (2x for GA 2).
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import adapter_tensors, make_trainer

from sdpo_unsloth import SDPOConfig


class SomeFeedback:
    """Succeeds on a digit; feedback for every other failure only (the rest get no teacher without a demo)."""

    __name__ = "some_feedback"

    def __init__(self):
        self.last_feedback: list[str] = []
        self.seen: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        self.seen += texts
        ok = [any(ch.isdigit() for ch in t) for t in texts]
        self.last_feedback = [
            "" if good or i % 2 else f"No number. The answer is {a}."
            for i, (good, a) in enumerate(zip(ok, answer, strict=True))
        ]
        return [float(good) for good in ok]


def run(tmp_path, name: str, sdpo: SDPOConfig, batch: int, accumulation: int, reward=None, **overrides):
    """Train with SGD; (student update, teacher update, loss logs, completions the reward saw)."""
    reward = reward if reward is not None else SomeFeedback()
    trainer = make_trainer(
        tmp_path / name,
        sdpo,
        reward=reward,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=2.0,
        max_steps=overrides.pop("max_steps", 2),
        **overrides,
    )
    student0 = adapter_tensors(trainer.model, "default")
    trainer.train()
    student = {k: v - student0[k] for k, v in adapter_tensors(trainer.model, "default").items()}
    teacher = {k: v - student0[k] for k, v in adapter_tensors(trainer.model, "sdpo_teacher").items()}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return student, teacher, logs, reward.seen


def assert_same_update(reference, other):
    student_a, teacher_a, logs_a, seen_a = reference
    student_b, teacher_b, logs_b, seen_b = other
    assert seen_a == seen_b  # the same rollouts, so the comparison is about the update alone
    scale = max(float(v.abs().max()) for v in student_a.values())
    assert scale > 1e-4  # the update is real
    for ours, theirs in ((student_a, student_b), (teacher_a, teacher_b)):
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4 * scale)
    assert len(logs_a) == len(logs_b) > 0
    for entry_a, entry_b in zip(logs_a, logs_b, strict=True):
        for key in ("loss", "sdpo/distill_loss", "sdpo/teacher_student_kl", "sdpo/grpo_loss", "kl"):
            if key in entry_a or key in entry_b:
                assert entry_a[key] == pytest.approx(entry_b[key], rel=1e-3, abs=1e-9), key


CONFIGS = {
    "sdpo": SDPOConfig(teacher_update_rate=0.5),
    "hybrid": SDPOConfig(teacher_update_rate=0.5, grpo_weight=0.5),
    "sampled_token": SDPOConfig(teacher_update_rate=0.5, alpha=1.0, sampled_token=True),
    "anchor": SDPOConfig(
        teacher_update_rate=0.5, grpo_weight=1.0, hybrid_mode="per_group", distill_anchor=2.0
    ),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_accumulation_gives_the_unsplit_update(tmp_path, config):
    whole = run(tmp_path, "ga1", CONFIGS[config], batch=8, accumulation=1)
    assert_same_update(whole, run(tmp_path, "ga2", CONFIGS[config], batch=4, accumulation=2))
    if config == "sdpo":
        assert_same_update(whole, run(tmp_path, "ga4", CONFIGS[config], batch=2, accumulation=4))
    if config == "anchor":  # the anchor's KL is in the second step's update (0 at the first: p = p_ref)
        assert [e.get("kl", 0.0) > 0 for e in whole[2]] == [False, True]


def test_steps_per_generation_above_accumulation(tmp_path):
    """Two optimizer steps per generation batch (the second off-policy): micro-batches of 4, or 2 x 2."""
    sdpo = CONFIGS["sdpo"]
    unsplit = run(tmp_path, "a", sdpo, batch=4, accumulation=1, steps_per_generation=2)
    assert_same_update(unsplit, run(tmp_path, "b", sdpo, batch=2, accumulation=2, steps_per_generation=4))


def test_two_iterations_per_generation(tmp_path):
    sdpo = CONFIGS["sdpo"]
    unsplit = run(tmp_path, "a", sdpo, batch=8, accumulation=1, num_iterations=2)
    assert_same_update(unsplit, run(tmp_path, "b", sdpo, batch=4, accumulation=2, num_iterations=2))


class WrongWithFeedback:
    """Every sample fails with feedback: every sample has a teacher, so a micro-batch of B has B of them."""

    __name__ = "wrong_with_feedback"

    def __init__(self):
        self.last_feedback: list[str] = []
        self.seen: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        self.seen += [c[-1]["content"] for c in completions]
        self.last_feedback = [f"Wrong. The answer is {a}." for a in answer]
        return [0.0] * len(completions)


@pytest.mark.parametrize(("accumulation", "steps_per_generation"), [(3, 2), (4, 3), (2, 4), (4, 2)], ids=str)
def test_every_micro_batch_of_a_step_weighs_alike(tmp_path, monkeypatch, accumulation, steps_per_generation):
    """The distillation divides each micro-batch by the step's count of sequences with a teacher. With 4 per
    micro-batch that is 4 x accumulation for every micro-batch, also where a step spans a generation batch in
    part (accumulation 3 or 4 over generation batches of 2 or 3 micro-batches: the part not yet generated is
    estimated from the part at hand; it was counted once per generation batch, 16/16/8 for 12)."""
    from sdpo_unsloth.trainer import SDPOTrainer

    seen: list[float] = []
    real = SDPOTrainer._window_counts

    def recorded(self, inputs):
        seen.append(real(self, inputs))
        return seen[-1]

    monkeypatch.setattr(SDPOTrainer, "_window_counts", recorded)
    steps = 2
    run(
        tmp_path,
        "a",
        CONFIGS["sdpo"],
        batch=4,
        accumulation=accumulation,
        reward=WrongWithFeedback(),
        steps_per_generation=steps_per_generation,
        max_steps=steps,
    )
    assert seen == [4.0 * accumulation] * (accumulation * steps)
