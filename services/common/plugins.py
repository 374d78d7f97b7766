"""Task plugins: how a built-in task reaches the services without them importing it.

A task (the built-in arithmetic task, or one of a user's) is an object registered under the entry
point group `topd.tasks` (pyproject.toml) or with `register_task`. The services only need it to
turn `builtin:<task>/<role>` into a model directory (`ModelSource`); the trainer asks more of it
(answer checker, default data, ground truth: `services.trainer.task_api.Task`).
"""

from __future__ import annotations

import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from topd_client.errors import ConfigurationError

ENTRY_POINT_GROUP = "topd.tasks"
DEFAULT_TASK = "arith"

_registered: dict[str, Any] = {}
_lock = threading.Lock()


@runtime_checkable
class ModelSource(Protocol):
    """What a model server needs of a task: where its `role` model lives (built on first use)."""

    name: str

    def model_dir(self, role: str) -> Path:
        """Directory of the task's `role` model ("teacher", "student") in Hugging Face format."""


def register_task(task: Any) -> None:
    """Make `task` findable by its `.name` (for tasks that are not installed as an entry point)."""
    with _lock:
        _registered[task.name] = task


def task_names() -> list[str]:
    """Every task findable now: registered ones and installed entry points."""
    names = set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def load_task(name: str) -> Any:
    """The task called `name`; an unknown name lists the known ones."""
    with _lock:
        if name in _registered:
            return _registered[name]
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            known = sorted(set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise ConfigurationError(f"unknown task {name!r}; known tasks: {', '.join(known) or 'none installed'}")
        obj = found[0].load()
        task = obj() if isinstance(obj, type) else obj
        _registered[name] = task
        return task
