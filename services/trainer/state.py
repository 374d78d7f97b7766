"""What a training run owns and checkpoints: the student, AdamW, the schedule, the step counters."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from services.trainer import distributed
from services.trainer.settings import OptimSettings
from services.trainer.student import load_student

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The student being trained (float32 master weights), its optimizer and schedule, and counters."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    student_path: str
    device: str
    step: int = 0
    nonfinite_steps: int = 0

    @classmethod
    def create(cls, student_path: str, device: str, cfg: OptimSettings, total_steps: int) -> "TrainState":
        model, tokenizer = load_student(student_path, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
            i, cfg.warmup_steps, total_steps, cfg.lr_schedule, cfg.min_lr_ratio))
        return cls(model, tokenizer, optimizer, scheduler, student_path, device)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def update(self, loss: torch.Tensor, grad_clip: float, world: int = 1) -> tuple[bool, float]:
        """Clip and take the AdamW step; a non-finite loss (on any rank) skips it. (skipped, grad norm)."""
        skipped = not is_finite(loss)
        if world > 1:
            skipped = distributed.average_gradients(self.model, skipped)
        if skipped:
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite loss %s, update skipped (%d so far)", float(loss), self.nonfinite_steps)
            return True, float("nan")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        return False, grad_norm


def lr_factor(i: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The learning rate of update i (0-based; step i + 1) as a fraction of lr:

        min(1, (i + 1) / (warmup + 1)) * d(p),   p = clamp((i - warmup) / (total - 1 - warmup), 0, 1)
        d = 1 (constant),  1 - (1 - r) p (linear),  r + (1 - r) (1 + cos(pi p)) / 2 (cosine)

    so the last of `total` updates runs at lr * r (r = min_ratio), and a run resumed past `total` stays there.
    """
    warm = min(1.0, (i + 1) / (warmup + 1))
    if schedule == "constant":
        return warm
    p = min(max((i - warmup) / max(total - 1 - warmup, 1), 0.0), 1.0)
    if schedule == "linear":
        return warm * (1.0 - (1.0 - min_ratio) * p)
    if schedule == "cosine":
        return warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, linear, cosine")


def is_finite(x: torch.Tensor) -> bool:
    """No NaN and no inf anywhere in x (a loss, a gradient norm)."""
    return bool(torch.isfinite(x.detach()).all())
