"""The trainer's Prometheus series: what the Grafana dashboard (deploy/monitoring) shows of a run.

Each step's metrics dict (the keys the step writes to metrics.jsonl) becomes gauges of the last step
and counters of what the run consumed; `/metrics` serves them beside `/status`::

    registry = CollectorRegistry()
    series = register_trainer_metrics(registry)
    series.update(step, metrics)        # after each training step
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

# The phases of a step, as the step times them (metrics "time/<phase>").
PHASES = ("sample", "score", "branch", "train", "sync")

# metrics.jsonl key -> (gauge name, help): the last step's value.
GAUGES = {
    "loss": ("topd_trainer_loss", "Loss of the last step"),
    "opd/reverse_kl": ("topd_trainer_reverse_kl", "Mean reverse KL of the last step's samples (nats per token)"),
    "policy_version": ("topd_trainer_policy_version", "Policy version the trainer last pushed to its rollout"),
    "time/step": ("topd_trainer_step_seconds", "Wall time of the last step"),
    "tokens_per_s": ("topd_trainer_tokens_per_second", "Response tokens per second of the last step"),
    "eval/accuracy": ("topd_trainer_eval_accuracy", "Greedy accuracy on held-out prompts at the last evaluation"),
    "topd/false_alarm_frac": ("topd_trainer_false_alarm_frac",
                              "Candidates the near-future test called false alarms, last step"),
    "topd/mean_ot": ("topd_trainer_mean_ot", "Mean near-future OT distance of the last step's candidates"),
    "nonfinite_steps": ("topd_trainer_nonfinite_steps", "Steps skipped for a non-finite loss, so far"),
}
# metrics.jsonl key -> (counter name without _total, help): added up over the run.
COUNTERS = {
    "samples": ("topd_trainer_samples", "Samples trained on (from the rollout, after dropping stale ones)"),
    "response_tokens": ("topd_trainer_response_tokens", "Response tokens trained on"),
    "stale_dropped": ("topd_trainer_stale_dropped", "Samples dropped as older than max_staleness"),
}


@dataclass
class TrainerMetrics:
    """The trainer's series in one registry; `update` after every step."""

    step: Gauge
    phase_seconds: Gauge
    gauges: dict[str, Gauge]
    counters: dict[str, Counter]
    last_step: int = field(default=0)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Gauges take the step's values (keys it lacks keep theirs: accuracy exists only on
        evaluation steps); counters add the step's amounts once, so a repeated step adds nothing."""
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]))
        for phase in PHASES:
            self.phase_seconds.labels(phase).set(float(metrics.get(f"time/{phase}", 0.0)))
        if step > self.last_step:
            for key, counter in self.counters.items():
                amount = float(metrics.get(key, 0.0))
                if math.isfinite(amount) and amount > 0:
                    counter.inc(amount)
            self.last_step = step
        self.step.set(step)


def register_trainer_metrics(registry: CollectorRegistry) -> TrainerMetrics:
    """Create the trainer's series in `registry` (one call per registry)."""
    phase_seconds = Gauge("topd_trainer_phase_seconds", "Wall time of each phase of the last step", ["phase"],
                          registry=registry)
    for phase in PHASES:  # every phase is a series from the start
        phase_seconds.labels(phase)
    return TrainerMetrics(
        step=Gauge("topd_trainer_step", "Completed training steps", registry=registry),
        phase_seconds=phase_seconds,
        gauges={key: Gauge(name, text, registry=registry) for key, (name, text) in GAUGES.items()},
        counters={key: Counter(name, text, registry=registry) for key, (name, text) in COUNTERS.items()},
    )
