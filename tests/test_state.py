"""The learning-rate schedule (services/trainer/state.py), by hand and through the optimizer it drives."""

from __future__ import annotations

import math

import pytest

from services.trainer.settings import OptimSettings
from services.trainer.state import TrainState, lr_factor

# warmup 2, 7 updates, r = 0.1: warm-up 1/3, 2/3, then p = 0, 1/4, 1/2, 3/4, 1 over updates 2..6.
LINEAR = [1 / 3, 2 / 3, 1.0, 1 - 0.9 / 4, 1 - 0.9 / 2, 1 - 0.9 * 3 / 4, 0.1]
COSINE = [1 / 3, 2 / 3, 1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55,
          0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1]


@pytest.mark.parametrize("schedule, want", [("constant", [1 / 3, 2 / 3, 1, 1, 1, 1, 1]), ("linear", LINEAR),
                                            ("cosine", COSINE)])
def test_lr_factor_by_hand(schedule: str, want: list[float]) -> None:
    got = [lr_factor(i, 2, 7, schedule, 0.1) for i in range(7)]
    assert got == pytest.approx(want, abs=1e-12)
    assert lr_factor(50, 2, 7, schedule, 0.1) == pytest.approx(want[-1])  # resumed past max_steps: stays at the end


def test_lr_factor_edges() -> None:
    assert lr_factor(0, 0, 1, "cosine", 0.0) == 1.0  # one update, no warm-up: full lr
    assert lr_factor(0, 5, 3, "linear", 0.0) == pytest.approx(1 / 6)  # warm-up longer than the run
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; valid: constant, linear, cosine"):
        lr_factor(0, 0, 1, "step", 0.0)


def test_the_optimizer_follows_the_schedule(tiny_model) -> None:
    cfg = OptimSettings(lr=1e-3, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1)
    state = TrainState.create(str(tiny_model), "cpu", cfg, total_steps=7)
    seen = []
    for _ in range(7):
        seen.append(state.lr)
        loss = sum((p ** 2).sum() for p in state.model.parameters())
        state.update(loss, grad_clip=1.0)
        state.optimizer.zero_grad()
    assert seen == pytest.approx([1e-3 * f for f in LINEAR], rel=1e-9)
