"""Per-batch diagnostics of the near-future test (method, section 7), and a ROC AUC for the detector.

Plain numpy in float64: these are a few hundred numbers a step, logged, never differentiated.
Degenerate inputs (fewer than two points, a constant series, a single class) give nan, silently:
a step without candidates is normal and must not spam warnings.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from services.trainer.objective import Detection, aggregate_tokens
from topd_client.errors import InvalidInputError

ArrayLike = Tensor | np.ndarray | list[float]


def _as_array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = _as_array(x), _as_array(y)
    if xa.shape != ya.shape:
        raise InvalidInputError(f"paired series differ in length: {xa.size} vs {ya.size}")
    return xa, ya


def average_ranks(x: ArrayLike) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    xa = _as_array(x)
    order = np.argsort(xa, kind="stable")
    sorted_x = xa[order]
    # Start index of each run of equal values, and the run each sorted entry belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], xa.size]
    ranks = np.empty(xa.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]
    return ranks


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2); nan for n < 2 or a constant series."""
    xa, ya = _pair(x, y)
    if xa.size < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    dx, dy = xa - xa.mean(), ya - ya.mean()
    return float(np.clip((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson of the average ranks; nan for n < 2 or a constant series."""
    xa, ya = _pair(x, y)
    return pearson(average_ranks(xa), average_ranks(ya))


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), by the Mann-Whitney rank sum:

        AUC = (sum of positives' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    labels are truthy for positives. 1 = perfect separation, 0 = reversed, 0.5 = chance (or all
    tied); nan when a class is absent.
    """
    s, lab = _pair(scores, labels)
    pos = lab != 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def batch_diagnostics(loss_BT: Tensor, mask_BT: Tensor, detection: Detection | None) -> dict[str, float]:
    """What a user of the method watches per step (section 7), as namespaced floats.

    loss_BT is l_t = log pi_S - log pi_T (`objective.token_loss`). opd/reverse_kl is its mean over
    response tokens; the topd/ keys need the detection (omitted without one):
    false_alarm_frac = false alarms / candidates, pearson and spearman of l_t vs D over the
    candidates, mean_ot = mean D, num_candidates, num_divergent.
    """
    mask = mask_BT.bool()
    out = {"opd/reverse_kl": float(aggregate_tokens(loss_BT.detach().float(), mask))}
    if detection is None:
        return out
    loss_N = loss_BT.detach()[detection.candidates_BT.bool()]
    D_N = _as_array(detection.D_N)
    n = D_N.size
    nan = float("nan")
    out.update({
        "topd/num_candidates": float(n),
        "topd/num_divergent": float(detection.divergent_N.bool().sum()),
        "topd/false_alarm_frac": float(detection.false_alarm_N.sum()) / n if n else nan,
        "topd/mean_ot": float(D_N.mean()) if n else nan,
        "topd/pearson": pearson(loss_N, D_N),
        "topd/spearman": spearman(loss_N, D_N),
    })
    return out

