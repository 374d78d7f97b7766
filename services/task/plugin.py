"""The built-in arithmetic task as plugins (entry points `topd.tasks`: `arith`, and `arith-mini`, its
miniature): models, data, checker, ground truth. The services and the trainer find them by name;
neither imports this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from services.common.model_files import data_dir
from services.task import arith
from services.task.ground_truth import candidate_error_labels
from services.task.prepare import BuiltinModels
from services.task.tasks import prepare_task

ROLES = ("teacher", "student")


class ArithTask:
    """Column addition with a chain of thought in many surface forms (services/task/arith.py)."""

    name = "arith"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._built: dict[Path, BuiltinModels] = {}

    def built(self) -> BuiltinModels:
        """The prepared cache entry under $TOPD_DATA_DIR (installed or built on first use)."""
        root = data_dir()
        if root not in self._built:
            self._built[root] = prepare_task(self.name, root, seed=self.seed)
        return self._built[root]

    def model_dir(self, role: str) -> Path:
        if role not in ROLES:
            raise ValueError(f"unknown built-in model role {role!r}; valid: {', '.join(ROLES)}")
        return self.built().teacher_dir if role == "teacher" else self.built().student_dir

    def train_file(self) -> Path:
        return self.built().train_jsonl

    def eval_file(self) -> Path:
        return self.built().val_jsonl

    def check(self, record: dict[str, Any], completion: str) -> bool:
        return arith.check(arith.Problem.from_json(record), completion)

    def error_labels(self, records: Sequence[dict[str, Any]], responses: Sequence[Sequence[int]],
                     rows: Sequence[int], cols: Sequence[int], tokenizer: Any) -> np.ndarray | None:
        if not all("operands" in r or arith.is_prompt(r.get("prompt", "")) for r in records):
            return None
        return candidate_error_labels(records, responses, rows, cols, tokenizer)


class ArithMiniTask(ArithTask):
    """A miniature of `arith` that prepares in seconds: a smoke run of the whole pipeline
    (`topd demo --quick --task arith-mini`, `builtin:arith-mini/teacher`) and the test suite's models."""

    name = "arith-mini"
