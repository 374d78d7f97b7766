"""What the loop does after each step, one hook per job: evaluate, log metrics, checkpoint, show progress.

Hooks run in order after every step with that step's metrics (a hook may add to them: evaluation
adds `eval/accuracy` before the metrics are written).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from services.trainer.evaluate import Checker, greedy_accuracy


class Hook(Protocol):
    def after_step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Evaluation:
    """Greedy accuracy of the serving student on held-out prompts every `every` steps and at the end."""

    def __init__(self, every: int, last_step: int, generate: Callable, prompt_ids: list, records: list[dict],
                 checker: Checker, tokenizer: Any, max_tokens: int, on_phase: Callable[[str], None]) -> None:
        self.every, self.last_step = every, last_step
        self.generate, self.prompt_ids, self.records = generate, prompt_ids, records
        self.checker, self.tokenizer, self.max_tokens = checker, tokenizer, max_tokens
        self.on_phase = on_phase
        self.history: list[tuple[int, float]] = []

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.records or not (step % self.every == 0 or step == self.last_step):
            return
        self.on_phase("eval")
        acc, _ = greedy_accuracy(self.generate, self.prompt_ids, self.records, self.checker, self.tokenizer,
                                 self.max_tokens)
        metrics["eval/accuracy"] = acc
        self.history.append((step, acc))

    def close(self) -> None:
        pass


class MetricsLog:
    """metrics.jsonl: one JSON row per step, written whole, flushed and fsynced.

    A crash loses no completed step; a failed write (a full disk) is undone, so the file never holds
    half a row, and stops the run with one line naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        import time

        from services.trainer.checkpoint import StorageError

        row = (json.dumps({"step": step, "time": time.time(), **metrics}, default=float) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(row)
                while view:  # unbuffered: nothing is left to fail again when the file closes
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)
                raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


class Checkpoints:
    """A checkpoint every `every` steps (0 = only at the end, which the loop writes)."""

    def __init__(self, every: int, save: Callable[[int], Any]) -> None:
        self.every, self.save = every, save

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        if self.every and step % self.every == 0:
            self.save(step)

    def close(self) -> None:
        pass


class Progress:
    """A tqdm bar: step, KL, loss, and accuracy when evaluated."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        post = {"kl": f"{metrics.get('opd/reverse_kl', math.nan):.3f}", "loss": f"{metrics.get('loss', math.nan):.3f}"}
        if "eval/accuracy" in metrics:
            post["acc"] = f"{metrics['eval/accuracy']:.2f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Gauges:
    """The step's metrics as the trainer's Prometheus series (/metrics; deploy/monitoring's dashboard)."""

    def __init__(self, registry: Any) -> None:
        from services.trainer.metrics import register_trainer_metrics

        self.series = register_trainer_metrics(registry)

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.series.update(step, metrics)

    def close(self) -> None:
        pass


class Tracking:
    """The run's settings, every step's metrics and the final numbers to experiment trackers (report_to)."""

    def __init__(self, report_to: list[str], run_dir: Path, run_name: str, settings: dict[str, Any]) -> None:
        from services.trainer.tracking import Tracker

        self.tracker = Tracker(report_to, run_dir, run_name=run_name)
        self.tracker.log_settings(settings)
        self.last: dict[str, Any] = {}

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(step, metrics)
        self.last = metrics

    def close(self) -> None:
        self.tracker.log_final({f"final/{k}": v for k, v in self.last.items() if k.startswith(("eval/", "loss", "opd/"))})
        self.tracker.close()


class Callback:
    """A caller's `on_step(step, metrics)`."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]) -> None:
        self.fn = fn

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.fn(step, metrics)

    def close(self) -> None:
        pass
