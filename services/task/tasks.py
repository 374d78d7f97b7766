"""The built-in tasks by name, for `topd prepare`, `topd demo`, the plugins and the benchmarks."""

from __future__ import annotations

from pathlib import Path

from services.task.arith import TaskConfig
from services.task.models import PRESETS, preset
from services.task.prepare import BuiltinModels, prepare_builtin

# the arith presets (uniform surface forms) and styled (the full preset's pair, each given a style of its own)
BUILTIN_TASKS = (*PRESETS, "styled")


def prepare_task(task: str, data_dir: Path | None = None, seed: int = 0, progress: bool = True,
                 rebuild: bool = False) -> BuiltinModels:
    """The built-in `task`'s teacher, student and splits (installed or built on first use, then cached)."""
    if task == "styled":
        from services.task.styled_models import prepare_styled

        return prepare_styled(data_dir, seed=seed, progress=progress, rebuild=rebuild)
    return prepare_builtin(data_dir, seed=seed, progress=progress, task=task, rebuild=rebuild)


def task_config(task: str) -> TaskConfig:
    """The problems of a built-in task (styled poses the full arith preset's)."""
    return preset("arith" if task == "styled" else task).task
