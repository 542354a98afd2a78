"""SDPO distillation loss: divergences, top-K support with tail, importance weights, chunked log-probs.

Self-Distilled Policy Optimization, from "Reinforcement Learning via Self-Distillation" (arXiv 2601.20802).
The student p_t = pi(. | x, y<t) is pulled towards the teacher q_t = pi(. | reprompt(x, f), y<t), which
is the same model shown feedback or a successful sibling answer and gets no gradient.

Per completion token t of sequence i::

    loss_it = w_it * D_alpha(p_t, q_t)                          (masked by m_it)
    w_it    = sg(min(exp(clamp(log p_new(y_t) - log p_old(y_t), -20, 20)), is_clip))
    L       = sum_i [ sum_t m_it loss_it / max(1, sum_t m_it) ] / normalizer

    D_0     = KL(q || p) = sum_v q_v (log q_v - log p_v)                       ("forward")
    D_1     = KL(p || q) = sum_v p_v (log p_v - log q_v)                       ("reverse", paper Eq. 1)
    D_alpha = alpha KL(q || m) + (1 - alpha) KL(p || m),  m = (1 - alpha) p + alpha q,  0 < alpha < 1
              (generalised Jensen-Shannon; log m is taken with logsumexp; alpha = 0.5 is the symmetric JSD)

The sum over v runs over a support S: the K indices of the largest *student* logits (the teacher is
gathered at the same indices), plus one tail entry log(1 - sum_{v in S} p_v) on each side; without the
tail both sides are renormalised over the K entries. K = None (or K >= V) is the full vocabulary, with
no tail. Both sides are true full-vocabulary log-probs, logit / T - logsumexp_V(logit / T), at the
sampling temperature T.

Sampled-token mode (alpha = 1 only) replaces D by the surrogate sg(log p(y_t) - log q(y_t)) log p(y_t),
whose gradient is the single-sample estimate of grad KL(p || q).

Memory: Qwen2.5's V = 151,936 makes one fp32 [N, V] tensor 1.2 GB at N = 2048. ``chunked_distill``
projects hidden states to logits ``chunk_size`` rows at a time, and computes each token's gradient with
respect to its own hidden state while that chunk's logits exist (the frozen output projection makes the
token's loss a function of its hidden state alone). Backward is then a per-token scaling of those
[N, H] rows: no [N, V] tensor is ever kept, in forward or backward.

Shapes: ``B`` sequences, ``L`` completion length, ``N`` flattened active tokens, ``K`` top-k, ``S`` support
size (K, K + 1 with the tail, or V), ``V`` vocabulary, ``H`` hidden size, ``n`` rows of one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DistillTerms",
    "append_tail",
    "chunked_distill",
    "distill_from_logits",
    "divergence",
    "importance_weight",
    "renormalize",
    "sampled_token_surrogate",
    "sequence_mean_loss",
]

# log(1 - sum p) is computed from lse = log(sum p) clamped to at most this value, so that the tail entry
# stays finite (>= log(1e-7) ~= -16.1) when the support holds (almost) all the mass.
_TAIL_LSE_MAX = -1e-7
# Importance ratios are exp(clamp(log ratio, -20, 20)).
_LOG_RATIO_CLAMP = 20.0
# A half-precision lm_head is upcast this many vocabulary rows at a time, never as a whole [V, H] copy.
_VOCAB_BLOCK = 16384
# Gathered lm_head rows ([rows, K, H]) are processed at most this many elements at a time (8 MB in fp32).
_GATHER_BLOCK = 1 << 21


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


# --------------------------------------------------------------------------------------------------
# Chunked path
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkSpec:
    alpha: float
    topk: int | None  # None: full vocabulary
    add_tail: bool
    temperature: float
    logit_softcap: float | None
    chunk_size: int
    need_divergence: bool
    need_grad: bool
    dtype: torch.dtype  # compute dtype: float32, or float64 for float64 inputs


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: _ChunkSpec) -> Tensor:
    """[n, H] -> [n, V] logits (softcap(h W^T + b)) / T in the compute dtype, built in place."""
    h = hidden.to(spec.dtype)
    if weight.dtype == spec.dtype:
        logits = h @ weight.T  # [n, V]
    else:
        logits = h.new_empty(h.shape[0], weight.shape[0])  # [n, V]
        for v0 in range(0, weight.shape[0], _VOCAB_BLOCK):
            logits[:, v0 : v0 + _VOCAB_BLOCK] = h @ weight[v0 : v0 + _VOCAB_BLOCK].to(spec.dtype).T
    if bias is not None:
        logits += bias.to(spec.dtype)
    if spec.logit_softcap is not None:
        logits.div_(spec.logit_softcap).tanh_().mul_(spec.logit_softcap)
    return logits.div_(spec.temperature)


def _project_back(grad_logits: Tensor, weight: Tensor) -> Tensor:
    """[n, V] @ [V, H] -> [n, H] in the dtype of ``grad_logits``, upcasting ``weight`` block by block."""
    if weight.dtype == grad_logits.dtype:
        return grad_logits @ weight
    out = grad_logits.new_zeros(grad_logits.shape[0], weight.shape[1])  # [n, H]
    for v0 in range(0, weight.shape[0], _VOCAB_BLOCK):
        out += grad_logits[:, v0 : v0 + _VOCAB_BLOCK] @ weight[v0 : v0 + _VOCAB_BLOCK].to(out.dtype)
    return out


def _weighted_rows(weight: Tensor, idx: Tensor, coef: Tensor) -> Tensor:
    """sum_k coef[r, k] * weight[idx[r, k]] -> [n, H] in the dtype of ``coef``, without a [n, V] tensor.

    ``idx``/``coef`` are [n, K]; rows are gathered a block at a time so the [rows, K, H] copy stays small.
    """
    n, k = idx.shape
    out = coef.new_empty(n, weight.shape[1])  # [n, H]
    rows = max(1, _GATHER_BLOCK // (k * weight.shape[1]))
    for r0 in range(0, n, rows):
        picked = weight[idx[r0 : r0 + rows]].to(coef.dtype)  # [rows, K, H]
        out[r0 : r0 + rows] = torch.bmm(coef[r0 : r0 + rows].unsqueeze(1), picked).squeeze(1)
    return out


def _to_probs_(logits: Tensor) -> Tensor:
    """Turns [n, V] logits into probabilities *in place*; returns logsumexp [n, 1]. No [n, V] temporary."""
    top = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # [n, 1]
    logits.div_(total)
    return top + total.log()


def _distill_chunk(
    student_hidden: Tensor,  # [n, H]
    teacher_hidden: Tensor,  # [n, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    target_ids: Tensor,  # [n]
    spec: _ChunkSpec,
) -> tuple[list[Tensor | None], Tensor | None, Tensor | None]:
    """One chunk, no autograd graph kept. Returns the per-token outputs and, if ``spec.need_grad``,
    the [n, H] rows d divergence_t / d h_t and d log p(y_t) / d h_t.

    With top-K at most two [n, V] buffers live at once (three with a softcap): the student's logits,
    turned into its probabilities in place, and the teacher's logits.
    """
    y = target_ids.unsqueeze(1)  # [n, 1]
    full = spec.topk is None
    s_logits = _project(student_hidden, weight, bias, spec)  # [n, V]
    s_y = s_logits.gather(1, y)  # [n, 1]
    idx = s_top = None
    if spec.need_divergence:
        if full:
            s_top = s_logits.clone()  # [n, V]
        else:
            s_top, idx = s_logits.topk(spec.topk, dim=-1)  # [n, K]
    scale = None
    if spec.need_grad and spec.logit_softcap is not None:
        # d logit / d z = sech^2(z / c) / T for logit = c tanh(z / c) / T; tanh(z / c) = logit T / c.
        scale = s_logits * (spec.temperature / spec.logit_softcap)  # [n, V]
        scale = scale.square_().neg_().add_(1.0)
    s_lse = _to_probs_(s_logits)  # [n, 1]
    probs = s_logits  # [n, V]
    del s_logits
    s_tgt = (s_y - s_lse).squeeze(1)  # [n]

    # Teacher: only its log-probs at y and on the student's support leave this block.
    t_logits = _project(teacher_hidden, weight, bias, spec)  # [n, V]
    t_y = t_logits.gather(1, y)  # [n, 1]
    t_top = None
    if spec.need_divergence:
        t_top = t_logits.clone() if full else t_logits.gather(1, idx)  # [n, V] or [n, K]
    t_lse = _to_probs_(t_logits)  # [n, 1]
    del t_logits
    t_tgt = (t_y - t_lse).squeeze(1)  # [n]

    div = kl = s_mass = t_mass = grad_top = None
    if spec.need_divergence:
        s_top, t_top = s_top.sub_(s_lse), t_top.sub_(t_lse)  # full-vocab log-probs  [n, K] or [n, V]
        with torch.enable_grad():
            leaf = s_top.detach().requires_grad_(spec.need_grad)
            s_sup = _support(leaf, full_vocab=full, add_tail=spec.add_tail)  # [n, S]
            t_sup = _support(t_top, full_vocab=full, add_tail=spec.add_tail)  # [n, S]
            div = divergence(s_sup, t_sup, spec.alpha)  # [n]
            if spec.need_grad:
                # Rows are independent, so the gradient of the sum holds each token's own Jacobian row.
                (grad_top,) = torch.autograd.grad(div.sum(), leaf)  # [n, K] or [n, V]
        div = div.detach()
        kl = divergence(s_sup.detach(), t_sup, 1.0)
        s_mass, t_mass = s_top.exp().sum(-1), t_top.exp().sum(-1)
        del s_top, t_top, s_sup, t_sup, leaf

    outputs = [div, s_tgt, t_tgt, kl, s_mass, t_mass]
    if not spec.need_grad:
        return outputs, None, None

    # With d(logit_v - lse)/d logit_j = [v == j] - p_j and d logit_j / d h = s_j W_j / T (s = sech^2 or 1):
    #   d log p(y) / d h = (s_y W_y - sum_j p_j s_j W_j) / T
    #   d div / d h      = (sum_v g_v s_v W_v - (sum_v g_v) sum_j p_j s_j W_j) / T,  g = d div / d log p_v
    # so one [n, V] @ [V, H] product, Q = (p * s) @ W, serves both; the rest are sparse row gathers.
    if scale is not None:
        probs.mul_(scale)
    q_rows = _project_back(probs, weight)  # [n, H]
    del probs
    s_at_y = torch.ones_like(s_y) if scale is None else scale.gather(1, y)  # [n, 1]
    jac_tgt = (_weighted_rows(weight, y, s_at_y) - q_rows).div_(spec.temperature)  # [n, H]
    jac_div = None
    if grad_top is not None:
        if full:
            sparse = _project_back(grad_top if scale is None else grad_top * scale, weight)  # [n, H]
        else:
            coef = grad_top if scale is None else grad_top * scale.gather(1, idx)  # [n, K]
            sparse = _weighted_rows(weight, idx, coef)  # [n, H]
        jac_div = (sparse - grad_top.sum(-1, keepdim=True) * q_rows).div_(spec.temperature)  # [n, H]
    return outputs, jac_div, jac_tgt


class _ChunkedDistill(torch.autograd.Function):
    """Forward runs the chunks and keeps, per token, the gradient rows w.r.t. its hidden state.

    Backward: grad h_t = g_div_t * d div_t / d h_t + g_logp_t * d log p(y_t) / d h_t.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, target_ids, spec):
        n_tokens, hidden_size = student_hidden.shape
        chunks: list[list[Tensor | None]] = []
        rows_shape = (n_tokens, hidden_size)  # d divergence_t / d h_t and d log p(y_t) / d h_t  [N, H]
        need_div_rows = spec.need_grad and spec.need_divergence
        jac_div = student_hidden.new_zeros(rows_shape, dtype=spec.dtype) if need_div_rows else None
        jac_tgt = student_hidden.new_zeros(rows_shape, dtype=spec.dtype) if spec.need_grad else None
        # An enclosing autocast region would run the projections in half precision: logits stay fp32.
        with torch.autocast(student_hidden.device.type, enabled=False):
            for start in range(0, n_tokens, spec.chunk_size):
                rows = slice(start, start + spec.chunk_size)
                out, j_div, j_tgt = _distill_chunk(
                    student_hidden[rows], teacher_hidden[rows], weight, bias, target_ids[rows], spec
                )
                chunks.append(out)
                if j_div is not None:
                    jac_div[rows] = j_div
                if j_tgt is not None:
                    jac_tgt[rows] = j_tgt
        outputs = tuple(
            student_hidden.new_zeros(0, dtype=spec.dtype)
            if not chunks or chunks[0][i] is None
            else torch.cat([c[i] for c in chunks])
            for i in range(6)
        )
        ctx.hidden_dtype = student_hidden.dtype
        ctx.save_for_backward(jac_div, jac_tgt)
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    def backward(ctx, grad_div, grad_logp, *_unused):
        jac_div, jac_tgt = ctx.saved_tensors
        grad = grad_logp.to(jac_tgt.dtype).unsqueeze(1) * jac_tgt  # [N, H]
        if jac_div is not None and grad_div.numel():
            grad = grad + grad_div.to(jac_div.dtype).unsqueeze(1) * jac_div
        return grad.to(ctx.hidden_dtype), None, None, None, None, None


def chunked_distill(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    target_ids: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    temperature: float,
    lm_head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    chunk_size: int = 1024,
    need_divergence: bool = True,
) -> DistillTerms:
    """SDPO per-token terms from hidden states, never holding more than one chunk of [chunk_size, V] logits.

    Logits are (softcap(h W^T + b)) / temperature, computed in fp32 (fp64 for fp64 inputs) whatever the
    dtype of ``h`` and ``W``; the softcap is c * tanh(z / c). The support is the top-``topk`` indices of
    the student's logits (teacher gathered at the same indices), with a tail entry if ``add_tail`` else
    renormalised; ``topk=None`` (or >= V) is the full vocabulary without tail.

    Each token's loss depends only on its own hidden state (the projection is frozen), so the forward pass
    also computes, chunk by chunk, the [N, H] gradient rows of ``divergence`` and ``student_logp``;
    backward only scales them. This is skipped when no gradient is needed. The projection gets no gradient.

    Args:
        student_hidden: [N, H] final (normed) hidden states at the positions that predict y_t, with grad.
        teacher_hidden: [N, H] the same positions under the teacher; never receives gradient.
        lm_head_weight: [V, H] frozen output projection (fp32, fp16 or bf16).
        target_ids: [N] sampled completion tokens y_t.
        alpha: divergence, see ``divergence``.
        topk: support size K, or None for the full vocabulary.
        add_tail: append the (K + 1)-th "everything else" entry, else renormalise the K entries.
        temperature: sampling temperature T that produced y; applied to both sides.
        lm_head_bias: [V] optional frozen bias.
        logit_softcap: optional c of a final-logit softcap (Gemma-2 style), applied before T.
        chunk_size: rows of hidden states projected at a time.
        need_divergence: False skips the support and the teacher's top-K gather (sampled-token mode);
            ``divergence`` and the support statistics are then None.

    Returns:
        ``DistillTerms`` with [N] tensors; ``divergence`` and ``student_logp`` carry the student's grad.
    """
    _check_scalars(alpha, temperature)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"`logit_softcap` must be > 0 or None, got {logit_softcap}")
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(lm_head_weight.shape)}")
    vocab, hidden_size = lm_head_weight.shape
    for name, h in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if h.dim() != 2 or h.shape[1] != hidden_size:
            raise ValueError(
                f"{name} must be [N, H] with H = {hidden_size} (lm_head_weight is [{vocab}, {hidden_size}]), "
                f"got {tuple(h.shape)}; pass final hidden states, not logits"
            )
    if teacher_hidden.shape[0] != student_hidden.shape[0] or target_ids.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} and "
            f"target_ids {tuple(target_ids.shape)} must agree on N"
        )
    if lm_head_weight.requires_grad or (lm_head_bias is not None and lm_head_bias.requires_grad):
        raise ValueError(
            "chunked_distill treats the output projection as frozen, but lm_head_weight/lm_head_bias "
            "requires grad: pass `.detach()`ed tensors, or use distill_from_logits to train lm_head"
        )
    dtype = torch.float64 if torch.float64 in (student_hidden.dtype, lm_head_weight.dtype) else torch.float32
    spec = _ChunkSpec(
        alpha=alpha,
        topk=_effective_topk(topk, vocab),
        add_tail=add_tail,
        temperature=float(temperature),
        logit_softcap=logit_softcap,
        chunk_size=chunk_size,
        need_divergence=need_divergence,
        need_grad=torch.is_grad_enabled() and student_hidden.requires_grad,
        dtype=dtype,
    )
    div, s_logp, t_logp, kl, s_mass, t_mass = _ChunkedDistill.apply(
        student_hidden, teacher_hidden.detach(), lm_head_weight, lm_head_bias, target_ids, spec
    )
    if not need_divergence:
        div = kl = s_mass = t_mass = None
    return DistillTerms(
        divergence=div,
        student_logp=s_logp,
        teacher_logp=t_logp,
        support_kl=kl,
        student_topk_mass=s_mass,
        teacher_topk_mass=t_mass,
    )
