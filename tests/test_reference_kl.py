"""GRPOConfig.beta with SDPO: TRL's KL penalty, beta x k3(p, p_ref) per completion token, against the initial
policy, normalised as TRL's `loss_type`, added by SDPO's own loss (TRL is shown beta 0 and scores no reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from test_hybrid import OneWinnerPerGroup
from test_invariance import WrongWithFeedback, run
from test_trainer import adapter_tensors, make_trainer

from sdpo_unsloth import SDPOConfig
from sdpo_unsloth.loss import reference_kl, sampled_logps
from sdpo_unsloth.model import attach_lora


def test_reference_kl_hand_values():
    s = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    r = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # exp(r - s) - (r - s) - 1: 0.5 - ln 0.5 - 1, 0, 2 - ln 2 - 1
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1])
    torch.testing.assert_close(reference_kl(s, r), expected)
    leaf = s.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(reference_kl(leaf, r).sum(), leaf)
    torch.testing.assert_close(g, 1 - (r - leaf.detach()).exp())  # 1 - p_ref / p


def test_sampled_logps_equal_log_softmax_in_chunks():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 5), torch.randn(11, 5)
    bias, ids = torch.randn(11), torch.randint(0, 11, (7,))
    got = sampled_logps(
        hidden, weight, ids, temperature=0.7, lm_head_bias=bias, logit_softcap=3.0, chunk_size=3
    )
    logits = 3.0 * torch.tanh((hidden @ weight.T + bias) / 3.0) / 0.7
    torch.testing.assert_close(got, logits.log_softmax(-1).gather(1, ids[:, None]).squeeze(1))


def _differ(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(("loss_type", "bias_correction"), [("dapo", False), ("grpo", False), ("dapo", True)])
def test_the_kl_penalty_is_trls_where_the_per_group_hybrid_is_trls_grpo(tmp_path, loss_type, bias_correction):
    """Where the per-group hybrid at weight 1 is TRL's GRPO (every group has a reward spread), beta > 0 gives TRL's
    update with beta, through two train() steps with SGD (the KL's gradient is 0 at the first: p = p_ref); also
    with `use_bias_correction_kl` (the KL times the importance ratio)."""
    kw = {"loss_type": loss_type, "use_bias_correction_kl": bias_correction}
    config = SDPOConfig(grpo_weight=1.0, hybrid_mode="per_group")
    grpo = run(tmp_path, "grpo", SDPOConfig(enabled=False), 4, 2, OneWinnerPerGroup(), beta=2.0, **kw)
    ours = run(tmp_path, "ours", config, 4, 2, OneWinnerPerGroup(), beta=2.0, **kw)
    plain = run(tmp_path, "plain", config, 4, 2, OneWinnerPerGroup(), beta=0.0, **kw)
    assert grpo[3] == ours[3] == plain[3]  # the same rollouts at both steps
    scale = max(float(v.abs().max()) for v in grpo[0].values())
    for key in grpo[0]:
        torch.testing.assert_close(ours[0][key], grpo[0][key], rtol=1e-4, atol=1e-4 * scale)
    assert _differ(ours[0], plain[0]) > 1e-2 * scale  # the KL term is what made the difference
    kl = [[e["kl"] for e in logs] for logs in (grpo[2], ours[2])]
    assert kl[0][0] == 0.0 and kl[0][1] > 1e-4  # TRL's: 0 at the first step, then the student has moved
    assert kl[1] == pytest.approx(kl[0], rel=1e-3, abs=1e-9)
    assert all("kl" not in e for e in plain[2])


def test_pure_sdpo_with_beta_adds_a_term_linear_in_beta_that_is_zero_at_the_first_step(tmp_path):
    """Pure SDPO, two SGD steps through train() (no clipping, so an update is -lr x grad): the first step is the
    same for any beta (p = p_ref there, so the KL's gradient is 0), hence so are the second step's rollouts, and
    the second step's update moves by a term linear in beta: update(2b) - update(0) = 2 (update(b) - update(0))."""
    updates, logs = {}, {}
    for beta in (0.0, 50.0, 100.0):  # large: the student moves little at the first step
        student, _, log, seen = run(
            tmp_path, f"b{beta}", SDPOConfig(), 4, 2, None, beta=beta, max_grad_norm=0.0
        )
        updates[beta], logs[beta] = (student, seen), log
    assert updates[0.0][1] == updates[50.0][1] == updates[100.0][1]  # the same rollouts
    one = {k: updates[50.0][0][k] - updates[0.0][0][k] for k in updates[0.0][0]}
    two = {k: updates[100.0][0][k] - updates[0.0][0][k] for k in updates[0.0][0]}
    scale = max(float(v.abs().max()) for v in two.values())
    assert scale > 0.1 * max(float(v.abs().max()) for v in updates[0.0][0].values())
    for key in one:
        torch.testing.assert_close(two[key], 2 * one[key], rtol=1e-3, atol=1e-3 * scale)
    assert logs[50.0][0]["kl"] == 0.0 and logs[50.0][1]["kl"] > 0


def test_an_adapter_trained_before_sdpo_is_its_own_reference(tmp_path):
    """The reference is the student as it starts: for an adapter trained before, a frozen copy (as TRL's "ref"
    adapter), not the base; its KL at the first step is 0."""
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = attach_lora(make_tiny_model(len(tokenizer)), None, teacher_adapter=None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    trainer = make_trainer(tmp_path, SDPOConfig(), model=model, max_steps=1, beta=0.5)
    assert (
        trainer.args.beta == 0.5 and trainer.beta == 0.0
    )  # the user's config keeps it; TRL scores no reference
    assert trainer._reference_adapter == "sdpo_reference"
    reference = adapter_tensors(trainer.model, "sdpo_reference")
    trainer.train()
    assert [e["kl"] for e in trainer.state.log_history if "kl" in e] == [0.0]
    for key, value in adapter_tensors(trainer.model, "sdpo_reference").items():
        assert torch.equal(value, reference[key])  # frozen
    fresh = make_trainer(tmp_path / "fresh", SDPOConfig(), max_steps=1, beta=0.5)
    assert fresh._reference_adapter is None  # a fresh LoRA adds nothing: the base with adapters off


def test_beta_rejects_a_loss_type_whose_normalisation_the_kl_term_does_not_reproduce(tmp_path):
    with pytest.raises(ValueError, match=r"beta=0\.04 with loss_type='cispo'"):
        make_trainer(tmp_path, SDPOConfig(), beta=0.04, loss_type="cispo")


def test_pure_sdpo_with_beta_does_not_call_loss_type_unused(tmp_path):
    """With beta > 0 the KL term is normalised as loss_type: the pure-SDPO warning about options only GRPO's loss
    reads leaves loss_type out (it still names the others)."""
    with pytest.warns(UserWarning, match=r"GRPOConfig sets epsilon=0\.3, which only GRPO's loss") as caught:
        make_trainer(tmp_path, SDPOConfig(), beta=0.1, loss_type="grpo", epsilon=0.3)
    assert not any("loss_type=" in str(w.message) for w in caught)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_distill_anchor_rejects_a_weight_that_is_not_a_finite_number_from_0(value):
    with pytest.raises(ValueError, match=r"`distill_anchor` must be a finite number >= 0"):
        SDPOConfig(distill_anchor=value)


def test_distill_anchor_rejects_a_loss_type_whose_normalisation_it_does_not_reproduce(tmp_path):
    with pytest.raises(ValueError, match=r"distill_anchor=0\.1 with loss_type='cispo'"):
        make_trainer(tmp_path, SDPOConfig(distill_anchor=0.1), loss_type="cispo")


def test_distill_anchor_on_pure_sdpo_is_beta(tmp_path):
    """Pure SDPO distils every sample with a teacher, so the anchor there is GRPOConfig.beta on the samples with a
    teacher: with every sample failing with feedback, the same two train() steps (SGD) as beta at the same weight."""
    kw = {"max_grad_norm": 0.0}
    beta = run(tmp_path, "beta", SDPOConfig(), 4, 2, WrongWithFeedback(), beta=5.0, **kw)
    anchor = run(tmp_path, "anchor", SDPOConfig(distill_anchor=5.0), 4, 2, WrongWithFeedback(), **kw)
    plain = run(tmp_path, "plain", SDPOConfig(), 4, 2, WrongWithFeedback(), **kw)
    assert beta[3] == anchor[3] == plain[3]  # the same rollouts
    scale = max(float(v.abs().max()) for v in beta[0].values())
    for key in beta[0]:
        torch.testing.assert_close(anchor[0][key], beta[0][key], rtol=1e-4, atol=1e-5 * scale)
    assert _differ(anchor[0], plain[0]) > 1e-2 * scale  # the anchor is what made the difference
    assert [e["kl"] for e in anchor[2]] == pytest.approx([e["kl"] for e in beta[2]], rel=1e-4)


def test_pure_sdpo_with_distill_anchor_does_not_call_loss_type_unused(tmp_path):
    """The anchor's KL term is normalised as loss_type too: the unused-options warning leaves it out."""
    with pytest.warns(UserWarning, match=r"GRPOConfig sets epsilon=0\.3, which only GRPO's loss") as caught:
        make_trainer(tmp_path, SDPOConfig(distill_anchor=0.1), loss_type="grpo", epsilon=0.3)
    assert not any("loss_type=" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        (SDPOConfig(enabled=False, distill_anchor=0.1), "SDPO is off"),
        (SDPOConfig(grpo_weight=1.0, hybrid_mode="fixed", distill_anchor=0.1), "distils no sample"),
    ],
)
def test_distill_anchor_that_can_do_nothing_says_so(tmp_path, config, says):
    with pytest.warns(UserWarning, match=rf"distill_anchor=0\.1 has no effect: .*{says}"):
        make_trainer(tmp_path, config)
