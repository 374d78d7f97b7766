"""The trainer's /status: step, phase, ETA, its services (and how long one has been down), last metrics."""

from __future__ import annotations

import math
from typing import Any

from services.trainer.clients import ServiceClients
from services.trainer.settings import TrainerSettings
from services.trainer.state import TrainState
from services.trainer.step import PhaseTimer


class StatusBoard:
    """Reads the run's live objects; the loop appends step times and the last metrics."""

    def __init__(self, s: TrainerSettings, rank: int, world: int, state: TrainState, clients: ServiceClients,
                 timer: PhaseTimer) -> None:
        self.s, self.rank, self.world = s, rank, world
        self.state, self.clients, self.timer = state, clients, timer
        self.step_times: list[float] = []
        self.last_metrics: dict[str, Any] = {}

    def eta_s(self) -> float | None:
        if not self.step_times:
            return None
        recent = self.step_times[-10:]
        return (self.s.max_steps - self.state.step) * sum(recent) / len(recent)

    def status(self) -> dict[str, Any]:
        services = self.clients.status()
        waiting = [f"{name} (down {v['down_s']:.0f} s)" for name, v in services.items() if v.get("down_s") is not None]
        return {"step": self.state.step, "max_steps": self.s.max_steps, "phase": self.timer.current,
                "waiting_for": ", ".join(waiting) or None, "objective": self.s.objective, "rank": self.rank,
                "world": self.world, "device": self.state.device, **services, "eta_s": self.eta_s(),
                "nonfinite_steps": self.state.nonfinite_steps,
                "last_metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in self.last_metrics.items()}}
