"""The styled task as a plugin (entry point `topd.tasks: styled`): `builtin:styled/teacher` and
`builtin:styled/student`, `topd prepare --task styled`, `topd demo --task styled`, `task: styled`.

Its problems, checker and ground truth are the arithmetic task's (the grammar is the same; only the
models' mixes of surface forms differ), so it is `ArithTask` with another pair of models."""

from __future__ import annotations

from services.task.plugin import ArithTask


class StyledTask(ArithTask):
    """Column addition where the teacher writes in one style and the student in another (styled.py); its
    pair is fine-tuned from the uniform pair under $TOPD_DATA_DIR on first use (styled_models.py)."""

    name = "styled"
