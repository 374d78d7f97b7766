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
    """metrics.jsonl: one JSON row per step, flushed and fsynced (a crash loses no completed step)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        import time

        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
    """The step's headline numbers as Prometheus gauges on the trainer's /metrics."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Gauge

        self.step = Gauge("topd_trainer_step", "Completed training steps", registry=registry)
        self.loss = Gauge("topd_trainer_loss", "Loss of the last step", registry=registry)
        self.kl = Gauge("topd_trainer_reverse_kl", "Mean reverse KL of the last step", registry=registry)

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.step.set(step)
        self.loss.set(metrics.get("loss", math.nan))
        self.kl.set(metrics.get("opd/reverse_kl", math.nan))

    def close(self) -> None:
        pass


class Callback:
    """A caller's `on_step(step, metrics)`."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]) -> None:
        self.fn = fn

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.fn(step, metrics)

    def close(self) -> None:
        pass
