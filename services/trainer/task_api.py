"""What the trainer asks of a task, and how it finds one (the task plugs in; the trainer never imports it).

A task is found by name through `services.common.plugins` (entry point group `topd.tasks`). The
trainer uses it for default data, the answer checker of evaluations, and, when the task can label
its own responses, the ground truth that scores the near-future detector.
"""

from __future__ import annotations

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
