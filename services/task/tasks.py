"""The built-in tasks by name, for `topd prepare`, `topd demo` and the benchmarks."""

from __future__ import annotations

from pathlib import Path

from services.task.models import BuiltinModels

BUILTIN_TASKS = ("arith", "styled")


def prepare_task(task: str, data_dir: Path | None = None, seed: int = 0, progress: bool = True) -> BuiltinModels:
    """The built-in `task`'s teacher, student and splits (built on first use, then cached):
    arith (uniform surface forms, `models.prepare_builtin`) or styled (`styled_models.prepare_styled`)."""
    if task == "styled":
        from services.task.styled_models import prepare_styled

        return prepare_styled(data_dir, seed=seed, progress=progress)
    if task != "arith":
        from topd_client.errors import ConfigurationError

        raise ConfigurationError(f"unknown built-in task {task!r}; valid: {', '.join(BUILTIN_TASKS)}")
    from services.task.models import prepare_builtin

    return prepare_builtin(data_dir, seed=seed, progress=progress)
