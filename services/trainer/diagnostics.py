"""Per-batch diagnostics of the near-future test (method, section 7), and the detector against ground truth.

scipy.stats in float64: these are a few hundred numbers a step, logged, never differentiated.
Degenerate inputs (fewer than two points, a constant series, a single class) give nan, silently:
a step without candidates is normal and must not spam warnings.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
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


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's r (scipy); nan for n < 2 or a constant series."""
    xa, ya = _pair(x, y)
    if xa.size < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    return float(stats.pearsonr(xa, ya).statistic)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rho (scipy; ties share their average rank); nan for n < 2 or a constant series."""
    xa, ya = _pair(x, y)
    if xa.size < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    return float(stats.spearmanr(xa, ya).statistic)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney U of the positives
    over n_pos * n_neg. labels are truthy for positives. 1 = perfect separation, 0 = reversed,
    0.5 = chance (or all tied); nan when a class is absent.
    """
    s, lab = _pair(scores, labels)
    pos = lab != 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(stats.mannwhitneyu(s[pos], s[~pos], alternative="two-sided").statistic / (n_pos * n_neg))


def choose_threshold(D_N: ArrayLike, error_N: ArrayLike) -> float:
    """The bar for `divergent_rule=threshold`, chosen on labelled held-out candidates: the D threshold
    (divergent = D > threshold) that maximises Youden's J = recall of errors - false-positive rate on
    benign candidates, placed midway between two adjacent observed values of D (the lowest such
    threshold when several tie). J weighs both classes equally, so the bar does not depend on how
    many benign candidates the held-out batch happened to have.
    """
    D, error = _as_array(D_N), _as_array(error_N) != 0
    if D.size != error.size:
        raise InvalidInputError(f"{D.size} values of D but {error.size} labels")
    if error.all() or not error.any():
        raise InvalidInputError("choosing a threshold needs both benign and error candidates")
    values = np.unique(D)
    if values.size == 1:
        return float(values[0])
    cuts = (values[:-1] + values[1:]) / 2
    tpr = (D[error][None, :] > cuts[:, None]).mean(axis=1)
    fpr = (D[~error][None, :] > cuts[:, None]).mean(axis=1)
    return float(cuts[int(np.argmax(tpr - fpr))])


def detector_scores(error_N: ArrayLike, D_N: ArrayLike, divergent_N: ArrayLike,
                    fork_N: ArrayLike | None = None) -> dict[str, float]:
    """The detector against ground truth: AUC of D for errors, precision/recall of the divergent set
    (for errors) and of the false-alarm calls (for benign candidates: fa_precision = benign share of
    the candidates called false alarms, fa_recall = share of benign candidates called false alarms),
    and the benign fraction of the candidates (the paper's "false alarms" when measured by truth).

    With fork_N (errors that are their response's first unrecoverable token): auc_forks = AUC of D
    for forks against benign candidates (the errors after a fork left out), after_error_frac = the
    share of candidates that sit after their response's fork."""
    error = _as_array(error_N) != 0
    divergent = _as_array(divergent_N) != 0
    n = error.size
    tp = int((error & divergent).sum())
    tn = int((~error & ~divergent).sum())
    nan = float("nan")
    extra = {}
    if fork_N is not None:
        fork = (_as_array(fork_N) != 0) & error
        keep = ~error | fork
        extra = {"gt/auc_forks": roc_auc(_as_array(D_N)[keep], fork[keep]), "gt/forks": float(fork.sum()),
                 "gt/after_error_frac": float((error & ~fork).mean()) if n else nan}
    return {**extra,
        "gt/num_candidates": float(n),
        "gt/benign_frac": float((~error).mean()) if n else nan,
        "gt/auc": roc_auc(D_N, error),
        "gt/precision": tp / int(divergent.sum()) if divergent.any() else nan,
        "gt/recall": tp / int(error.sum()) if error.any() else nan,
        "gt/fa_precision": tn / int((~divergent).sum()) if (~divergent).any() else nan,
        "gt/fa_recall": tn / int((~error).sum()) if (~error).any() else nan,
        "gt/tp": float(tp), "gt/errors": float(error.sum()), "gt/divergent": float(divergent.sum()),
    }


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

