"""SDPO's per-token divergence on a common support, from logits: D_alpha (forward KL, reverse KL, generalised
JSD), the top-K support with its tail entry, the importance weight, the sampled-token surrogate and the
masked sequence mean. The formulas and shapes are in the `sdpo_unsloth.loss` docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# log(1 - sum p) is computed from lse = log(sum p) clamped to at most this value, so that the tail entry
# stays finite (>= log(1e-7) ~= -16.1) when the support holds (almost) all the mass.
_TAIL_LSE_MAX = -1e-7
# Importance ratios are exp(clamp(log ratio, -20, 20)).
_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class DistillTerms:
    """Per-token outputs of ``chunked_distill`` / ``distill_from_logits``, all of shape [N].

    Attributes:
        divergence: D_alpha(p_t, q_t) on the support, differentiable w.r.t. the student; ``None`` when
            ``need_divergence=False``.
        student_logp: log p(y_t), differentiable w.r.t. the student.
        teacher_logp: log q(y_t), detached.
        support_kl: KL(p || q) on the same support (tail / renormalisation included), detached; a
            teacher-student gap to log whatever ``alpha`` is. ``None`` when ``need_divergence=False``.
        student_topk_mass: sum of the student's probabilities on its top-K indices (1 for the full
            vocabulary), detached. ``None`` when ``need_divergence=False``.
        teacher_topk_mass: the teacher's probability mass on the student's top-K indices, detached: how
            much of the teacher the support captures. ``None`` when ``need_divergence=False``.
    """

    divergence: Tensor | None
    student_logp: Tensor
    teacher_logp: Tensor
    support_kl: Tensor | None
    student_topk_mass: Tensor | None
    teacher_topk_mass: Tensor | None


# --------------------------------------------------------------------------------------------------
# Divergences on a common support
# --------------------------------------------------------------------------------------------------


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a * (log a - log b), with 0 wherever a == 0 (also for -inf log-probs), NaN-free.

    Where a > 0 and b == 0 the term is +inf, the true value. Gradients at a == 0 entries are exactly 0.
    """
    a = log_a.exp()
    dead = a == 0
    safe_a = torch.where(dead, torch.zeros_like(log_a), log_a)
    safe_b = torch.where(dead, torch.zeros_like(log_b), log_b)
    return torch.where(dead, torch.zeros_like(a), a * (safe_a - safe_b))


def divergence(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Per-token D_alpha(p, q) between log-distributions normalised over a common support.

    Args:
        student_logp: [..., S] log p, normalised over the last dim.
        teacher_logp: [..., S] log q, normalised over the last dim; detached here, so gradient flows
            only into ``student_logp``.
        alpha: 0 gives KL(q || p) (forward), 1 gives KL(p || q) (reverse, paper Eq. 1), in between the
            generalised JSD alpha KL(q || m) + (1 - alpha) KL(p || m), m = (1 - alpha) p + alpha q.

    Returns:
        [...] divergence. Zero-probability (-inf) entries contribute 0 without NaN in value or gradient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student_logp {tuple(student_logp.shape)} and teacher_logp {tuple(teacher_logp.shape)} "
            "must have the same shape"
        )
    teacher_logp = teacher_logp.detach()
    if alpha == 0.0:
        return _kl_terms(teacher_logp, student_logp).sum(-1)
    if alpha == 1.0:
        return _kl_terms(student_logp, teacher_logp).sum(-1)
    # log m = logsumexp(log(1 - alpha) + log p, log(alpha) + log q). Where both sides are -inf the
    # mixture's gradient would be NaN (-inf - -inf); those entries are zeroed by _kl_terms anyway, so
    # feed finite placeholders there.
    both_dead = torch.isneginf(student_logp) & torch.isneginf(teacher_logp)
    zero = torch.zeros_like(student_logp)
    log_m = torch.logaddexp(
        torch.where(both_dead, zero, student_logp) + math.log(1.0 - alpha),
        torch.where(both_dead, zero, teacher_logp) + math.log(alpha),
    )
    return alpha * _kl_terms(teacher_logp, log_m).sum(-1) + (1.0 - alpha) * _kl_terms(
        student_logp, log_m
    ).sum(-1)


def append_tail(logp_topk: Tensor) -> Tensor:
    """[..., K] log-probs -> [..., K + 1]: appends log(1 - sum exp), the mass outside the K entries.

    Computed as log(-expm1(lse)) with lse = logsumexp clamped to <= -1e-7, so the tail is finite.
    """
    lse = torch.logsumexp(logp_topk, dim=-1, keepdim=True).clamp(max=_TAIL_LSE_MAX)  # [..., 1]
    return torch.cat([logp_topk, torch.log(-torch.expm1(lse))], dim=-1)


def renormalize(logp_topk: Tensor) -> Tensor:
    """[..., K] log-probs -> [..., K] renormalised to sum to one over the K entries."""
    return logp_topk - torch.logsumexp(logp_topk, dim=-1, keepdim=True)


def importance_weight(logp_new: Tensor, logp_old: Tensor, is_clip: float | None) -> Tensor:
    """Detached w = min(exp(clamp(logp_new - logp_old, -20, 20)), is_clip); ``None`` disables the clip.

    Clipped from above only: a token the policy now likes less keeps its small weight.
    """
    if is_clip is not None and is_clip <= 0:
        raise ValueError(f"`is_clip` must be > 0 or None, got {is_clip}")
    log_ratio = (logp_new - logp_old).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    weight = log_ratio.exp()
    return weight if is_clip is None else weight.clamp(max=is_clip)


def sampled_token_surrogate(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-token sg(log p(y) - log q(y)) * log p(y): its gradient estimates grad KL(p || q) (alpha = 1)."""
    return (student_logp - teacher_logp).detach() * student_logp


def reference_kl(student_logp: Tensor, reference_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(p || p_ref) at the sampled token, TRL's `beta` term:
    exp(r - s) - (r - s) - 1 with s = log p(y), r = log p_ref(y). Non-negative, 0 where p(y) = p_ref(y);
    its gradient in s is 1 - p_ref(y) / p(y). The reference gets no gradient."""
    diff = reference_logp.detach().to(student_logp.dtype) - student_logp
    return torch.exp(diff) - diff - 1.0


def sequence_mean_loss(per_token: Tensor, mask: Tensor, normalizer: float | Tensor) -> Tensor:
    """sum_i [token mean of ``per_token`` over sequence i's active tokens] / ``normalizer``.

    Args:
        per_token: [B, L] per-token loss (anything, even inf/NaN, at masked positions).
        mask: [B, L] 0/1. A sequence with no active token contributes 0.
        normalizer: the caller's divisor. For the gradient of one optimizer step to be the mean over
            sequences whatever the micro-batching, pass ``n_active / grad_accum_steps``, where
            ``n_active`` counts the sequences with at least one active token in the *whole* generation
            batch (all micro-batches of that optimizer step) and ``grad_accum_steps`` is the divisor the
            Trainer applies to each micro-batch loss afterwards. Then the accumulated gradient is
            grad[sum over all active sequences of their token mean] / n_active: bs=8, GA=1 and
            bs=4, GA=2 give the same step.

    Returns:
        Scalar loss.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    active = mask > 0
    mask = mask.to(per_token.dtype)
    masked = torch.where(active, per_token, torch.zeros_like(per_token)) * mask  # [B, L]
    per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_sequence.sum() / normalizer


# --------------------------------------------------------------------------------------------------
# Support construction shared by the naive and the chunked paths
# --------------------------------------------------------------------------------------------------


def _support(logp: Tensor, *, full_vocab: bool, add_tail: bool) -> Tensor:
    """[..., K] gathered full-vocab log-probs -> the distribution the divergence sees."""
    if full_vocab:
        return logp
    return append_tail(logp) if add_tail else renormalize(logp)


def _effective_topk(topk: int | None, vocab: int) -> int | None:
    """None (full vocabulary) when topk is None or covers the whole vocabulary."""
    if topk is not None and topk < 1:
        raise ValueError(f"`topk` must be >= 1 or None, got {topk}")
    return None if topk is None or topk >= vocab else topk


def _check_scalars(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")


def distill_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target_ids: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    temperature: float,
) -> DistillTerms:
    """Unchunked reference on full logits: materialises [N, V] log-probs for both sides.

    Args:
        student_logits: [N, V] (any leading dims) with grad.
        teacher_logits: [N, V], treated as constant.
        target_ids: [N] sampled tokens y_t.
        alpha, topk, add_tail, temperature: as in ``chunked_distill``.
    """
    _check_scalars(alpha, temperature)
    k = _effective_topk(topk, student_logits.shape[-1])
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    s_logp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    y = target_ids.unsqueeze(-1)  # [N, 1]
    student_logp = s_logp.gather(-1, y).squeeze(-1)  # [N]
    teacher_logp = t_logp.gather(-1, y).squeeze(-1)  # [N]
    if k is None:
        s_top, t_top = s_logp, t_logp  # [N, V]
    else:
        idx = s_logp.detach().topk(k, dim=-1).indices  # [N, K]
        s_top, t_top = s_logp.gather(-1, idx), t_logp.gather(-1, idx)  # [N, K]
    s_sup = _support(s_top, full_vocab=k is None, add_tail=add_tail)  # [N, S]
    t_sup = _support(t_top, full_vocab=k is None, add_tail=add_tail)  # [N, S]
    with torch.no_grad():
        support_kl = divergence(s_sup, t_sup, 1.0)
        s_mass, t_mass = s_top.exp().sum(-1), t_top.exp().sum(-1)
    return DistillTerms(
        divergence=divergence(s_sup, t_sup, alpha),
        student_logp=student_logp,
        teacher_logp=teacher_logp,
        support_kl=support_kl,
        student_topk_mass=s_mass,
        teacher_topk_mass=t_mass,
    )
