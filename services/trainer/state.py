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
    def create(cls, student_path: str, device: str, cfg: OptimSettings) -> "TrainState":
        model, tokenizer = load_student(student_path, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warm + 1)))
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


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and not math.isnan(float(x))
