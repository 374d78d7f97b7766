"""Ground truth for the near-future detector on the built-in task.

The checker knows the answer, so every high-loss token can be labelled: *benign* (the response up
to and including it can still be completed into a correct solution in some surface form) or
*error* (it cannot). The trainer scores the detector as a classifier of errors against these labels
(AUC of D, precision and recall of "divergent"); the paper cannot make this measurement on real math.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from services.task.arith import Problem, label_tokens


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
