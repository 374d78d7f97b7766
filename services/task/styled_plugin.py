"""The styled task as a plugin (entry point `topd.tasks: styled`): `builtin:styled/teacher` and
`builtin:styled/student`, `topd prepare --task styled`, `topd demo --task styled`, `task: styled`.

Its problems, checker and ground truth are the arithmetic task's (the grammar is the same; only the
models' mixes of surface forms differ), so it is `ArithTask` with another pair of models."""

from __future__ import annotations

from services.common.model_files import data_dir
from services.task.models import BuiltinModels
from services.task.plugin import ArithTask
from services.task.styled_models import prepare_styled


class StyledTask(ArithTask):
    """Column addition where the teacher writes in one style and the student in another (styled.py)."""

    name = "styled"

    def built(self) -> BuiltinModels:
        """The styled pair under $TOPD_DATA_DIR (fine-tuned from the uniform pair on first use)."""
        if self._built is None:
            self._built = prepare_styled(data_dir(), seed=self.seed)
        return self._built
