"""A run's directory: which run it holds, whether this start continues it, and its metrics file.

`run.json` names the run (a random run id) and the settings that define it; every checkpoint's
manifest carries the run id, so a resume never loads a checkpoint another run wrote. A fresh start
refuses a directory that holds another run unless `overwrite` is set:

    resume=false  start fresh; the directory must be empty of runs (or overwrite=true)
    resume=true   continue this directory's run from its latest checkpoint; it must exist
    resume=auto   continue when the run has a checkpoint, start fresh when the directory is empty
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.trainer import checkpoint
from services.trainer.checkpoint import StorageError
from services.trainer.settings import TrainerSettings
from topd_client.errors import ConfigurationError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# The settings that make a run what it is: resuming with other values would be another run.
IDENTITY = ("student_model", "objective", "task", "seed", "data.train_file", "data.dataset",
            "sampling.prompts_per_step", "sampling.samples_per_prompt", "opd.opd_estimator")


@dataclass(frozen=True)
class RunDir:
    """The decision for this start: the run id and the checkpoint to resume from (None = fresh)."""

    path: Path
    run_id: str
    resume_from: Path | None


def identity(s: TrainerSettings) -> dict[str, Any]:
    dumped = s.model_dump(mode="json")
    out = {}
    for key in IDENTITY:
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def check_writable(path: Path) -> None:
    """Create `path` and write a probe file in it; one-line StorageError if that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def open_run_dir(s: TrainerSettings) -> RunDir:
    """Decide fresh or resume for `s.output_dir` (module docstring); writes run.json for a fresh run."""
    path = Path(s.output_dir)
    check_writable(path)
    mode, overwrite = s.checkpoint.resume, s.checkpoint.overwrite
    run_file = path / RUN_FILE
    held = json.loads(run_file.read_text()) if run_file.exists() else None
    foreign = held is None and (any((path / "checkpoints").glob("step-*")) or (path / METRICS_FILE).exists())
    if overwrite and (held is not None or foreign):
        log.warning("overwrite=true: deleting the run in %s", path)
        clear(path)
        held, foreign = None, False
    if foreign:
        raise ConfigurationError(f"output_dir {path} holds checkpoints or metrics of a run without a {RUN_FILE} "
                                 "(another run, or one from an older topd): use another output_dir, or overwrite=true "
                                 "to delete them")
    if held is None:
        if mode is True:
            raise ConfigurationError(f"resume=true but {path} holds no run to resume (resume=auto starts fresh then)")
        return _fresh(path, s)
    run_id = held["run_id"]
    if mode is False:
        raise ConfigurationError(f"output_dir {path} holds run {run_id}: resume=true (or auto) to continue it, "
                                 "overwrite=true to start over (deletes it), or another output_dir")
    differ = {k: (held["identity"].get(k), v) for k, v in identity(s).items() if held["identity"].get(k) != v}
    if differ:
        said = ", ".join(f"{k}: {was!r} there, {now!r} here" for k, (was, now) in differ.items())
        raise ConfigurationError(f"output_dir {path} holds run {run_id} with other settings ({said}): "
                                 "use another output_dir, or overwrite=true to start over")
    latest = checkpoint.latest(path, run_id)
    if latest is None:
        if mode is True:
            raise ConfigurationError(f"run {run_id} in {path} has no checkpoint yet (resume=auto starts it over)")
        log.info("run %s in %s has no checkpoint yet: starting it over", run_id, path)
        clear(path)
        return _fresh(path, s, run_id)
    return RunDir(path, run_id, latest)


def _fresh(path: Path, s: TrainerSettings, run_id: str | None = None) -> RunDir:
    run_id = run_id or uuid.uuid4().hex[:12]
    write_atomic(path / RUN_FILE, json.dumps({"run_id": run_id, "created": time.time(), "identity": identity(s)},
                                             indent=2))
    (path / METRICS_FILE).unlink(missing_ok=True)
    return RunDir(path, run_id, None)


def clear(path: Path) -> None:
    """Delete a run's files (checkpoints, metrics, run.json, final model); other files stay."""
    for name in ("checkpoints", "final"):
        shutil.rmtree(path / name, ignore_errors=True)
    for name in (RUN_FILE, METRICS_FILE):
        (path / name).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def trim_metrics(path: Path, last_step: int) -> None:
    """metrics.jsonl after a resume from `last_step`: keep the complete rows up to it, drop the rest
    (rows of steps redone after the checkpoint, and a partial last line left by a crash)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a row cut short by a crash or a full disk
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("step", 0) <= last_step:
            keep.append(line)
    write_atomic(path, "".join(keep))
