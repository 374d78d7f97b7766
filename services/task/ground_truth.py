"""Ground truth for the near-future detector on the built-in task.

The checker knows the answer, so every high-loss token can be labelled: *benign* (the response up
to and including it can still be completed into a correct solution in some surface form) or
*error* (it cannot). The detector is then scored as a classifier of errors: AUC of D, and the
precision and recall of "divergent". The paper cannot make this measurement on real math.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from services.task.arith import Problem, label_tokens
from services.trainer.diagnostics import roc_auc


def candidate_error_labels(records: Sequence[dict[str, Any]], responses: Sequence[Sequence[int]], rows: Sequence[int],
                           cols: Sequence[int], tokenizer) -> np.ndarray:
    """bool [N]: True where candidate (row, col)'s prefix through that token is unrecoverable."""
    cache: dict[int, list[bool]] = {}
    out = np.zeros(len(rows), dtype=bool)
    for n, (b, t) in enumerate(zip(rows, cols)):
        if b not in cache:
            pieces = [tokenizer.decode([int(tok)]) for tok in responses[b]]
            cache[b] = label_tokens(Problem.from_json(records[b]), pieces)
        out[n] = not cache[b][t]
    return out


def detector_scores(error_N: np.ndarray, D_N: np.ndarray, divergent_N: np.ndarray) -> dict[str, float]:
    """AUC of D against error labels; precision/recall of the divergent set; base rates."""
    error_N, divergent_N = np.asarray(error_N, bool), np.asarray(divergent_N, bool)
    n = error_N.size
    tp = int((error_N & divergent_N).sum())
    return {
        "gt/num_candidates": float(n),
        "gt/benign_frac": float((~error_N).mean()) if n else float("nan"),
        "gt/auc": roc_auc(np.asarray(D_N, float), error_N),
        "gt/precision": tp / int(divergent_N.sum()) if divergent_N.any() else float("nan"),
        "gt/recall": tp / int(error_N.sum()) if error_N.any() else float("nan"),
        "gt/tp": float(tp), "gt/errors": float(error_N.sum()), "gt/divergent": float(divergent_N.sum()),
    }


def make_probe(tokenizer):
    """A trainer hook: (rollouts, rows, cols, D_N, divergent_N) -> ground-truth metrics."""

    def probe(rollouts, rows, cols, D_N, divergent_N) -> dict[str, float]:
        if not all("operands" in r for r in rollouts.records):
            return {}
        labels = candidate_error_labels(rollouts.records, [r.tolist() for r in rollouts.response_ids],
                                        list(rows.tolist()), list(cols.tolist()), tokenizer)
        return detector_scores(labels, np.asarray(D_N), np.asarray(divergent_N))

    return probe
