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

Rooms: ``loss.terms`` (the divergences, support, importance weight, sequence mean and the
logits path ``distill_from_logits``) and ``loss.chunked`` (``chunked_distill``, the memory-bounded path with
its own autograd function). Both are re-exported here.

Shapes: ``B`` sequences, ``L`` completion length, ``N`` flattened active tokens, ``K`` top-k, ``S`` support
size (K, K + 1 with the tail, or V), ``V`` vocabulary, ``H`` hidden size, ``n`` rows of one chunk.
"""

from __future__ import annotations

from .chunked import chunked_distill, sampled_logps
from .terms import (
    DistillTerms,
    append_tail,
    distill_from_logits,
    divergence,
    importance_weight,
    reference_kl,
    renormalize,
    sampled_token_surrogate,
    sequence_mean_loss,
)

__all__ = [
    "DistillTerms",
    "append_tail",
    "chunked_distill",
    "distill_from_logits",
    "divergence",
    "importance_weight",
    "reference_kl",
    "renormalize",
    "sampled_logps",
    "sampled_token_surrogate",
    "sequence_mean_loss",
]
