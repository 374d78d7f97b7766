"""`topd train`: set up a run, connect, resume or start, loop over steps with hooks, finish.

    for step: samples = source.take(step)  ->  train_step(...)  ->  hooks (eval, metrics, checkpoint, progress)
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from services.common.model_files import resolve_device, resolve_model
from services.common.runner import start_service
from services.common.status_app import ServiceState
from services.trainer import checkpoint, distributed, hooks
from services.trainer.clients import ServiceClients
from services.trainer.data import PromptStream, encode_prompts, eval_records, generic_check, train_records
from services.trainer.diagnostics import detector_scores
from services.trainer.embeddings import student_table, teacher_table
from services.trainer.objective import Detection, candidate_positions
from services.trainer.sampling import SampleSource
from services.trainer.settings import TrainerSettings
from services.trainer.state import TrainState
from services.trainer.step import PhaseTimer, Probe, StepConfig, train_step
from services.trainer.student import unwrap
from services.trainer.task_api import Task, resolve_task
from topd_client.errors import TokenizerMismatchError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    metrics_file: Path
    final_model: Path | None
    last_metrics: dict[str, Any]
    eval_accuracy: list[tuple[int, float]]


def train(settings: TrainerSettings, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training to max_steps (or resume to it). Rank 0 writes metrics and checkpoints."""
    rank, world = distributed.init()
    try:
        return _train(settings, rank, world, on_step)
    finally:
        distributed.shutdown(world)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(s: TrainerSettings, rank: int, world: int, on_step: Callable | None) -> TrainResult:
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = resolve_task(s.task, s.student_model)
    _seed_everything(s.seed + rank)
    state = TrainState.create(resolve_model(s.student_model), distributed.rank_device(resolve_device(s.device), rank,
                                                                                       world), s.optim)
    clients = ServiceClients(s.services, rank, s.auth_token)
    source = SampleSource(PromptStream(train_records(s.data, task), s.seed, rank, world), clients, state.tokenizer,
                          s.data, s.sampling, s.seed)
    timer = PhaseTimer()
    board = StatusBoard(s, rank, world, state, clients, timer)
    registry = CollectorRegistry()
    service_state = ServiceState("trainer", registry, board.status)
    service = start_service(service_state, host=s.host, grpc_port=None, http_port=s.http_port if rank == 0 else 0)
    service_state.set_ready(False, "connecting to teacher and rollout")
    metrics_file = out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
    with ExitStack() as stack:
        stack.callback(service.stop)
        stack.callback(clients.close)
        stack.callback(source.close)
        clients.connect(state.tokenizer, state.student_path)
        manifest = _manifest(s, clients, state)
        save = (lambda step: checkpoint.save(out, step, unwrap(state.model), state.tokenizer, state.optimizer,
                                             state.scheduler, {"data": source.position(),
                                                               "pushed_version": clients.pushed_version,
                                                               "nonfinite_steps": state.nonfinite_steps},
                                             manifest, s.checkpoint.keep_checkpoints)) if rank == 0 else (lambda step: None)
        start = _resume(out, state, source, clients) if s.checkpoint.resume else 0
        if start == 0 and rank == 0 and metrics_file.exists():
            metrics_file.unlink()
        clients.push(state.model, clients.pushed_version + 1)  # the rollout may hold another run's weights
        state.step = start
        service_state.set_ready(True)
        evaluation = _evaluation(s, task, state, clients, timer)
        run_hooks: list[hooks.Hook] = [evaluation, hooks.Gauges(registry)]
        if rank == 0:
            run_hooks += [hooks.MetricsLog(metrics_file), hooks.Checkpoints(s.checkpoint.checkpoint_every, save)]
            if s.progress:
                run_hooks.append(hooks.Progress(s.max_steps, start, f"topd {s.objective}"))
        if on_step is not None:
            run_hooks.append(hooks.Callback(on_step))
        for h in run_hooks:
            stack.callback(h.close)
        cfg = StepConfig.from_settings(s)
        table = _embedding_table(s, state)
        probe = _ground_truth_probe(task, state.tokenizer) if task is not None and s.detection.ground_truth else None
        for step in range(start + 1, s.max_steps + 1):
            t0 = time.perf_counter()
            timer.reset()
            with timer("sample"):
                samples, _ = source.take(step, s.max_steps)
            metrics = train_step(step, samples, state, clients, cfg, timer=timer, table=table, probe=probe,
                                 world=world)
            state.step = step
            board.step_times.append(time.perf_counter() - t0)
            metrics["time/step"] = board.step_times[-1]
            for h in run_hooks:
                h.after_step(step, metrics)
            board.last_metrics = metrics
        timer.current = "done"
        final = None
        if rank == 0:
            every = s.checkpoint.checkpoint_every
            if every == 0 or state.step % every:
                save(state.step)
            final = out / "final"
            unwrap(state.model).save_pretrained(final, safe_serialization=True)
            state.tokenizer.save_pretrained(final)
        return TrainResult(state.step, metrics_file, final, board.last_metrics, evaluation.history)


def _manifest(s: TrainerSettings, clients: ServiceClients, state: TrainState) -> dict[str, Any]:
    t = clients.teacher_info
    return {"settings": s.model_dump(mode="json", exclude={"auth_token"}),
            "teacher": None if t is None else {"model": t.model, "revision": t.revision,
                                               "tokenizer_fingerprint": t.tokenizer_fingerprint},
            "student_model": state.student_path}


def _resume(out: Path, state: TrainState, source: SampleSource, clients: ServiceClients) -> int:
    """Load the latest checkpoint of `out` into the run; 0 when there is none."""
    path = checkpoint.latest(out)
    if path is None:
        log.info("resume: no checkpoint in %s, starting fresh", out)
        return 0
    saved = checkpoint.load_into(path, state.model, state.optimizer, state.scheduler)
    pinned = checkpoint.read_manifest(path).get("teacher") or {}
    now = clients.teacher_info.tokenizer_fingerprint if clients.teacher_info else None
    if pinned.get("tokenizer_fingerprint") not in (None, now):
        raise TokenizerMismatchError(f"checkpoint {path} was trained against a teacher with tokenizer "
                                     f"{pinned['tokenizer_fingerprint'][:16]}..., this teacher has {now[:16]}...")
    source.data.restore(saved["data"])
    state.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
    log.info("resumed from %s (step %d)", path, saved["step"])
    return int(saved["step"])


def _evaluation(s: TrainerSettings, task: Task | None, state: TrainState, clients: ServiceClients,
                timer: PhaseTimer) -> hooks.Evaluation:
    records = eval_records(s.data, task)
    ids = [p.numpy() for p in encode_prompts(state.tokenizer, records, s.data.prompt_field, s.data.chat_template)]

    def on_phase(name: str) -> None:
        timer.current = name

    return hooks.Evaluation(s.data.eval_every, s.max_steps, clients.rollout.continue_from, ids, records,
                            task.check if task is not None else generic_check, state.tokenizer,
                            s.sampling.max_new_tokens, on_phase)


def _embedding_table(s: TrainerSettings, state: TrainState) -> Callable[[], torch.Tensor | None]:
    """The OT embedding table each step uses (the student's changes every step, so it is read each time)."""
    if s.detection.embedding == "student":
        return lambda: student_table(state.model)
    if s.detection.embedding == "teacher":
        fixed = teacher_table(s.detection.teacher_embedding_model)
        return lambda: fixed
    return lambda: None


def _ground_truth_probe(task: Task, tokenizer: Any) -> Probe:
    """The detector scored against the task's own labels of each candidate (benign or error)."""

    def probe(batch, detection: Detection) -> dict[str, float]:
        rows, cols = candidate_positions(detection.candidates_BT)
        labels = task.error_labels(batch.samples.records, [r.tolist() for r in batch.samples.response_ids],
                                   rows.tolist(), cols.tolist(), tokenizer)
        return {} if labels is None else detector_scores(labels, detection.D_N, detection.divergent_N)

    return probe


class StatusBoard:
    """The trainer's /status: step, phase, ETA, services, last metrics."""

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
        return {"step": self.state.step, "max_steps": self.s.max_steps, "phase": self.timer.current,
                "objective": self.s.objective, "rank": self.rank, "world": self.world, "device": self.state.device,
                **self.clients.status(), "eta_s": self.eta_s(), "nonfinite_steps": self.state.nonfinite_steps,
                "last_metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in self.last_metrics.items()}}
