"""KL divergences between a student and a teacher on k shared token ids plus one tail bucket.

Binning the vocabulary into the k ids and "everything else" keeps each a true KL (>= 0, 0 iff the
bins agree); with k = V it is the full-vocabulary KL. Shape suffixes: X any leading shape, k ids, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# -inf teacher log-probs (padding, impossible tokens) become this, so 0 * inf never reaches a gradient.
LOGP_FLOOR = -1e4


def gather_logprobs(logits_XV: Tensor, ids_Xk: Tensor) -> Tensor:
    """log softmax(logits)[ids] = logits[ids] - logsumexp(logits), [X, V], [X, k] -> [X, k].

    Never materialises the full log-softmax (V ~ 150k). Also right when given log-probs, whose
    logsumexp is 0. Pass float32 logits: bf16 logsumexp loses the tail.
    """
    return logits_XV.gather(-1, ids_Xk.long()) - torch.logsumexp(logits_XV, dim=-1, keepdim=True)


def entropy(logits_XV: Tensor) -> Tensor:
    """H(softmax(logits)) = -sum_v p_v log p_v in nats, detached (a diagnostic). [X, V] -> [X].

    Written as logsumexp(l) - sum_v p_v l_v (the sum as a batched dot product: no [X, V] product is
    materialised), so a probability that underflows to 0 needs no log; an id at -inf adds nothing.
    """
    logits = logits_XV.detach().float().clamp(min=torch.finfo(torch.float32).min)
    lse_X1 = torch.logsumexp(logits, dim=-1, keepdim=True)
    p_XV = (logits - lse_X1).exp_()
    V = logits.shape[-1]
    dot_X = (p_XV.reshape(-1, 1, V) @ logits.reshape(-1, V, 1)).reshape(lse_X1.shape[:-1])
    return lse_X1.squeeze(-1) - dot_X


def tail_logprob(logp_Xk: Tensor, tail_eps: float = 1e-6) -> Tensor:
    """log of the mass outside the k ids, log(1 - sum_j exp(logp_j)), floored at log(tail_eps).

    The floor keeps the log (and its gradient) finite when the k ids hold all the mass, e.g.
    k = V, or a float32 sum that rounds to 1. [X, k] -> [X].
    """
    x = torch.logsumexp(logp_Xk, dim=-1).clamp(max=math.log1p(-tail_eps))
    # log(1 - e^x), accurate near 0 (expm1) and far below it (log1p).
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_forward_kl(student_logp_Xk: Tensor, teacher_logp_Xk: Tensor, tail_eps: float = 1e-6) -> Tensor:
    """KL(T || S) over the teacher's k ids plus one tail bucket for every other id:

        KL = sum_j pT_j (log pT_j - log pS_j) + pT_tail (log pT_tail - log pS_tail),  p_tail = 1 - sum_j p_j

    Both inputs are log-probs on the same ids (student: `gather_logprobs` of full logits, with grad).
    Binning the vocabulary into k + 1 bins keeps it a true KL (>= 0, 0 iff the bins agree); with
    k = V it is the full-vocabulary KL (the teacher's tail is 0 and adds nothing). [X, k] -> [X].
    """
    t_Xk = teacher_logp_Xk.detach().clamp(min=LOGP_FLOOR)
    pT_Xk = t_Xk.exp()
    head_X = (pT_Xk * (t_Xk - student_logp_Xk)).sum(-1)
    pT_tail_X = (-torch.expm1(torch.logsumexp(t_Xk, dim=-1))).clamp(min=0.0)
    tail_gap_X = tail_logprob(t_Xk, tail_eps) - tail_logprob(student_logp_Xk, tail_eps)
    return head_X + torch.where(pT_tail_X > 0, pT_tail_X * tail_gap_X, torch.zeros_like(head_X))


def topk_reverse_kl(
    student_logp_Xk: Tensor, teacher_logp_Xk: Tensor, tail: bool = True, tail_eps: float = 1e-6
) -> Tensor:
    """KL(S || T) over k shared ids, optionally plus the tail bucket:

        KL = sum_j pS_j (log pS_j - log pT_j) [+ pS_tail (log pS_tail - log pT_tail)]

    The ids may be the teacher's top-k (student log-probs gathered from full logits) or the
    student's (teacher scored on them). Without the tail it is the usual truncated sum and may be
    negative; with it, a true KL between binned distributions that also charges the student for
    mass it puts outside the k ids. Gradient flows through the student only. [X, k] -> [X].
    """
    t_Xk = teacher_logp_Xk.detach().clamp(min=LOGP_FLOOR)
    kl_X = (student_logp_Xk.exp() * (student_logp_Xk - t_Xk)).sum(-1)
    if not tail:
        return kl_X
    s_tail_X = tail_logprob(student_logp_Xk, tail_eps)
    return kl_X + s_tail_X.exp() * (s_tail_X - tail_logprob(t_Xk, tail_eps))
