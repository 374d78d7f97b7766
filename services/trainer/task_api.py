"""What the trainer asks of a task, and how it finds one (the task plugs in; the trainer never imports it).

A task is found by name through `services.common.plugins` (entry point group `topd.tasks`). The
trainer uses it for default data, the answer checker of evaluations, and, when the task can label
its own responses, the ground truth that scores the near-future detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from services.common.model_files import parse_builtin
from services.common.plugins import load_task
from topd_client.errors import ConfigurationError


@runtime_checkable
class Task(Protocol):
    """A task the trainer can use. `error_labels` may return None when it cannot label these records."""

    name: str

    def model_dir(self, role: str) -> Path:
        """Directory of the task's `role` model ("teacher", "student")."""

    def train_file(self) -> Path:
        """JSONL of training prompts ({"prompt": ..., ...})."""

    def eval_file(self) -> Path:
        """JSONL of held-out prompts for evaluation during training."""

    def check(self, record: dict[str, Any], completion: str) -> bool:
        """Is `completion` a correct answer to `record`?"""

    def error_labels(self, records: Sequence[dict[str, Any]], responses: Sequence[Sequence[int]],
                     rows: Sequence[int], cols: Sequence[int], tokenizer: Any) -> np.ndarray | None:
        """bool [N]: True where response rows[n] can no longer be completed correctly once it holds its
        token cols[n] (an error), False where it still can (a benign, surface-form choice)."""


def resolve_task(task: str | None, student_model: str) -> Task | None:
    """The task named by the settings, else the task of a `builtin:` student, else None."""
    if task is None:
        parsed = parse_builtin(student_model)
        if parsed is None:
            return None
        task = parsed[0]
    found = load_task(task)
    if not isinstance(found, Task):
        raise ConfigurationError(f"task {task!r} ({type(found).__name__}) lacks what the trainer needs: "
                                 "model_dir, train_file, eval_file, check, error_labels")
    return found


@dataclass(frozen=True)
class CandidateTruth:
    """Ground truth of a batch's candidates, in candidate order."""

    error_N: np.ndarray  # bool: the response cannot be completed correctly once it holds this token
    fork_N: np.ndarray  # bool: the token where its response became unrecoverable (its first error: a real fork)


def candidate_truth(task: Task, records: Sequence[dict[str, Any]], responses: Sequence[Sequence[int]],
                    rows: Sequence[int], cols: Sequence[int], tokenizer: Any) -> CandidateTruth | None:
    """The task's labels of candidates (rows[n], cols[n]), and which of the errors are forks.

    Every token of the candidates' responses is labelled (one `error_labels` call) to find where each
    response first became unrecoverable: the tokens after that point are errors too, but no fork of
    their own (the response was lost before them). None when the task cannot label these records."""
    used = sorted(set(int(b) for b in rows))
    all_rows = [b for b in used for _ in range(len(responses[b]))]
    all_cols = [t for b in used for t in range(len(responses[b]))]
    labels = task.error_labels(records, responses, all_rows, all_cols, tokenizer)
    if labels is None:
        return None
    at = {(b, t): bool(v) for b, t, v in zip(all_rows, all_cols, labels)}
    first = {b: next((t for t in range(len(responses[b])) if at[(b, t)]), -1) for b in used}
    error_N = np.array([at[(int(b), int(t))] for b, t in zip(rows, cols)], dtype=bool)
    fork_N = np.array([first[int(b)] == int(t) for b, t in zip(rows, cols)], dtype=bool)
    return CandidateTruth(error_N, fork_N)
