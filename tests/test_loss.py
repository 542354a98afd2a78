"""Tests for sdpo_unsloth.loss: hand-worked values, brute-force reference, gradients, chunking, edges."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from sdpo_unsloth.loss import (
    DistillTerms,
    append_tail,
    chunked_distill,
    distill_from_logits,
    divergence,
    importance_weight,
    renormalize,
    sampled_token_surrogate,
    sequence_mean_loss,
)
from sdpo_unsloth.loss import chunked as loss_module

ALPHAS = [0.0, 0.3, 0.5, 1.0]


def _logp(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def _identity_head(vocab: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W = I: the hidden state *is* the logit vector, so hidden = log p gives p exactly."""
    return torch.eye(vocab, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Brute-force reference in probability space, plain Python floats
# ---------------------------------------------------------------------------------------------------


def _ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _ref_div(p: list[float], q: list[float], alpha: float) -> float:
    if alpha == 0:
        return _ref_kl(q, p)
    if alpha == 1:
        return _ref_kl(p, q)
    m = [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=True)]
    return alpha * _ref_kl(q, m) + (1 - alpha) * _ref_kl(p, m)


def _ref_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    return [v / sum(e) for v in e]


def _brute_force(s_logits, t_logits, targets, *, alpha, topk, add_tail, temperature):
    """Row by row: softmax, pick the student's top-k, add tail / renormalise, divergence by loops."""
    divs, s_tgt, t_tgt = [], [], []
    for row_s, row_t, y in zip(s_logits.tolist(), t_logits.tolist(), targets.tolist(), strict=True):
        p = _ref_softmax([v / temperature for v in row_s])
        q = _ref_softmax([v / temperature for v in row_t])
        if topk is None or topk >= len(p):
            ps, qs = p, q
        else:
            top = sorted(range(len(p)), key=lambda v: -row_s[v])[:topk]
            ps, qs = [p[v] for v in top], [q[v] for v in top]
            if add_tail:
                # the spec floors the tail mass at 1 - exp(-1e-7) ~= 1e-7 (lse clamped <= -1e-7)
                ps = [*ps, 1 - min(sum(ps), math.exp(-1e-7))]
                qs = [*qs, 1 - min(sum(qs), math.exp(-1e-7))]
            else:
                ps, qs = [v / sum(ps) for v in ps], [v / sum(qs) for v in qs]
        divs.append(_ref_div(ps, qs, alpha))
        s_tgt.append(math.log(p[y]))
        t_tgt.append(math.log(q[y]))
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (divs, s_tgt, t_tgt))


def _random_case(n=7, hidden=6, vocab=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hidden, generator=g, dtype=dtype)
    ht = hs + 0.7 * torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    return hs, ht, w, y


# ---------------------------------------------------------------------------------------------------
# Hand-worked values
# ---------------------------------------------------------------------------------------------------


# p = [0.5, 0.5] (student), q = [0.9, 0.1] (teacher):
#   alpha=1  KL(p||q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5(-0.587787) + 0.5(1.609438) = 0.510826
#   alpha=0  KL(q||p) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.9(0.587787) + 0.1(-1.609438) = 0.368064
#   alpha=.5 m = 0.5 p + 0.5 q = [0.7, 0.3]
#            KL(q||m) = 0.9 ln(0.9/0.7) + 0.1 ln(0.1/0.3) = 0.226183 - 0.109861 = 0.116322
#            KL(p||m) = 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3) = -0.168236 + 0.255413 = 0.087177
#            D = 0.5 * 0.116322 + 0.5 * 0.087177 = 0.101749
@pytest.mark.parametrize(("alpha", "expected"), [(1.0, 0.510826), (0.0, 0.368064), (0.5, 0.101749)])
def test_divergence_two_token_hand_values(alpha, expected):
    d = divergence(_logp(0.5, 0.5), _logp(0.9, 0.1), alpha)
    assert d.shape == ()
    assert d.item() == pytest.approx(expected, abs=1e-6)


# Four-token vocabulary, K = 2. Student p = [0.5, 0.3, 0.1, 0.1], teacher q = [0.2, 0.4, 0.1, 0.3].
# The student's top-2 are tokens {0, 1}.
# Tail on:  p' = [0.5, 0.3, 0.2], q' = [0.2, 0.4, 0.4]
#   alpha=1  0.5 ln(2.5) + 0.3 ln(0.75) + 0.2 ln(0.5) = 0.458145 - 0.086305 - 0.138629 = 0.233211
#   alpha=0  0.2 ln(0.4) + 0.4 ln(4/3) + 0.4 ln(2)    = -0.183258 + 0.115073 + 0.277259 = 0.209074
#   alpha=.5 m = [0.35, 0.35, 0.3]; 0.5 [0.2 ln(.2/.35) + 0.4 ln(.4/.35) + 0.4 ln(.4/.3)]
#                                 + 0.5 [0.5 ln(.5/.35) + 0.3 ln(.3/.35) + 0.2 ln(.2/.3)] = 0.053781
# Tail off: renormalise over {0, 1}: p' = [0.625, 0.375], q' = [1/3, 2/3]
#   alpha=1  0.625 ln(1.875) + 0.375 ln(0.5625) = 0.392880 - 0.215762 = 0.177119
#   alpha=0  1/3 ln(0.533333) + 2/3 ln(1.777778) = -0.209533 + 0.383573 = 0.174040
#   alpha=.5 m = [0.479167, 0.520833]                                                    = 0.043240
@pytest.mark.parametrize(
    ("alpha", "add_tail", "expected"),
    [
        (1.0, True, 0.233211),
        (0.0, True, 0.209074),
        (0.5, True, 0.053781),
        (1.0, False, 0.177119),
        (0.0, False, 0.174040),
        (0.5, False, 0.043240),
    ],
)
def test_top2_of_four_tokens_hand_values(alpha, add_tail, expected):
    p, q = _logp(0.5, 0.3, 0.1, 0.1), _logp(0.2, 0.4, 0.1, 0.3)
    y = torch.tensor([1])
    kwargs = {"alpha": alpha, "topk": 2, "add_tail": add_tail, "temperature": 1.0}
    chunked = chunked_distill(p[None], q[None], _identity_head(4), y, **kwargs)
    naive = distill_from_logits(p[None], q[None], y, **kwargs)
    for terms in (chunked, naive):
        assert terms.divergence.item() == pytest.approx(expected, abs=1e-6)
        assert terms.student_logp.item() == pytest.approx(math.log(0.3), abs=1e-9)
        assert terms.teacher_logp.item() == pytest.approx(math.log(0.4), abs=1e-9)
        assert terms.student_topk_mass.item() == pytest.approx(0.8, abs=1e-9)  # 0.5 + 0.3
        assert terms.teacher_topk_mass.item() == pytest.approx(0.6, abs=1e-9)  # 0.2 + 0.4
        # support_kl is KL(p'||q') on the same support whatever alpha is
        assert terms.support_kl.item() == pytest.approx(0.233211 if add_tail else 0.177119, abs=1e-6)


def test_append_tail_and_renormalize_hand_values():
    # [0.5, 0.3] -> tail 1 - 0.8 = 0.2; renormalised [0.625, 0.375]
    lp = _logp(0.5, 0.3)
    assert append_tail(lp).exp().tolist() == pytest.approx([0.5, 0.3, 0.2], abs=1e-12)
    assert renormalize(lp).exp().tolist() == pytest.approx([0.625, 0.375], abs=1e-12)
    # All the mass in the support: lse = 0 is clamped to -1e-7, tail = log(1e-7) stays finite.
    tail = append_tail(_logp(0.25, 0.75))[-1]
    assert tail.item() == pytest.approx(math.log(1e-7), abs=1e-6)


def test_k1_with_tail_hand_value():
    # p = [0.7, 0.2, 0.1], q = [0.4, 0.4, 0.2], K = 1: support {0} + tail:
    # p' = [0.7, 0.3], q' = [0.4, 0.6]
    # KL(p'||q') = 0.7 ln(1.75) + 0.3 ln(0.5) = 0.391731 - 0.207944 = 0.183787
    p, q = _logp(0.7, 0.2, 0.1), _logp(0.4, 0.4, 0.2)
    kwargs = {"alpha": 1.0, "topk": 1, "temperature": 1.0}
    terms = chunked_distill(p[None], q[None], _identity_head(3), torch.tensor([0]), add_tail=True, **kwargs)
    assert terms.divergence.item() == pytest.approx(0.183787, abs=1e-6)
    # Without the tail a single renormalised entry is [1] vs [1]: nothing to distil.
    terms = chunked_distill(p[None], q[None], _identity_head(3), torch.tensor([0]), add_tail=False, **kwargs)
    assert terms.divergence.item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Brute-force reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(
    ("topk", "add_tail"),
    # None and K = V are the full vocabulary; K = V - 1 with the tail lumps the last token into the tail;
    # K = 3 is a genuine truncation, with and without the tail.
    [(None, True), (9, True), (8, True), (3, True), (3, False)],
)
def test_matches_brute_force_reference(alpha, topk, add_tail):
    hs, ht, w, y = _random_case()
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": add_tail, "temperature": 0.7}
    ref_div, ref_s, ref_t = _brute_force(hs @ w.T, ht @ w.T, y, **kwargs)
    chunked = chunked_distill(hs, ht, w, y, chunk_size=3, **kwargs)
    naive = distill_from_logits(hs @ w.T, ht @ w.T, y, **kwargs)
    for terms in (chunked, naive):
        torch.testing.assert_close(terms.divergence, ref_div, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(terms.student_logp, ref_s, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(terms.teacher_logp, ref_t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_top_v_minus_1_with_tail_is_the_full_vocabulary(alpha):
    """The tail of K = V - 1 is exactly the left-over token (its mass is well above the 1e-7 floor here)."""
    hs, ht, w, y = _random_case()
    hs, ht = 0.3 * hs, 0.3 * ht
    full_div, _, _ = _brute_force(
        hs @ w.T, ht @ w.T, y, alpha=alpha, topk=None, add_tail=True, temperature=1.0
    )
    terms = chunked_distill(hs, ht, w, y, alpha=alpha, topk=w.shape[0] - 1, add_tail=True, temperature=1.0)
    torch.testing.assert_close(terms.divergence, full_div, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_gradcheck(alpha):
    g = torch.Generator().manual_seed(1)
    s = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1).requires_grad_()
    t = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: divergence(x, t, alpha), (s,))


@pytest.mark.parametrize(
    ("alpha", "topk", "add_tail", "softcap"),
    [
        (0.5, 3, True, None),
        (1.0, 3, False, 2.0),
        (0.0, 3, True, 2.0),
        (0.3, None, True, None),
        (1.0, None, True, 2.0),
    ],
)
def test_chunked_distill_custom_backward_gradcheck(alpha, topk, add_tail, softcap):
    """The hand-written backward (Jacobian rows kept from the forward) against finite differences."""
    hs, ht, w, y = _random_case(n=5, hidden=4, vocab=8, seed=2)
    bias = torch.randn(8, dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": add_tail, "temperature": 0.8}

    def f(h):
        terms = chunked_distill(h, ht, w, y, lm_head_bias=bias, logit_softcap=softcap, chunk_size=2, **kwargs)
        return terms.divergence, (u * terms.student_logp).sum()

    assert torch.autograd.gradcheck(f, (hs.requires_grad_(),))


def _loss_and_grad(fn, hs, u1, u2):
    h = hs.detach().clone().requires_grad_()
    terms = fn(h)
    ((u1 * terms.divergence).sum() + (u2 * terms.student_logp).sum()).backward()
    return terms, h.grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(4, True), (4, False), (None, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_unchunked_values_and_grads(alpha, topk, add_tail, dtype):
    n = 7
    hs, ht, w, y = _random_case(n=n, hidden=6, vocab=11, dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    u1, u2 = torch.rand(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
    kwargs = {"alpha": alpha, "topk": topk, "add_tail": add_tail, "temperature": 1.3}
    ref, ref_grad = _loss_and_grad(lambda h: distill_from_logits(h @ w.T, ht @ w.T, y, **kwargs), hs, u1, u2)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    chunked = functools.partial(chunked_distill, teacher_hidden=ht, lm_head_weight=w, target_ids=y, **kwargs)
    for chunk_size in (1, 3, n):
        out, grad = _loss_and_grad(lambda h, c=chunk_size: chunked(h, chunk_size=c), hs, u1, u2)
        for field in ("divergence", "student_logp", "teacher_logp", "support_kl", "student_topk_mass"):
            torch.testing.assert_close(
                getattr(out, field), getattr(ref, field).to(out.divergence.dtype), **tol
            )
        torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("topk", [4, None])
def test_softcap_and_bias_match_naive_logits(topk):
    hs, ht, w, y = _random_case(seed=5)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    cap = 1.5
    kwargs = {"alpha": 0.5, "topk": topk, "add_tail": True, "temperature": 0.9}

    def capped(h):
        return cap * torch.tanh((h @ w.T + b) / cap)

    u1, u2 = torch.ones(7, dtype=torch.float64), torch.full((7,), 0.5, dtype=torch.float64)
    ref, ref_grad = _loss_and_grad(
        lambda h: distill_from_logits(capped(h), capped(ht), y, **kwargs), hs, u1, u2
    )
    out, grad = _loss_and_grad(
        lambda h: chunked_distill(h, ht, w, y, lm_head_bias=b, logit_softcap=cap, chunk_size=2, **kwargs),
        hs,
        u1,
        u2,
    )
    torch.testing.assert_close(out.divergence, ref.divergence)
    torch.testing.assert_close(grad, ref_grad)


def _gradient_step(model, x, teacher_hidden, w, y, mask, normalizer):
    """Per-token divergence on a [B, L] batch, aggregated the way the trainer does."""
    b, length, _ = x.shape
    hidden = (x @ model).reshape(b * length, -1)  # [B*L, H]
    kwargs = {"alpha": 0.5, "topk": 4, "add_tail": True, "temperature": 1.0, "chunk_size": 5}
    terms = chunked_distill(hidden, teacher_hidden.reshape(b * length, -1), w, y.reshape(-1), **kwargs)
    return sequence_mean_loss(terms.divergence.reshape(b, length), mask, normalizer)


def test_gradient_accumulation_invariance():
    """bs=8, GA=1 and bs=4, GA=2 give the same gradient with normalizer = n_active / GA.

    Sequence 1 is fully masked and lives in the first micro-batch, so the two micro-batches hold 3 and 4
    active sequences: a per-micro-batch mean would weight them differently.
    """
    g = torch.Generator().manual_seed(6)
    b, length, d_in, hidden, vocab = 8, 5, 3, 4, 10
    x = torch.randn(b, length, d_in, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(b, length, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (b, length), generator=g)
    mask = (torch.rand(b, length, generator=g) > 0.3).to(torch.float64)
    mask[:, 0] = 1.0
    mask[1] = 0.0
    n_active = int((mask.sum(-1) > 0).sum())
    assert n_active == 7
    model = torch.randn(d_in, hidden, generator=g, dtype=torch.float64, requires_grad=True)

    loss = _gradient_step(model, x, teacher_hidden, w, y, mask, normalizer=n_active / 1)
    (full_grad,) = torch.autograd.grad(loss, model)

    ga = 2
    accumulated = torch.zeros_like(model)
    naive = torch.zeros_like(model)
    for part in (slice(0, 4), slice(4, 8)):
        micro = _gradient_step(model, x[part], teacher_hidden[part], w, y[part], mask[part], n_active / ga)
        accumulated += torch.autograd.grad(micro / ga, model)[0]  # the Trainer divides by GA
        local_active = int((mask[part].sum(-1) > 0).sum())
        wrong = _gradient_step(model, x[part], teacher_hidden[part], w, y[part], mask[part], local_active)
        naive += torch.autograd.grad(wrong / ga, model)[0]
    torch.testing.assert_close(accumulated, full_grad)
    assert not torch.allclose(naive, full_grad)  # the per-micro-batch mean is not invariant


# ---------------------------------------------------------------------------------------------------
# Teacher, temperature, importance weights, masks, dtypes
# ---------------------------------------------------------------------------------------------------


def test_teacher_gets_no_gradient():
    hs, ht, w, y = _random_case(seed=7)
    hs.requires_grad_()
    ht.requires_grad_()
    terms = chunked_distill(hs, ht, w, y, alpha=0.5, topk=3, add_tail=True, temperature=1.0)
    (terms.divergence.sum() + terms.student_logp.sum()).backward()
    assert ht.grad is None
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert not terms.teacher_logp.requires_grad and not terms.support_kl.requires_grad

    s = torch.log_softmax(torch.randn(4, 5), -1).requires_grad_()
    t = torch.log_softmax(torch.randn(4, 5), -1).requires_grad_()
    divergence(s, t, 0.5).sum().backward()
    assert t.grad is None and s.grad is not None

    naive = distill_from_logits(hs @ w.T, ht @ w.T, y, alpha=0.5, topk=3, add_tail=True, temperature=1.0)
    assert not naive.teacher_logp.requires_grad


def test_temperature_is_applied_to_both_sides():
    hs, ht, w, y = _random_case(seed=8)
    kwargs = {"alpha": 0.5, "topk": 3, "add_tail": True}
    at_t2 = chunked_distill(hs, ht, w, y, temperature=2.0, **kwargs)
    both_halved = chunked_distill(hs / 2, ht / 2, w, y, temperature=1.0, **kwargs)
    student_only = chunked_distill(hs / 2, ht, w, y, temperature=1.0, **kwargs)
    torch.testing.assert_close(at_t2.divergence, both_halved.divergence)
    torch.testing.assert_close(at_t2.teacher_logp, both_halved.teacher_logp)
    assert not torch.allclose(at_t2.divergence, student_only.divergence)
    naive = distill_from_logits(hs @ w.T, ht @ w.T, y, temperature=2.0, **kwargs)
    torch.testing.assert_close(naive.divergence, at_t2.divergence)


def test_importance_weight_clips_from_above_only():
    old = torch.zeros(4)
    new = torch.tensor([math.log(3.0), math.log(0.25), 0.0, 100.0], requires_grad=True)
    w = importance_weight(new, old, is_clip=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.25, 1.0, 2.0])  # 3 -> 2; 0.25 stays (no lower clip)
    assert not w.requires_grad
    unclipped = importance_weight(new, old, is_clip=None)
    assert unclipped[:3].tolist() == pytest.approx([3.0, 0.25, 1.0])
    assert unclipped[3].item() == pytest.approx(math.exp(20.0), rel=1e-6)  # log-ratio clamped to 20
    assert importance_weight(torch.tensor([-100.0]), torch.tensor([0.0]), None).item() == pytest.approx(
        math.exp(-20.0)
    )
    with pytest.raises(ValueError, match="is_clip"):
        importance_weight(new, old, is_clip=0.0)


def test_masked_tokens_contribute_nothing():
    per_token = torch.tensor(
        [[1.0, 3.0, float("inf")], [2.0, float("nan"), 4.0], [5.0, 6.0, 7.0]], requires_grad=True
    )
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # sequence means: (1 + 3) / 2 = 2, (2 + 4) / 2 = 3, fully masked -> 0; sum 5 / normalizer 2 = 2.5
    loss = sequence_mean_loss(per_token, mask, normalizer=2.0)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    expected_grad = torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(per_token.grad, expected_grad)
    assert sequence_mean_loss(per_token, mask, torch.tensor(4.0)).item() == pytest.approx(1.25)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_fp32(low, monkeypatch):
    # small blocks, so the block-by-block upcast of W and the blocked row gathers run several blocks
    monkeypatch.setattr(loss_module, "_VOCAB_BLOCK", 7)
    monkeypatch.setattr(loss_module, "_GATHER_BLOCK", 5 * 8 * 2)
    hs, ht, w, y = _random_case(n=6, hidden=8, vocab=20, dtype=torch.float32, seed=9)
    hs16, ht16, w16 = hs.to(low), ht.to(low), w.to(low)
    kwargs = {"alpha": 0.5, "topk": 5, "add_tail": True, "temperature": 1.0}
    u = torch.ones(6)
    out, grad = _loss_and_grad(lambda h: chunked_distill(h, ht16, w16, y, chunk_size=4, **kwargs), hs16, u, u)
    # reference: the same (rounded) numbers, upcast, in fp32
    ref, ref_grad = _loss_and_grad(
        lambda h: distill_from_logits(h.float() @ w16.float().T, ht16.float() @ w16.float().T, y, **kwargs),
        hs16,
        u,
        u,
    )
    assert out.divergence.dtype == torch.float32 and grad.dtype == low
    torch.testing.assert_close(out.divergence, ref.divergence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.to(low))


def test_autocast_does_not_lower_the_logit_precision():
    hs, ht, w, y = _random_case(dtype=torch.float32, seed=14)
    kwargs = {"alpha": 0.5, "topk": 3, "add_tail": True, "temperature": 1.0}
    u = torch.ones(7)
    ref, ref_grad = _loss_and_grad(lambda h: chunked_distill(h, ht, w, y, **kwargs), hs, u, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad = _loss_and_grad(lambda h: chunked_distill(h, ht, w, y, **kwargs), hs, u, u)
    torch.testing.assert_close(out.divergence, ref.divergence)
    torch.testing.assert_close(grad, ref_grad)


# ---------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("topk", "add_tail"), [(3, True), (3, False), (None, True)])
def test_identical_student_and_teacher_give_zero_divergence_and_gradient(alpha, topk, add_tail):
    hs, _, w, y = _random_case(seed=10)
    h = hs.clone().requires_grad_()
    terms = chunked_distill(h, hs, w, y, alpha=alpha, topk=topk, add_tail=add_tail, temperature=1.0)
    terms.divergence.sum().backward()
    torch.testing.assert_close(terms.divergence, torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.grad, torch.zeros_like(h), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_extremely_peaked_distributions_are_finite(alpha):
    # Logits 1000 apart: all probability on one token, the rest underflows to exactly 0.
    s = torch.tensor([[1000.0, 0.0, -1000.0, 5.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1000.0, 1000.0, 0.0, 0.0], [0.0, 2000.0, 0.0, -3000.0]])
    y = torch.tensor([2, 3])
    for topk, tail in [(2, True), (2, False), (None, True), (1, True)]:
        terms = distill_from_logits(s, t, y, alpha=alpha, topk=topk, add_tail=tail, temperature=0.5)
        (grad,) = torch.autograd.grad(terms.divergence.sum() + terms.student_logp.sum(), s)
        assert torch.isfinite(terms.divergence).all() and torch.isfinite(grad).all()
        w = torch.eye(4)
        h = s.detach().clone().requires_grad_()
        chunked = chunked_distill(h, t, w, y, alpha=alpha, topk=topk, add_tail=tail, temperature=0.5)
        (chunked.divergence.sum() + chunked.student_logp.sum()).backward()
        assert torch.isfinite(chunked.divergence).all() and torch.isfinite(h.grad).all()
        torch.testing.assert_close(h.grad, grad)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_with_zero_probability_entries(alpha):
    # p = [0.5, 0.5, 0], q = [0.9, 0, 0.1] as -inf log-probs: no NaN in value or gradient.
    ninf = float("-inf")
    s = torch.tensor([math.log(0.5), math.log(0.5), ninf], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([math.log(0.9), ninf, math.log(0.1)], dtype=torch.float64)
    d = divergence(s, t, alpha)
    (grad,) = torch.autograd.grad(d, s)
    assert not torch.isnan(d) and not torch.isnan(grad).any()
    if alpha in (0.0, 1.0):
        assert d.item() == math.inf  # disjoint mass: the KL is truly infinite
    else:
        # JSD stays finite: compare with the probability-space reference
        assert d.item() == pytest.approx(_ref_div([0.5, 0.5, 0.0], [0.9, 0.0, 0.1], alpha), abs=1e-12)
    # Both sides zero on an entry: that entry simply drops out.
    both = divergence(_logp(0.5, 0.5, 0.0), _logp(0.9, 0.1, 0.0), alpha)
    assert both.item() == pytest.approx(divergence(_logp(0.5, 0.5), _logp(0.9, 0.1), alpha).item(), abs=1e-12)


def test_sampled_token_surrogate_value_and_gradient():
    s = torch.tensor([-0.5, -2.0], requires_grad=True)
    t = torch.tensor([-1.0, -1.0])
    out = sampled_token_surrogate(s, t)
    # (s - t) * s = [0.5 * -0.5, -1.0 * -2.0] = [-0.25, 2.0]; gradient sg(s - t) = [0.5, -1.0]
    assert out.tolist() == pytest.approx([-0.25, 2.0])
    out.sum().backward()
    assert s.grad.tolist() == pytest.approx([0.5, -1.0])


def test_need_divergence_false_keeps_log_probs():
    hs, ht, w, y = _random_case(seed=11)
    h = hs.clone().requires_grad_()
    terms = chunked_distill(
        h, ht, w, y, alpha=1.0, topk=3, add_tail=True, temperature=1.0, need_divergence=False
    )
    assert isinstance(terms, DistillTerms)
    assert terms.divergence is None and terms.support_kl is None
    full = chunked_distill(hs, ht, w, y, alpha=1.0, topk=3, add_tail=True, temperature=1.0)
    torch.testing.assert_close(terms.student_logp, full.student_logp.detach())
    sampled_token_surrogate(terms.student_logp, terms.teacher_logp).sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_no_grad_mode_returns_plain_tensors():
    hs, ht, w, y = _random_case(seed=12)
    with torch.no_grad():
        terms = chunked_distill(
            hs.requires_grad_(), ht, w, y, alpha=0.5, topk=3, add_tail=True, temperature=1.0
        )
    assert not terms.divergence.requires_grad


def test_argument_errors_name_the_argument():
    hs, ht, w, y = _random_case(seed=13)
    kwargs = {"topk": 3, "add_tail": True, "temperature": 1.0}
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got 1.5"):
        chunked_distill(hs, ht, w, y, alpha=1.5, **kwargs)
    with pytest.raises(ValueError, match="not logits"):
        chunked_distill(hs @ w.T, ht @ w.T, w, y, alpha=0.5, **kwargs)
    with pytest.raises(ValueError, match="frozen"):
        chunked_distill(hs, ht, w.clone().requires_grad_(), y, alpha=0.5, **kwargs)
    with pytest.raises(ValueError, match="temperature"):
        chunked_distill(hs, ht, w, y, alpha=0.5, topk=3, add_tail=True, temperature=0.0)
    with pytest.raises(ValueError, match="topk"):
        distill_from_logits(hs, ht, y, alpha=0.5, topk=0, add_tail=True, temperature=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(low):
    """On the GPU, with half-precision inputs under autocast, the result matches the CPU fp32 computation."""
    hs, ht, w, y = _random_case(n=300, hidden=64, vocab=5000, dtype=torch.float32, seed=15)
    hs, ht, w = hs.to(low), ht.to(low), w.to(low)
    kwargs = {"alpha": 0.5, "topk": 100, "add_tail": True, "temperature": 0.8, "chunk_size": 128}
    u = torch.linspace(0.5, 1.5, 300)
    ref, ref_grad = _loss_and_grad(lambda h: chunked_distill(h, ht, w, y, **kwargs), hs, u, u)
    cuda = [t.cuda() for t in (ht, w, y)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grad = _loss_and_grad(
            lambda h: chunked_distill(h, *cuda, **kwargs), hs.cuda(), u.cuda(), u.cuda()
        )
    torch.testing.assert_close(out.divergence.cpu(), ref.divergence, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.student_logp.cpu(), ref.student_logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        grad.cpu().float(), ref_grad.float(), rtol=1e-2 if low != torch.float32 else 1e-4, atol=1e-4
    )
