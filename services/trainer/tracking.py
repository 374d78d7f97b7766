"""Experiment tracking: the trainer's settings, every step's metrics and the final numbers, sent to
TensorBoard, Weights & Biases and/or MLflow (`report_to`), as TRL and verl users expect.

metrics.jsonl is written by the trainer whatever `report_to` says; these are extra copies in each
tool's own format, all under the run directory unless the user points the tool elsewhere:

- tensorboard: event files in ``run_dir/tb`` (``tensorboard --logdir run_dir/tb``).
- wandb: offline mode under ``run_dir/wandb`` (``wandb sync run_dir/wandb/offline-run-*`` uploads
  it later); ``WANDB_MODE=online`` logs live instead, ``WANDB_PROJECT`` names the project.
- mlflow: ``MLFLOW_TRACKING_URI`` when set, else a local SQLite store ``run_dir/mlflow.db``
  (``mlflow ui --backend-store-uri sqlite:///run_dir/mlflow.db``): MLflow 3 refuses its old file
  store unless MLFLOW_ALLOW_FILE_STORE is set, and recommends SQLite. ``MLFLOW_EXPERIMENT_NAME``
  names the experiment.

Each library is an optional import (pip extras ``tensorboard``, ``wandb``, ``mlflow``, or all three as
``tracking``); asking for one that is not installed fails at once, naming the extra::

    with Tracker(["tensorboard", "mlflow"], run_dir, run_name="topd-seed0") as tracker:
        tracker.log_settings(settings.model_dump(mode="json"))
        for step in ...:
            tracker.log_metrics(step, metrics)
        tracker.log_final({"final/accuracy": 0.81})
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from topd_client.errors import ConfigurationError

REPORT_TO = ("tensorboard", "wandb", "mlflow")
# MLflow's limits per log_batch call, and on a parameter's value.
_MLFLOW_MAX_PARAMS, _MLFLOW_MAX_METRICS, _MLFLOW_MAX_PARAM_CHARS = 100, 1000, 6000


class Backend(Protocol):
    """One tracking tool. Values are already plain floats (metrics) or JSON-able (settings)."""

    def log_settings(self, settings: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _require(module: str, extra: str) -> Any:
    """Import an optional tracking library, or say which pip extra installs it."""
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"report_to: {extra} needs the {extra} package, which is not installed: "
                                 f"pip install 'topd[{extra}]' (or 'topd[tracking]' for all three)") from exc


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level, keys joined by '.': {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (bools count as 0/1), as floats; strings and None are left out."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, complex)}


class TensorBoardBackend:
    """Event files under run_dir/tb; settings as a text summary (a JSON block)."""

    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), flush_secs=10)

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        text = json.dumps(settings, indent=2, sort_keys=True, default=str)
        self.writer.add_text("settings", "    " + text.replace("\n", "\n    "), global_step=0)  # a code block
        self.writer.flush()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A W&B run, offline under run_dir/wandb unless WANDB_MODE says otherwise."""

    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        self.run.config.update(dict(settings), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before wandb-core has written the run file; teardown waits for it
        # (a trainer process exits right after closing its tracker).
        wandb.teardown()


class MlflowBackend:
    """An MLflow run through MlflowClient (no global active run): MLFLOW_TRACKING_URI, else SQLite
    in run_dir."""

    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, (value if isinstance(value, str) else json.dumps(value, default=str))
                        [:_MLFLOW_MAX_PARAM_CHARS]) for key, value in flatten(settings).items()]
        for lo in range(0, len(params), _MLFLOW_MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[lo:lo + _MLFLOW_MAX_PARAMS])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow stores NaN but not +-inf
        rows = [Metric(key, value, now, step) for key, value in metrics.items() if not math.isinf(value)]
        for lo in range(0, len(rows), _MLFLOW_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=rows[lo:lo + _MLFLOW_MAX_METRICS])

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS: dict[str, Callable[[Path, str, str], Backend]] = {
    "tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend,
}


class Tracker:
    """Sends settings, metrics and final numbers to every tool in `report_to` (possibly none)."""

    def __init__(self, report_to: Sequence[str], run_dir: str | Path, *, run_name: str | None = None,
                 project: str = "topd") -> None:
        unknown = [name for name in report_to if name not in BACKENDS]
        if unknown:
            raise ConfigurationError(f"unknown report_to {unknown}; valid: {', '.join(REPORT_TO)}")
        for name in report_to:  # every library present before any run is created
            _require(name, name)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or self.run_dir.name
        self.last_step = 0
        self.backends: dict[str, Backend] = {}
        try:
            for name in dict.fromkeys(report_to):
                self.backends[name] = BACKENDS[name](self.run_dir, self.run_name, project)
        except BaseException:
            self.close()
            raise

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        """The run's settings (JSON-able, nested allowed), once at the start."""
        for backend in self.backends.values():
            backend.log_settings(settings)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One step's metrics (the numeric entries)."""
        values = numeric(metrics)
        self.last_step = max(self.last_step, step)
        for backend in self.backends.values():
            backend.log_metrics(step, values)

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """The run's final numbers (e.g. {"final/accuracy": 0.81}), at the last logged step."""
        values = numeric(metrics)
        for backend in self.backends.values():
            backend.log_final(self.last_step, values)

    def close(self) -> None:
        """Flush and finish every tool's run (safe to call twice)."""
        backends, self.backends = self.backends, {}
        errors = []
        for backend in backends.values():
            try:
                backend.close()
            except Exception as exc:  # noqa: BLE001 - close the others, then raise the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
