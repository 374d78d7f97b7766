"""One training step, top-down: score -> near-future test -> loss -> update -> push.

    samples (rollout, policy v)  ->  teacher logprobs  ->  candidates, windows, D, divergent set
      -> L_OPD(w_t) [+ lambda L_traj]  ->  AdamW  ->  rollout serves v + 1

The loop (`run.py`) fetches the samples and runs the hooks; the math is `objective`, `ot` and
`losses`; the network is `ServiceClients`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from services.trainer import objective as obj
from services.trainer.batch import Samples, ScoredBatch, drop_stale
from services.trainer.clients import RolloutOutOfSync, ServiceClients
from services.trainer.detect import DetectionConfig, DetectionResult, detect
from services.trainer.diagnostics import batch_diagnostics
from services.trainer.losses import LossConfig, backward_opd, backward_traj
from services.trainer.settings import TrainerSettings
from services.trainer.state import TrainState
from topd_client.errors import UnavailableError

log = logging.getLogger(__name__)

# Seeds of a step's random streams: seed * STRIDE + step, distinct per (seed, step) for runs
# shorter than the stride (primes, so two streams of one run never coincide).
SAMPLE_SEED_STRIDE = 100_003
BRANCH_SEED_STRIDE = 7919

# (batch, detection) -> ground-truth metrics of the detector (empty when the task cannot label).
Probe = Callable[[ScoredBatch, obj.Detection], dict[str, float]]


def sample_seed(seed: int, step: int) -> int:
    return seed * SAMPLE_SEED_STRIDE + step


@dataclass(frozen=True)
class StepConfig:
    """Everything a step needs from the settings, built once."""

    variant: obj.Variant
    estimator: str
    estimator_top_k: int
    vocab_size: int  # the student's: the `full` estimator scores every id
    alpha: float
    max_staleness: int
    teacher_temperature: float
    detection: DetectionConfig
    loss: LossConfig
    grad_clip: float
    seed: int
    async_push: bool = False

    @classmethod
    def from_settings(cls, s: TrainerSettings, vocab_size: int) -> "StepConfig":
        t = s.traj
        loss = LossConfig(
            estimator=s.opd.opd_estimator,
            opd=obj.OPDConfig(adv_clip=s.opd.adv_clip, kl_discount=s.opd.kl_discount,
                              advantage_from=s.opd.advantage_from),
            traj=obj.TrajConfig(lam=t.traj_lambda,
                                offset_weights=obj.discounted_offset_weights(s.detection.window, t.traj_offset_discount)),
            traj_normalisation=t.traj_normalisation, traj_top_k=t.traj_top_k, window=s.detection.window,
            micro_batch=s.optim.micro_batch)
        return cls(obj.get_variant(s.objective), s.opd.opd_estimator, s.opd.estimator_top_k, vocab_size,
                   s.detection.alpha, s.sampling.max_staleness, s.opd.teacher_temperature,
                   DetectionConfig.from_settings(s.detection), loss, s.optim.grad_clip, s.seed,
                   s.sampling.async_push)

    @property
    def sample_top_k(self) -> int:
        """The sampler's top-k ids per token: what `student_topk` asks the teacher to score."""
        return self.estimator_top_k if self.estimator == "student_topk" else 0


class PhaseTimer:
    """Wall time per phase of a step; `current` is what /status shows."""

    def __init__(self) -> None:
        self.phase_s: dict[str, float] = {}
        self.current = "starting"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[name] = self.phase_s.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.phase_s = {}


def compute_loss(model: torch.nn.Module, batch: ScoredBatch, found: DetectionResult | None, cfg: StepConfig,
                 device: str) -> tuple[Tensor, dict[str, float]]:
    """L = L_OPD(w_t) [+ lambda L_traj]: gradients accumulated into `model`, loss and metrics once."""
    detection = found.detection if found is not None else None
    weights_BT = (obj.variant_weights(cfg.variant.name, batch.mask_BT, detection, cfg.alpha)
                  if detection is not None else torch.ones_like(batch.sampler_BT))
    opd_total, metrics = backward_opd(model, batch, weights_BT, cfg.loss, device)
    traj_total = torch.zeros(())
    if cfg.variant.uses_traj and found is not None:
        traj_total, traj_metrics = backward_traj(model, found.branches, found.detection.divergent_N,
                                                 float(batch.num_tokens), cfg.loss, device)
        metrics.update(traj_metrics)
    total = opd_total + traj_total
    metrics.update({"loss": float(total), "loss/opd": float(opd_total), "loss/traj": float(traj_total)})
    return total, metrics


def fresh_samples(samples: Samples, clients: ServiceClients, max_staleness: int) -> tuple[Samples, int]:
    """Samples drawn by the trainer's recent weights, and how many were dropped as stale.

    A sample from a version the trainer never pushed, or no fresh sample at all, means the rollout
    lost the trainer's weights (it restarted): RolloutOutOfSync, and the loop redoes the step."""
    pushed = clients.newest_version
    if any(v > pushed for v in samples.versions):
        raise RolloutOutOfSync(f"samples of policy version {max(samples.versions)}, above the trainer's {pushed}: "
                               "another writer pushed weights to this rollout")
    kept, stale = drop_stale(samples, pushed, max_staleness)
    if len(kept) == 0:
        raise RolloutOutOfSync(f"no sample within max_staleness={max_staleness} of the trainer's version {pushed} "
                               f"(sample versions {sorted(set(samples.versions))})")
    return kept, stale


def score(clients: ServiceClients, samples: Samples, cfg: StepConfig) -> ScoredBatch:
    """The teacher's scores that the OPD estimator needs, padded (docs: estimators.ESTIMATORS)."""
    k = cfg.estimator_top_k
    if cfg.estimator == "teacher_topk":
        scores = clients.score(samples, cfg.teacher_temperature, top_k=k)
    elif cfg.estimator == "student_topk":
        scores = clients.score(samples, cfg.teacher_temperature, candidate_ids=samples.topk_ids)
    elif cfg.estimator == "full":
        every_id = np.arange(cfg.vocab_size, dtype=np.int32)
        scores = clients.score(samples, cfg.teacher_temperature, candidate_ids=[
            np.broadcast_to(every_id, (len(y), cfg.vocab_size)) for y in samples.response_ids])
    else:
        scores = clients.score(samples, cfg.teacher_temperature)
    return ScoredBatch.pad(samples, scores)


def train_step(step: int, samples: Samples, state: TrainState, clients: ServiceClients, cfg: StepConfig, *,
               timer: PhaseTimer, table: Callable[[], Tensor | None], probe: Probe | None = None,
               world: int = 1) -> dict[str, float]:
    """One step on `samples` (drawn by the rollout): its metrics; the rollout then serves the result as
    a new policy version. A non-finite loss skips the update (counted in `nonfinite_steps`).

    Until the update, nothing has changed: RolloutOutOfSync (the rollout restarted) and
    TeacherChangedError leave the trainer as it was, so the loop can redo the step or stop cleanly.
    A push that cannot reach the rollout (down past service_timeout, or a stop request) leaves the
    step done and the push pending: the loop pushes again before the next step."""
    samples, stale = fresh_samples(samples, clients, cfg.max_staleness)
    with timer("score"):
        batch = score(clients, samples, cfg)
    found: DetectionResult | None = None
    extra: dict[str, float] = {}
    if cfg.variant.needs_detection:
        with timer("branch"):
            found = detect(batch, clients, table(), cfg.detection, cfg.loss.traj_top_k if cfg.variant.uses_traj else 0,
                           seed=cfg.seed * BRANCH_SEED_STRIDE + step)
        if found is not None and probe is not None:
            extra = probe(batch, found.detection)
    clients.verify()  # the scores and windows came from the services the step started with
    with timer("train"):
        state.optimizer.zero_grad(set_to_none=True)
        total, metrics = compute_loss(state.model, batch, found, cfg, state.device)
        _, grad_norm = state.update(total, cfg.grad_clip, world)
    with timer("sync"):
        version = clients.newest_version + 1
        try:
            clients.push(state.model, version, wait=not cfg.async_push)
        except UnavailableError as exc:
            log.warning("step %d: weights not pushed (%s); pushing again before the next step", step, exc)
            clients.push_pending = True
    metrics.update(batch_diagnostics(obj.token_loss(batch.sampler_BT, batch.teacher_BT), batch.mask_BT,
                                     found.detection if found is not None else None))
    metrics.update(extra)
    metrics.update(_bookkeeping(batch, stale, grad_norm, state, version, timer))
    metrics.update(clients.last_push)
    return metrics


def _bookkeeping(batch: ScoredBatch, stale: int, grad_norm: float, state: TrainState, version: int,
                 timer: PhaseTimer) -> dict[str, Any]:
    samples = batch.samples
    n_tokens = batch.num_tokens
    step_s = sum(timer.phase_s.values())
    return {
        "grad_norm": grad_norm, "lr": state.lr, "samples": float(len(samples)), "response_tokens": float(n_tokens),
        "stale_dropped": float(stale), "finish_stop_frac": sum(f == "stop" for f in samples.finish) / len(samples),
        "response_len_mean": n_tokens / len(samples),
        "nonfinite_steps": float(state.nonfinite_steps), "policy_version": float(version),
        "sample_version_min": float(min(samples.versions)), "sample_version_max": float(max(samples.versions)),
        "tokens_per_s": n_tokens / step_s if step_s > 0 else 0.0,
        **{f"time/{k}": v for k, v in timer.phase_s.items()},
    }
