"""Loss correctness side by side: sdpo_unsloth.loss vs the sdpo-rl package's exported loss functions.

    OMP_NUM_THREADS=1 python benchmarks/vs_sdpo_rl/loss_match.py [--write]

Fixed fp64 tensors (student logits, teacher logits, sampled ids, mask; small V) are saved to a .pt
file; sdpo-rl's functions run on them in their own venv (/tmp/sdpo-rl-venv, see vs_sdpo_rl.py
--setup) in a subprocess, ours here, and the per-token values, the masked aggregate and the gradient
w.r.t. the student logits are compared. Cases where the two claim the same formula:

* `append_tail` vs `add_tail_bucket` on the student's top-K log-probs.
* `divergence` vs `top_k_kl_divergence` on the same support (alpha 0, 0.5, 1; tail on/off).
* `distill_from_logits(...).divergence` vs their trainer's recipe (log_softmax, student top-K,
  teacher gathered at those indices, `top_k_kl_divergence`), then their `compute_self_distillation_loss`
  aggregate vs ours (token mean over the batch vs our per-sequence token mean).
* `importance_weight` vs `apply_importance_sampling_correction`.
* Edge cases: K >= V, and a -inf logit (a masked vocabulary entry) on the support.

The reference reading is SPEC §1: alpha=0 KL(q||p), alpha=1 KL(p||q), else
alpha KL(q||m) + (1-alpha) KL(p||m), m = (1-alpha) p + alpha q, tail log(1 - sum exp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

THEIRS_PY = Path("/tmp/sdpo-rl-venv/bin/python")
ALPHAS = (0.0, 0.5, 1.0)
B, T, V, K = 3, 5, 40, 8
TOL = 1e-10
FINDINGS = (
    "Findings. (1) The divergences agree to fp64 round-off, values and gradients, at alpha 0, 0.5, 1 with "
    "and without the tail: both implement SPEC §1 (alpha=0 KL(q||p), alpha=1 KL(p||q), JSD with "
    "m = (1-alpha) p + alpha q weighted alpha KL(q||m) + (1-alpha) KL(p||m); tail log(-expm1(lse)), lse "
    "clamped <= -1e-7; renormalised top-K without tail; student top-K indices for both sides). "
    "(2) A teacher log-prob of -inf on the support (a masked vocabulary entry): sdpo-rl's `F.kl_div` gives "
    "0 * -inf = NaN in the per-token value at alpha 0 and 0.5 (the gradient stays finite, but the logged "
    "loss is NaN); ours gives the mathematically correct finite value (0 log 0 = 0). At alpha 1 both give "
    "+inf, the true KL(p||q). (3) K >= V: ours switches to the exact full-vocabulary divergence; sdpo-rl "
    "appends a ~1e-7 tail bucket; the difference is ~1e-16. (4) Aggregation differs by design: sdpo-rl "
    "takes one token mean over the micro-batch (sum / sum of mask), ours a token mean per sequence then a "
    "mean over sequences normalised over the whole generation batch (SPEC §1, correct under gradient "
    "accumulation); with ragged lengths they differ (table), with equal lengths they coincide. "
    "(5) Not a loss-function difference but a trainer one, read from sdpo-rl's `compute_loss`: it takes "
    "`log_softmax` of raw logits, without dividing by the sampling temperature (SPEC §1 divides both sides "
    "by it), so at temperature != 1 its distributions and its importance ratio (against TRL's "
    "temperature-scaled old log-probs) differ from the paper's; at temperature 1 (the benchmark) they agree."
)


def make_inputs(path: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0
    t = s + torch.randn(B, T, V, generator=g, dtype=torch.float64)  # a related teacher
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = 0  # ragged lengths: aggregation conventions differ only when lengths differ
    mask[2, 1:] = 0
    old = torch.log_softmax(s + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old_logp = old.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # Edge case: the teacher assigns probability 0 (logit -inf, e.g. a masked vocabulary entry) to the
    # student's top-1 token at one position.
    t_inf = t.clone()
    top1 = s[1, 2].argmax()
    t_inf[1, 2, top1] = float("-inf")
    data = {"s": s, "t": t, "t_inf": t_inf, "ids": ids, "mask": mask, "old_logp": old_logp}
    torch.save(data, path)
    return data


# --------------------------------------------------------------------------------------------------
# Their side (runs in /tmp/sdpo-rl-venv; imports only torch and sdpo_rl)
# --------------------------------------------------------------------------------------------------


def their_recipe(s, t, k, alpha, add_tail):
    """sdpo-rl's SDPOTrainer.compute_loss recipe on logits: returns per-token KL [B, T] and grad."""
    import torch
    from sdpo_rl import top_k_kl_divergence

    s = s.clone().requires_grad_(True)
    s_lp = torch.log_softmax(s, dim=-1)
    s_top, idx = torch.topk(s_lp, k=k, dim=-1)
    t_top = torch.gather(torch.log_softmax(t, dim=-1), -1, idx)
    kl = top_k_kl_divergence(s_top, t_top, alpha=alpha, add_tail=add_tail)
    return kl, s


def theirs(inp: str, out: str) -> None:
    import torch
    from sdpo_rl import (
        add_tail_bucket,
        apply_importance_sampling_correction,
        compute_self_distillation_loss,
        top_k_kl_divergence,
    )

    d = torch.load(inp)
    s, t, ids, mask = d["s"], d["t"], d["ids"], d["mask"]
    res = {}
    s_lp = torch.log_softmax(s, -1)
    s_top, idx = torch.topk(s_lp, K, -1)
    t_top = torch.gather(torch.log_softmax(t, -1), -1, idx)
    res["tail"] = add_tail_bucket(s_top)
    for tail in (True, False):
        for a in ALPHAS:
            res[f"div/{a}/{tail}"] = top_k_kl_divergence(s_top, t_top, alpha=a, add_tail=tail)
            for name, teacher, k in (("logits", t, K), ("fullV", t, V), ("inf", d["t_inf"], K)):
                kl, leaf = their_recipe(s, teacher, k, a, tail)
                (kl * mask).sum().backward()
                res[f"{name}/{a}/{tail}"] = kl.detach()
                res[f"{name}-grad/{a}/{tail}"] = leaf.grad
            # Their aggregate (no IS correction: old_log_probs=None).
            kl, leaf = their_recipe(s, t, K, a, tail)
            s_logp = torch.log_softmax(leaf, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            t_logp = torch.log_softmax(t, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            s_top_l, idx_l = torch.topk(torch.log_softmax(leaf, -1), K, -1)
            t_top_l = torch.gather(torch.log_softmax(t, -1), -1, idx_l)
            loss, _ = compute_self_distillation_loss(
                s_logp, t_logp, mask, s_top_l, t_top_l, alpha=a, is_clip=None, add_tail=tail
            )
            res[f"agg/{a}/{tail}"] = loss.detach()
    s_logp = s_lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    res["is"] = apply_importance_sampling_correction(torch.ones_like(s_logp), s_logp, d["old_logp"], 2.0)
    torch.save(res, out)


# --------------------------------------------------------------------------------------------------
# Our side and the comparison
# --------------------------------------------------------------------------------------------------


def ours(d: dict) -> dict:
    import torch

    from sdpo_unsloth.loss import (
        append_tail,
        distill_from_logits,
        divergence,
        importance_weight,
        renormalize,
        sequence_mean_loss,
    )

    s, t, ids, mask = d["s"], d["t"], d["ids"], d["mask"]
    res = {}
    s_lp = torch.log_softmax(s, -1)
    s_top, idx = torch.topk(s_lp, K, -1)
    t_top = torch.gather(torch.log_softmax(t, -1), -1, idx)
    res["tail"] = append_tail(s_top)
    for tail in (True, False):
        sup = append_tail if tail else renormalize
        for a in ALPHAS:
            res[f"div/{a}/{tail}"] = divergence(sup(s_top), sup(t_top), a)
            for name, teacher, k in (("logits", t, K), ("fullV", t, V), ("inf", d["t_inf"], K)):
                leaf = s.clone().requires_grad_(True)
                terms = distill_from_logits(
                    leaf.reshape(-1, V), teacher.reshape(-1, V), ids.reshape(-1),
                    alpha=a, topk=k, add_tail=tail, temperature=1.0,
                )  # fmt: skip
                kl = terms.divergence.reshape(B, T)
                (kl * mask).sum().backward()
                res[f"{name}/{a}/{tail}"] = kl.detach()
                res[f"{name}-grad/{a}/{tail}"] = leaf.grad
            kl = res[f"logits/{a}/{tail}"]
            res[f"agg/{a}/{tail}"] = sequence_mean_loss(kl, mask, float((mask.sum(-1) > 0).sum()))
            res[f"agg-token-mean/{a}/{tail}"] = (kl * mask).sum() / mask.sum()
    s_logp = s_lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    res["is"] = importance_weight(s_logp, d["old_logp"], 2.0)
    return res


def max_diff(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    ok = both_nan | same_inf
    if (torch.isnan(a) ^ torch.isnan(b)).any() or (torch.isinf(a) ^ torch.isinf(b)).any():
        return float("inf")
    return float((a - b).abs()[~ok].max()) if (~ok).any() else 0.0


def describe(x) -> str:
    import torch

    if torch.isnan(x).any():
        return f"NaN ({int(torch.isnan(x).sum())} entries)"
    return "finite"


def compare(mine: dict, theirs_res: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def row(label: str, key: str, note: str = "") -> None:
        d = max_diff(mine[key], theirs_res[key])
        verdict = "agree" if d <= TOL else "DIFFER"
        extra = f" (ours {describe(mine[key])}, theirs {describe(theirs_res[key])})" if d > TOL else ""
        rows.append((label, f"{verdict}, max abs diff {d:.1e}{extra}", note))

    row("`append_tail` vs `add_tail_bucket`", "tail")
    for tail in (True, False):
        for a in ALPHAS:
            row(f"`divergence` vs `top_k_kl_divergence`, alpha {a}, tail {tail}", f"div/{a}/{tail}")
    for tail in (True, False):
        for a in ALPHAS:
            row(f"per-token loss from logits, K={K}, alpha {a}, tail {tail}", f"logits/{a}/{tail}")
            row("  grad w.r.t. student logits", f"logits-grad/{a}/{tail}")
    for tail in (True, False):
        for a in ALPHAS:
            row(f"K >= V (K=V={V}), alpha {a}, tail {tail}", f"fullV/{a}/{tail}",
                "ours: exact full-vocab (no tail); theirs: K=V plus a ~1e-7 tail bucket" if tail else "")  # fmt: skip
    for tail in (True, False):
        for a in ALPHAS:
            row(f"teacher logit -inf on the support, alpha {a}, tail {tail}", f"inf/{a}/{tail}")
            row("  grad w.r.t. student logits", f"inf-grad/{a}/{tail}")
    for tail in (True, False):
        for a in ALPHAS:
            key = f"agg/{a}/{tail}"
            d_seq = max_diff(mine[key], theirs_res[key])
            d_tok = max_diff(mine[f"agg-token-mean/{a}/{tail}"], theirs_res[key])
            rows.append((
                f"aggregate over a ragged mask, alpha {a}, tail {tail}",
                f"ours (seq-mean) {float(mine[key]):.6f} vs theirs (token-mean) {float(theirs_res[key]):.6f}; "
                f"ours re-aggregated token-mean: {'agree' if d_tok <= TOL else 'DIFFER'} ({d_tok:.1e})",
                "different convention" if d_seq > TOL else "",
            ))  # fmt: skip
    row("importance weight (is_clip 2)", "is")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--theirs", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.theirs:
        theirs(*a.theirs)
        return
    import torch

    tmp = tempfile.mkdtemp(prefix="vs-sdpo-rl-loss-")
    inp, out = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
    data = make_inputs(inp)
    if not THEIRS_PY.exists():
        sys.exit("missing /tmp/sdpo-rl-venv: run `python benchmarks/vs_sdpo_rl/throughput.py --setup` first")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([str(THEIRS_PY), str(Path(__file__).resolve()), "--theirs", inp, out], env=env, check=True,
                   cwd=tmp)  # fmt: skip
    rows = compare(ours(data), torch.load(out))
    table = "| check | result | note |\n|---|---|---|\n" + "\n".join(
        f"| {x} | {y} | {z} |" for x, y, z in rows
    )
    print(table)
    if a.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from common import write_section

        write_section(
            "vs-sdpo-rl-loss",
            "### Loss side by side: sdpo_unsloth.loss vs sdpo-rl 0.0.3\n\n"
            f"`OMP_NUM_THREADS=1 python benchmarks/vs_sdpo_rl/loss_match.py --write` on {date.today()}: fixed fp64 "
            f"tensors (B={B}, T={T}, V={V}, K={K}, ragged mask), theirs run in their own venv. "
            f"'agree' means max abs diff <= {TOL:g}.\n\n" + table + "\n\n" + FINDINGS + "\n",
        )


if __name__ == "__main__":
    main()
