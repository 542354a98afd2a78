"""The memory-bounded SDPO loss: ``chunked_distill`` projects hidden states to logits ``chunk_size`` rows at a
time and computes each token's gradient with respect to its own hidden state while that chunk's logits
exist, so no [N, V] tensor is kept in forward or backward (see the `sdpo_unsloth.loss` docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .terms import DistillTerms, _check_scalars, _effective_topk, _support, divergence

# A half-precision lm_head is upcast this many vocabulary rows at a time, never as a whole [V, H] copy.
_VOCAB_BLOCK = 16384
# Gathered lm_head rows ([rows, K, H]) are processed at most this many elements at a time (8 MB in fp32).
_GATHER_BLOCK = 1 << 21


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


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The logits' dtype: float64 when the hidden states or the head are float64, else float32."""
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


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
    # With top-K, student and teacher rows go through the head in one product: with few tokens per chunk it is
    # bound by reading W, and one pass is cheaper than two; the teacher half is the second [n, V] buffer counted
    # above. Over the full vocabulary the teacher's logits are projected apart, so that they are freed before
    # the divergence (a shared buffer would keep them: one more [n, V] at that path's peak).
    n = student_hidden.shape[0]
    if full:
        s_logits, t_logits = _project(student_hidden, weight, bias, spec), None  # [n, V]
    else:
        rows = torch.cat([student_hidden.to(spec.dtype), teacher_hidden.to(spec.dtype)])  # [2n, H]
        both = _project(rows, weight, bias, spec)
        s_logits, t_logits = both[:n], both[n:]  # [n, V] each
        del both
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
    if t_logits is None:
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
    dtype = _compute_dtype(student_hidden, lm_head_weight)
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


@torch.no_grad()
def sampled_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    target_ids: Tensor,
    *,
    temperature: float,
    lm_head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """[N] log p(y_t) over the full vocabulary from [N, H] hidden states, ``chunk_size`` rows of logits at a
    time, with the logits of ``chunked_distill`` (softcap, then / temperature; fp32, fp64 for fp64 inputs).
    No gradient: it scores a reference policy (the KL anchor of `GRPOConfig.beta`)."""
    _check_scalars(0.0, temperature)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(hidden, lm_head_weight)
    spec = _ChunkSpec(0.0, None, False, float(temperature), logit_softcap, chunk_size, False, False, dtype)
    out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)  # [N]
    for r0 in range(0, hidden.shape[0], chunk_size):
        logits = _project(hidden[r0 : r0 + chunk_size], lm_head_weight, lm_head_bias, spec)  # [n, V]
        picked = logits.gather(1, target_ids[r0 : r0 + chunk_size].unsqueeze(1)).squeeze(1)  # [n]
        out[r0 : r0 + chunk_size] = picked - torch.logsumexp(logits, dim=-1)
    return out
