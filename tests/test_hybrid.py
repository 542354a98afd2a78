"""The opt-in hybrid, a loss-level mix: loss = w * L_GRPO + (1 - w) * L_SDPO.

L_SDPO is the mean over sequences with a teacher of their token-mean divergence; L_GRPO is TRL's GRPO loss
(the clipped surrogate -min(r A, clip(r) A), TRL's epsilons) normalised as TRL's `loss_type`. The hand
computations use loss_type "grpo" (the mean over non-empty sequences of their token means); the equivalence
with TRL's own GRPO update is checked for "dapo" (TRL's default) and "grpo".
"""

from __future__ import annotations

import pytest
import torch
from test_alignment import row_logps
from test_invariance import run
from test_trainer import adapter_tensors, first_inputs, make_trainer

from sdpo_unsloth import SDPOConfig
from sdpo_unsloth.adapters import adapter_scope
from sdpo_unsloth.loss import divergence


class PartialCredit:
    """Never reaches the success threshold (1.0) and gives no feedback: no sample ever has a teacher."""

    __name__ = "partial_credit"

    def __call__(self, prompts, completions, **kwargs):
        return [0.5 * any(ch.isdigit() for ch in c[-1]["content"]) for c in completions]


class DigitWithFeedback:
    __name__ = "digit"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        ok = [any(ch.isdigit() for ch in c[-1]["content"]) for c in completions]
        self.last_feedback = [
            "" if good or i % 2 else f"Say {a}." for i, (good, a) in enumerate(zip(ok, answer, strict=True))
        ]
        return [float(good) for good in ok]


def test_hybrid_equals_a_hand_computation(tmp_path):
    weight = 0.25
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(grpo_weight=weight, distillation_topk=None, alpha=0.5),
        reward=DigitWithFeedback(),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        loss_type="grpo",
    )
    inputs = first_inputs(trainer)
    model = trainer.model
    teacher = inputs["sdpo_sample_mask"].bool()
    assert 0 < int(teacher.sum()) < 8 and float(inputs["advantages"].abs().sum()) > 0
    loss = float(trainer._compute_loss(model, inputs).detach())
    model.eval()
    sdpo, grpo = [], []
    with torch.no_grad():
        for row in range(8):
            length = int(inputs["completion_mask"][row].sum())
            if length == 0:
                continue
            completion = inputs["completion_ids"][row, :length]
            prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
            _, student = row_logps(model, prompt, completion)
            # On-policy: the ratio is 1, so the surrogate is -A on every token.
            grpo.append(-float(inputs["advantages"][row]))
            if teacher[row]:
                teacher_prompt = inputs["sdpo_teacher_prompt_ids"][row][
                    inputs["sdpo_teacher_prompt_mask"][row].bool()
                ]
                with adapter_scope(model, "sdpo_teacher"):
                    _, scores = row_logps(model, teacher_prompt, completion)
                per_token = divergence(student.log_softmax(-1), scores.log_softmax(-1), 0.5)  # [L]
                sdpo.append(float(per_token.mean()))
    expected = weight * sum(grpo) / len(grpo) + (1 - weight) * sum(sdpo) / len(sdpo)
    assert abs(loss - expected) < 1e-5 * max(1.0, abs(expected))


def test_hybrid_without_any_teacher_trains_on_its_grpo_term(tmp_path):
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(grpo_weight=0.5),
        reward=PartialCredit(),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
    )
    before = adapter_tensors(trainer.model, "default")
    trainer.train()
    after = adapter_tensors(trainer.model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [e for e in trainer.state.log_history if "sdpo/frac_masked" in e]
    assert logs and all(e["sdpo/frac_masked"] == 1.0 for e in logs)  # no sample had a teacher
    assert all("sdpo/distill_loss" not in e for e in logs)  # nothing distilled, so nothing logged as 0
    assert all(
        "sdpo/grpo_loss" in e for e in logs
    )  # on-policy its value is -mean(A) = 0; its gradient is not


class FirstOfFirstPrompt:
    """Group of the first prompt: its first sample succeeds (reward spread). Other groups: all fail, with feedback."""

    __name__ = "first_of_first"

    def __call__(self, prompts, completions, answer, **kwargs):
        first = prompts[0]
        scores, seen = [], False
        for prompt in prompts:
            scores.append(1.0 if prompt == first and not seen else 0.0)
            seen = seen or prompt == first
        self.last_feedback = [
            "" if s else f"Wrong. The answer is {a}." for s, a in zip(scores, answer, strict=True)
        ]
        return scores


def _one_sgd_step(tmp_path, weight, mode, reward, batch, lr, **sdpo):
    """One optimizer step (SGD, no clipping: the update is exactly -lr x grad) of the hybrid through
    trainer.train(): (trainer, model, the student adapter before, its update, the step's inputs)."""
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(
            grpo_weight=weight, hybrid_mode=mode, distillation_topk=None, teacher_update_rate=0.0, **sdpo
        ),
        reward=reward,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=1,
        optim="sgd",
        learning_rate=lr,
        max_grad_norm=0.0,
        loss_type="grpo",
    )
    model = trainer.model
    student0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    trainer.train()
    update = {n: p.detach() - student0[n] for n, p in model.named_parameters() if ".default." in n}
    return trainer, model, student0, update, trainer._buffered_inputs[0]


@pytest.mark.parametrize(("mode", "weight"), [("per_group", 0.75), ("failures", 1.0), ("failures", 0.5)])
def test_hybrid_update_equals_a_hand_computation(tmp_path, mode, weight):
    """One SGD step through trainer.train(), the update equals -lr x grad of the hand-computed loss.

    per_group: the group with a reward spread gets w GRPO + (1 - w) SDPO, the all-failed group with feedback
    pure distillation. failures: every sample w GRPO; the success no distillation (and no teacher), every
    failure SDPO as well (the all-failed group: GRPO's advantages are 0 there, so pure distillation)."""
    lr = 1.0
    _, model, student0, update, inputs = _one_sgd_step(tmp_path, weight, mode, FirstOfFirstPrompt(), 8, lr)

    groups = {}
    for row in range(8):
        groups.setdefault(
            inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist().__repr__(), []
        ).append(row)
    spread = [rows for rows in groups.values() if len({float(inputs["advantages"][r]) for r in rows}) > 1]
    assert len(groups) == 2 and len(spread) == 1
    success = [float(inputs["advantages"][r]) > 0 for r in range(8)]  # the one success of the spread group
    assert sum(success) == 1
    if mode == "per_group":
        expected_mix = [weight if row in spread[0] else 0.0 for row in range(8)]
        expected_distill = [1.0 - m for m in expected_mix]
    else:
        expected_mix = [weight] * 8
        expected_distill = [0.0 if success[row] else 1.0 for row in range(8)]
        assert not any(inputs["sdpo_sample_mask"][r] for r in range(8) if success[r])  # no teacher for it
    assert inputs["sdpo_grpo_weight"].tolist() == expected_mix
    assert inputs["sdpo_distill_weight"].tolist() == pytest.approx(expected_distill)
    _assert_update_is_the_hand_computed_step(
        model, inputs, student0, update, expected_mix, expected_distill, lr
    )


def _assert_update_is_the_hand_computed_step(
    model, inputs, student0, update, expected_mix, expected_distill, lr, kl_weights=None, loss_type="grpo"
):
    """`update` (one SGD step, no clipping) is -lr x the gradient of
    the sum of d_i x the token-mean JSD of the sequences with a teacher / their number
    + the GRPO term g_i GRPO_i (on-policy: -A_i per token) and the KL term kl_weights[i] x k3(p, p_ref) per token
    (p_ref the base: a fresh LoRA switched off), both normalised as `loss_type` over `inputs`, the step's whole
    batch: "grpo" the mean over rows of their token means, "bnpo" / "dapo" the token sum / the batch's tokens
    (for "bnpo" that is the micro-batch's, so `inputs` must be one micro-batch; "dapo" divides by the tokens of
    the step's window, which may be several)."""
    rows_n = len(expected_mix)
    assert loss_type in ("grpo", "bnpo", "dapo")
    if loss_type == "grpo":
        reduce, normaliser = torch.mean, rows_n  # each row's token mean, averaged over the rows
    else:  # the token sum / the batch's tokens
        reduce, normaliser = torch.sum, float(inputs["completion_mask"].sum())
    with torch.no_grad():  # back to the weights the step saw
        for n, p in model.named_parameters():
            if ".default." in n:
                p.copy_(student0[n])
    model.zero_grad()
    model.train()
    grpo_terms, sdpo_terms, kl_terms = [], [], []
    for row in range(rows_n):
        length = int(inputs["completion_mask"][row].sum())
        completion = inputs["completion_ids"][row, :length]
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        student_logp, student_logits = row_logps(model, prompt, completion)
        # On-policy ratio 1 with the gradient of log p: d/dθ of -A * exp(logp - sg(logp)) = -A dlogp.
        ratio = torch.exp(student_logp - student_logp.detach())
        grpo_terms.append(expected_mix[row] * reduce(-float(inputs["advantages"][row]) * ratio))
        if inputs["sdpo_sample_mask"][row]:
            teacher_prompt = inputs["sdpo_teacher_prompt_ids"][row][
                inputs["sdpo_teacher_prompt_mask"][row].bool()
            ]
            with torch.no_grad(), adapter_scope(model, "sdpo_teacher"):
                _, teacher_logits = row_logps(model, teacher_prompt, completion)
            jsd = divergence(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), 0.5).mean()
            sdpo_terms.append(expected_distill[row] * jsd)
        if kl_weights is not None and kl_weights[row]:
            with torch.no_grad(), model.disable_adapter():
                reference_logp, _ = row_logps(model, prompt, completion)
            log_ratio = reference_logp - student_logp
            # TRL's use_bias_correction_kl (its default): k3 x the importance ratio, 1 on-policy, gradient dlog p
            kl_terms.append(kl_weights[row] * reduce((log_ratio.exp() - log_ratio - 1) * ratio))
    loss = sum(grpo_terms) / normaliser + sum(sdpo_terms) / len(sdpo_terms)
    params = {n: p for n, p in model.named_parameters() if ".default." in n}
    grads = dict(
        zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True), strict=True)
    )
    if kl_terms:  # the KL's share on its own: a visible part of the update, far above the tolerance
        kl_grads = torch.autograd.grad(sum(kl_terms) / normaliser, list(params.values()))
        assert max(float(g.abs().max()) for g in kl_grads) * lr > 1e-5
        grads = {n: grads[n] + g for n, g in zip(params, kl_grads, strict=True)}
    moved = 0.0
    for n in params:
        torch.testing.assert_close(update[n], -lr * grads[n], rtol=1e-3, atol=1e-7)
        moved = max(moved, float(update[n].abs().max()))
    assert moved > 1e-5


class ThreeKindsOfGroup:
    """Per prompt group in batch order: the first group's first sample succeeds (a reward spread), the second group
    all succeed, the third all fail with feedback."""

    __name__ = "three_kinds"

    def __call__(self, prompts, completions, answer, **kwargs):
        keys = [repr(p) for p in prompts]  # chat prompts are lists
        order = list(dict.fromkeys(keys))
        scores = []
        for i, key in enumerate(keys):
            kind = order.index(key)
            scores.append(float(kind == 1 or (kind == 0 and keys.index(key) == i)))
        self.last_feedback = [
            "" if s else f"Wrong. The answer is {a}." for s, a in zip(scores, answer, strict=True)
        ]
        return scores


def test_failed_groups_update_equals_a_hand_computation(tmp_path):
    """hybrid_mode="failed_groups", one SGD step through trainer.train(): the group with a reward spread gets the
    GRPO term at the stated weight and no distillation, the all-failed group with feedback pure distillation, and
    the all-successful group nothing (per_group distils it towards a sibling's success); the update equals -lr x
    the gradient of the hand-computed loss."""
    lr, weight = 1.0, 1.0
    trainer, model, student0, update, inputs = _one_sgd_step(
        tmp_path, weight, "failed_groups", ThreeKindsOfGroup(), 12, lr
    )
    kinds = {}
    for row in range(12):
        key = repr(inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist())
        kinds.setdefault(key, []).append(row)
    assert len(kinds) == 3
    rewards = trainer.sdpo_last_plans[
        1
    ]  # in generation order; TRL shuffled the rows, which carry their index
    by_kind = {}
    for rows in kinds.values():
        scores = [rewards[int(inputs["sdpo_sample_index"][r])] for r in rows]
        by_kind["spread" if len(set(scores)) > 1 else "succeeded" if scores[0] == 1.0 else "failed"] = rows
    assert sorted(by_kind) == ["failed", "spread", "succeeded"]
    expected_mix = [weight if row in by_kind["spread"] else 0.0 for row in range(12)]
    expected_distill = [1.0 if row in by_kind["failed"] else 0.0 for row in range(12)]
    assert inputs["sdpo_grpo_weight"].tolist() == expected_mix
    assert inputs["sdpo_distill_weight"].tolist() == pytest.approx(expected_distill)
    assert all(inputs["sdpo_sample_mask"][r] for r in by_kind["failed"])  # feedback: a teacher
    assert any(inputs["sdpo_sample_mask"][r] for r in by_kind["succeeded"])  # a sibling's demo, weight 0
    _assert_update_is_the_hand_computed_step(
        model, inputs, student0, update, expected_mix, expected_distill, lr
    )


class OneWinnerPerGroup:
    """The first sample of every prompt group succeeds: every group has a reward spread."""

    __name__ = "one_winner"

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        self.seen += [c[-1]["content"] for c in completions]
        scores = [1.0 if i % 4 == 0 else 0.0 for i in range(len(completions))]
        self.last_feedback = [
            "" if s else f"Wrong. The answer is {a}." for s, a in zip(scores, answer, strict=True)
        ]
        return scores


@pytest.mark.parametrize(
    ("loss_type", "batch", "accumulation"), [("dapo", 8, 1), ("dapo", 4, 2), ("grpo", 4, 2), ("bnpo", 8, 1)]
)
def test_per_group_weight_one_is_trls_grpo_where_every_group_has_a_spread(
    tmp_path, loss_type, batch, accumulation
):
    """grpo_weight=1, per_group, every group with a reward spread: the same update as TRL's GRPO, through train()."""
    grpo, _, logs_grpo, seen_grpo = run(
        tmp_path,
        "grpo",
        SDPOConfig(enabled=False),
        batch,
        accumulation,
        OneWinnerPerGroup(),
        loss_type=loss_type,
    )
    hybrid, _, logs_hybrid, seen_hybrid = run(
        tmp_path,
        "hybrid",
        SDPOConfig(grpo_weight=1.0, hybrid_mode="per_group"),
        batch,
        accumulation,
        OneWinnerPerGroup(),
        loss_type=loss_type,
    )
    assert seen_grpo == seen_hybrid  # the same rollouts at both steps
    scale = max(float(v.abs().max()) for v in grpo.values())
    assert scale > 1e-4
    for key in grpo:
        torch.testing.assert_close(hybrid[key], grpo[key], rtol=1e-4, atol=1e-4 * scale)
    loss = [[e["loss"] for e in logs] for logs in (logs_grpo, logs_hybrid)]
    assert len(loss[0]) == 2 and loss[1] == pytest.approx(loss[0], rel=1e-3, abs=1e-7)


def ending_model():
    """The tiny model (untied) with a raised end-of-sequence logit: some completions end, others are cut off."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), tied=False)
    with torch.no_grad():
        ids = torch.randint(4, len(tokenizer), (8, 12), generator=torch.Generator().manual_seed(1))
        direction = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.lm_head.weight[model.config.eos_token_id] = 7.0 * direction / direction.norm() ** 2
    return model


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_per_group_weight_one_is_trls_grpo_with_truncated_completions_masked(tmp_path, loss_type):
    """mask_truncated_completions empties the rows cut off at the budget: TRL's "grpo" still averages over every
    row of the micro-batch (an empty one counts 0), and so must the hybrid's GRPO term (it averaged over the
    non-empty rows, 1.33x TRL's update with 2 of 8 rows cut off)."""
    options = dict(loss_type=loss_type, mask_truncated_completions=True)
    grpo = run(
        tmp_path,
        "grpo",
        SDPOConfig(enabled=False),
        4,
        2,
        OneWinnerPerGroup(),
        model=ending_model(),
        **options,
    )
    hybrid = run(
        tmp_path,
        "hybrid",
        SDPOConfig(grpo_weight=1.0, hybrid_mode="per_group"),
        4,
        2,
        OneWinnerPerGroup(),
        model=ending_model(),
        **options,
    )
    assert grpo[3] == hybrid[3]  # the same rollouts
    clipped = [entry["completions/clipped_ratio"] for entry in grpo[2]]
    assert any(0 < c < 1 for c in clipped), clipped  # some rows cut off and masked, some not
    scale = max(float(v.abs().max()) for v in grpo[0].values())
    assert scale > 1e-4
    for key in grpo[0]:
        torch.testing.assert_close(hybrid[0][key], grpo[0][key], rtol=1e-4, atol=1e-4 * scale)


def test_the_hybrid_refuses_grpo_options_its_term_does_not_reproduce(tmp_path):
    with pytest.raises(ValueError, match="loss_type='cispo' is not supported by the SDPO hybrid"):
        make_trainer(tmp_path, SDPOConfig(grpo_weight=0.5), loss_type="cispo")
    with pytest.warns(
        UserWarning, match=r"GRPOConfig sets loss_type='cispo', epsilon=0\.3, which only GRPO's loss"
    ):
        make_trainer(tmp_path, SDPOConfig(), loss_type="cispo", epsilon=0.3)  # pure SDPO does not use them
    with pytest.raises(
        ValueError, match=r"off_policy_mask_threshold=0\.01 is not supported by the SDPO hybrid"
    ):
        make_trainer(tmp_path, SDPOConfig(grpo_weight=1.0), off_policy_mask_threshold=0.01)
    for sdpo in (SDPOConfig(), SDPOConfig(grpo_weight=1.0)):  # the entropy bonus is a loss of its own
        with pytest.raises(
            ValueError, match=r"entropy_coef=0\.5: TRL's entropy bonus is not part of SDPO's loss"
        ):
            make_trainer(tmp_path, sdpo, entropy_coef=0.5)
        with pytest.raises(ValueError, match="use_adaptive_entropy=True"):
            make_trainer(tmp_path, sdpo, use_adaptive_entropy=True)
    make_trainer(tmp_path, SDPOConfig(enabled=False), entropy_coef=0.5)  # plain GRPO keeps it


class LongFeedbackInTheSpreadGroup(FirstOfFirstPrompt):
    """FirstOfFirstPrompt, with long feedback for the failures next to the success."""

    def __call__(self, prompts, completions, answer, **kwargs):
        scores = super().__call__(prompts, completions, answer, **kwargs)
        self.last_feedback = [
            f + " Count again, digit by digit." * 8 if p == prompts[0] else f
            for f, p in zip(self.last_feedback, prompts, strict=True)
        ]
        return scores


def test_teacher_forward_runs_without_the_padding_of_rows_it_does_not_distil(tmp_path, monkeypatch):
    """train()'s default (per_group, w=1): the spread group's failures see a demonstration and long feedback, the
    longest teacher prompts of the batch, but distil nothing; the all-failed group's teacher runs on its own
    prompts' width, and the update is still the hand-computed one (each row unpadded)."""
    from sdpo_unsloth import SDPOTrainer

    widths: list[tuple[int, bool]] = []
    original = SDPOTrainer._teacher_forward

    def spy(self, model, prompt, completion):
        widths.append((prompt[0].size(1), bool(prompt[1][:, 0].any())))
        return original(self, model, prompt, completion)

    monkeypatch.setattr(SDPOTrainer, "_teacher_forward", spy)
    lr = 1.0
    _, model, student0, update, inputs = _one_sgd_step(
        tmp_path,
        1.0,
        "per_group",
        LongFeedbackInTheSpreadGroup(),
        8,
        lr,
        environment_feedback_only_without_solution=False,
    )
    distill = inputs["sdpo_distill_weight"].tolist()
    assert sorted(distill) == [0.0] * 4 + [1.0] * 4
    has_teacher = inputs["sdpo_sample_mask"].bool()
    lengths = inputs["sdpo_teacher_prompt_mask"].sum(dim=1)
    distilled = has_teacher & (inputs["sdpo_distill_weight"] > 0)
    longest_distilled = int(lengths[distilled].max())
    assert int(lengths[has_teacher].max()) > longest_distilled  # a demonstration row sets the batch's width
    assert widths == [(longest_distilled, True)]  # one teacher forward, no all-padding column
    _assert_update_is_the_hand_computed_step(
        model, inputs, student0, update, [1.0 - d for d in distill], distill, lr
    )


def _second_sgd_step(tmp_path, sdpo_config, reward, accumulation, loss_type, lr, model=None):
    """Two SGD steps through trainer.train() at a constant lr, no clipping (a KL to the initial policy has no
    gradient at the first: the student is its reference there): (model, the student adapter before the second
    step, the second step's update, that step's batch as one dict - its micro-batches put back together -, the
    trainer's log)."""
    from transformers import TrainerCallback

    trainer = make_trainer(
        tmp_path,
        sdpo_config,
        reward=reward,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        loss_type=loss_type,
        model=model,
    )
    model = trainer.model
    before = {}

    class BeforeSecondStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                before.update(
                    {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
                )

    trainer.add_callback(BeforeSecondStep())
    trainer.train()
    update = {n: p.detach() - before[n] for n, p in model.named_parameters() if ".default." in n}
    parts = trainer._buffered_inputs  # the second step's generation batch, one entry per micro-batch
    assert len(parts) == accumulation
    inputs = {
        key: torch.cat([part[key] for part in parts])
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == 8 // accumulation
        else value
        for key, value in parts[0].items()
    }
    return model, before, update, inputs, trainer.state.log_history


def _completion_lengths(inputs, ending: bool) -> None:
    """The tiny model's completions all run to the 6-token budget; `ending_model`'s end at different lengths, so
    "grpo" (each row's token mean) and a token sum over the batch ("bnpo", "dapo") weigh their tokens differently."""
    lengths = set(inputs["completion_mask"].sum(dim=1).tolist())
    assert len(lengths) > 1 if ending else lengths == {6}, lengths


@pytest.mark.parametrize("ending", [False, True], ids=["full_length", "varied_length"])
@pytest.mark.parametrize(("loss_type", "accumulation"), [("grpo", 1), ("dapo", 2)])
def test_distill_anchor_update_equals_a_hand_computation(tmp_path, loss_type, accumulation, ending):
    """SDPOConfig.distill_anchor with the per-group hybrid: the second SGD step's update equals -lr x the gradient
    of the hybrid's loss plus anchor x k3 to the initial policy on the distilled samples only (the all-failed
    group), none on the group GRPO trains, normalised as loss_type ("dapo", TRL's default: over the tokens of the
    whole accumulation window, here two micro-batches). With completions of one length this checks the term's
    scale (the window's tokens once, not each micro-batch's); with completions of different lengths
    (`ending_model`), also how rows of different lengths are weighed (a row's token mean for "grpo", each token
    alike for "dapo"). There a smaller first step keeps the endings into the second (at lr 1 every completion of
    the second step had one length), and a larger anchor keeps the KL's share of the update visible."""
    lr, anchor = (0.2, 30.0) if ending else (1.0, 3.0)
    config = SDPOConfig(
        grpo_weight=1.0,
        hybrid_mode="per_group",
        distillation_topk=None,
        teacher_update_rate=0.0,
        distill_anchor=anchor,
    )
    model, before, update, inputs, log = _second_sgd_step(
        tmp_path,
        config,
        FirstOfFirstPrompt(),
        accumulation,
        loss_type,
        lr,
        ending_model() if ending else None,
    )
    _completion_lengths(inputs, ending)
    distill = inputs["sdpo_distill_weight"].tolist()
    assert 0 < sum(distill) < 8  # one group distilled, the other trained by GRPO
    teacher = inputs["sdpo_sample_mask"].tolist()
    anchored = [anchor if d > 0 and t else 0.0 for d, t in zip(distill, teacher, strict=True)]
    kl = [e["kl"] for e in log if "kl" in e]
    assert (
        kl[0] == pytest.approx(0.0, abs=1e-9) and kl[1] > 0
    )  # the anchor's KL: 0 at the start, then the student has moved
    _assert_update_is_the_hand_computed_step(
        model,
        inputs,
        before,
        update,
        inputs["sdpo_grpo_weight"].tolist(),
        distill,
        lr,
        kl_weights=anchored,
        loss_type=loss_type,
    )


class FeedbackForTheFirstPrompt:
    """Every sample fails; those of the first prompt get feedback (a teacher), the others none (no teacher)."""

    __name__ = "feedback_for_the_first_prompt"

    def __call__(self, prompts, completions, answer, **kwargs):
        self.last_feedback = [
            f"Wrong. The answer is {a}." if p == prompts[0] else ""
            for p, a in zip(prompts, answer, strict=True)
        ]
        return [0.0] * len(completions)


@pytest.mark.parametrize("ending", [False, True], ids=["full_length", "varied_length"])
def test_pure_sdpo_distill_anchor_under_bnpo_counts_the_rows_without_a_teacher(tmp_path, ending):
    """Pure SDPO with the anchor and loss_type "bnpo": the KL on the rows with a teacher is divided by the tokens of
    every row of the micro-batch, as TRL's bnpo term (not by the teacher rows' tokens only: that would double it
    here, half the rows having no teacher)."""
    lr, anchor = (0.2, 30.0) if ending else (1.0, 3.0)
    config = SDPOConfig(distillation_topk=None, teacher_update_rate=0.0, distill_anchor=anchor)
    model, before, update, inputs, _ = _second_sgd_step(
        tmp_path, config, FeedbackForTheFirstPrompt(), 1, "bnpo", lr, ending_model() if ending else None
    )
    _completion_lengths(inputs, ending)
    teacher = inputs["sdpo_sample_mask"].tolist()
    assert teacher.count(1) == 4 and teacher.count(0) == 4  # one group with a teacher, one without
    lengths = inputs["completion_mask"].sum(dim=1)
    assert float(lengths[inputs["sdpo_sample_mask"] == 0].sum()) > 0  # rows without a teacher have tokens
    _assert_update_is_the_hand_computed_step(
        model,
        inputs,
        before,
        update,
        [0.0] * 8,
        [float(t) for t in teacher],
        lr,
        kl_weights=[anchor * t for t in teacher],
        loss_type="bnpo",
    )
