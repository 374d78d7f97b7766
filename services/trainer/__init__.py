"""The trainer. Its public surface (what the demo, benchmarks and other packages use) is re-exported
here, imported on first use (so `topd --help` does not load torch)."""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "OBJECTIVES": "services.trainer.settings", "TrainerSettings": "services.trainer.settings",
    "load_settings": "services.trainer.settings", "train": "services.trainer.run",
    "TrainResult": "services.trainer.run", "Task": "services.trainer.task_api",
    "greedy_accuracy": "services.trainer.evaluate", "detector_scores": "services.trainer.diagnostics",
    "choose_threshold": "services.trainer.diagnostics", "probe_detector": "services.trainer.probe",
    "detector_settings": "services.trainer.probe",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'services.trainer' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
