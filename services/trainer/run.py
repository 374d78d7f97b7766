"""`topd train`: set up a run, connect, resume or start, loop over steps with hooks, finish.

    for step: verify services  ->  samples = source.take(step)  ->  train_step(...)  ->  hooks

Faults: a service that is down is waited for (`service_timeout`); a rollout that restarted gets the
weights again and the step is redone; a stop request (SIGTERM) or giving up writes a checkpoint of
the last completed step first. Nothing of a step is kept unless all of it completed.
"""

from __future__ import annotations

import logging
import random
import threading
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
from services.trainer.clients import RolloutOutOfSync, ServiceClients
from services.trainer.data import PromptStream, fit_prompts, train_records
from services.trainer.run_dir import METRICS_FILE, RunDir, open_run_dir, trim_metrics
from services.trainer.sampling import SampleSource
from services.trainer.settings import TrainerSettings
from services.trainer.setup import embedding_table, evaluation, ground_truth_probe, manifest
from services.trainer.state import TrainState
from services.trainer.status import StatusBoard
from services.trainer.step import PhaseTimer, StepConfig, train_step
from services.trainer.student import unwrap
from services.trainer.task_api import resolve_task
from topd_client.auth import resolve_token
from topd_client.errors import (ConfigurationError, InvalidInputError, PreconditionError, TokenizerMismatchError,
                                TopdError, UnavailableError)

log = logging.getLogger(__name__)

# How often one step is redone because the rollout lost the trainer's weights before giving up.
MAX_STEP_REDOS = 5


@dataclass
class TrainResult:
    steps: int
    metrics_file: Path
    final_model: Path | None
    last_metrics: dict[str, Any]
    eval_accuracy: list[tuple[int, float]]
    stopped: bool = False  # a stop request ended the run early (a checkpoint holds its last step)


def train(settings: TrainerSettings, on_step: Callable[[int, dict], None] | None = None,
          stop: threading.Event | None = None) -> TrainResult:
    """Run training to max_steps (or resume to it). Rank 0 writes metrics and checkpoints.

    Setting `stop` (e.g. from a SIGTERM handler) ends the run after the current step, with a checkpoint."""
    rank, world = distributed.init()
    try:
        return _train(settings, rank, world, on_step, stop or threading.Event())
    finally:
        distributed.shutdown(world)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(s: TrainerSettings, rank: int, world: int, on_step: Callable | None, stop: threading.Event) -> TrainResult:
    run = distributed.on_rank0(world, rank, lambda: open_run_dir(s))  # refuses a dir of another run, first
    task = resolve_task(s.task, s.student_model)
    _seed_everything(s.seed + rank)
    device = distributed.rank_device(resolve_device(s.device), rank, world)
    state = TrainState.create(resolve_model(s.student_model), device, s.optim, s.max_steps)
    cfg = StepConfig.from_settings(s, unwrap(state.model).config.vocab_size)
    room = _prompt_room(s, state, None)
    records = fit_prompts(train_records(s.data, task), state.tokenizer, s.data, room)  # before waiting for services
    clients = ServiceClients(s.services, rank, resolve_token(s.auth_token, s.auth_token_file), stop_event=stop,
                             run_id=run.run_id)
    timer = PhaseTimer()
    board = StatusBoard(s, rank, world, state, clients, timer)
    registry = CollectorRegistry()
    service_state = ServiceState("trainer", registry, board.status)
    service = start_service(service_state, host=s.host, grpc_port=None, http_port=s.http_port if rank == 0 else 0,
                            http_token=resolve_token(s.auth_token, s.auth_token_file))
    service_state.set_ready(False, "connecting to teacher and rollout")
    metrics_file = run.path / (METRICS_FILE if rank == 0 else f"metrics.rank{rank}.jsonl")
    with ExitStack() as stack:
        stack.callback(service.stop)
        finished = [False]  # a run that reached max_steps gives its rollout up (another run may use it)
        stack.callback(lambda: clients.close(release=finished[0]))
        clients.connect(state.tokenizer, state.student_path)
        _check_estimator(cfg, clients)
        if _prompt_room(s, state, clients) < room:  # the rollout serves a shorter context than the student's
            records = fit_prompts(records, state.tokenizer, s.data, _prompt_room(s, state, clients))
        source = SampleSource(PromptStream(records, s.seed, rank, world), clients, state.tokenizer, s.data,
                              s.sampling, s.seed, top_k=cfg.sample_top_k)
        stack.callback(source.close)
        info = manifest(s, run.run_id, clients, state)

        def save(step: int) -> Path | None:
            if rank != 0:
                return None
            return checkpoint.save(run.path, step, unwrap(state.model), state.tokenizer, state.optimizer,
                                   state.scheduler, {"data": source.position(), "pushed_version": clients.pushed_version,
                                                     "nonfinite_steps": state.nonfinite_steps},
                                   info, s.checkpoint.keep_checkpoints)

        start = _resume(run, state, source, clients) if run.resume_from is not None else 0
        if rank == 0:
            trim_metrics(metrics_file, start)
        clients.push(state.model, clients.pushed_version + 1)  # the rollout may hold another run's weights
        state.step = start
        service_state.set_ready(True)
        evals = evaluation(s, task, state, clients, timer)
        run_hooks = _hooks(s, rank, start, registry, evals, metrics_file, save, run, on_step)
        for h in run_hooks:
            stack.callback(h.close)
        table = embedding_table(s, state)
        probe = ground_truth_probe(task, state.tokenizer) if task is not None and s.detection.ground_truth else None
        try:
            for step in range(start + 1, s.max_steps + 1):
                if stop.is_set():
                    break
                t0 = time.perf_counter()
                metrics = _one_step(step, s, state, clients, source, cfg, timer, table, probe, world)
                state.step = step
                board.step_times.append(time.perf_counter() - t0)
                metrics["time/step"] = board.step_times[-1]
                for h in run_hooks:
                    h.after_step(step, metrics)
                board.last_metrics = metrics
        except (TopdError, OSError) as exc:
            source.redo()  # the interrupted step's prompts are drawn again after a resume
            stopping = stop.is_set() and isinstance(exc, UnavailableError)
            _save_before_exit(save, state.step, start)  # giving up: the last completed step is kept
            if not stopping:
                raise
        if stop.is_set() and state.step < s.max_steps:
            timer.current = "stopped"
            path = _save_before_exit(save, state.step, start)
            log.warning("stopped at step %d of %d; checkpoint %s; continue with resume=auto", state.step, s.max_steps,
                        path)
            return TrainResult(state.step, metrics_file, None, board.last_metrics, evals.history, stopped=True)
        clients.settle()  # the last async push has landed
        timer.current = "done"
        finished[0] = True
        final = None
        if rank == 0:
            every = s.checkpoint.checkpoint_every
            if every == 0 or state.step % every:
                save(state.step)
            final = run.path / "final"
            unwrap(state.model).save_pretrained(final, safe_serialization=True)
            state.tokenizer.save_pretrained(final)
        return TrainResult(state.step, metrics_file, final, board.last_metrics, evals.history)


def _one_step(step: int, s: TrainerSettings, state: TrainState, clients: ServiceClients, source: SampleSource,
              cfg: StepConfig, timer: PhaseTimer, table: Callable, probe: Any, world: int) -> dict[str, float]:
    """One step, redone (same prompts, same seeds) when the rollout lost the trainer's weights."""
    for attempt in range(MAX_STEP_REDOS + 1):
        timer.reset()
        try:
            clients.settle()
            if clients.push_pending:
                clients.restore(state.model)
            clients.verify()
            with timer("sample"):
                samples, _ = source.take(step, s.max_steps)
            metrics = train_step(step, samples, state, clients, cfg, timer=timer, table=table, probe=probe,
                                 world=world)
            source.complete()
            metrics["step_redos"] = float(attempt)
            return metrics
        except (InvalidInputError, PreconditionError):
            clients.verify()  # a service that restarted as another model: say that, not what it refused
            raise
        except RolloutOutOfSync as exc:
            if attempt == MAX_STEP_REDOS:
                raise UnavailableError(f"step {step}: the rollout kept losing the trainer's weights ({exc})") from None
            log.warning("step %d: %s; pushing the weights again and redoing the step", step, exc)
            source.redo()
            clients.restore(state.model)
    raise AssertionError("unreachable")


def _check_estimator(cfg: StepConfig, clients: ServiceClients) -> None:
    """The services can give what the OPD estimator needs (their limits are in GetInfo)."""
    t, r = clients.teacher_info, clients.rollout_info
    need = {"full": ("teacher max_candidate_ids", t.max_candidate_ids, cfg.vocab_size),
            "student_topk": ("teacher max_candidate_ids and rollout max_top_k", min(t.max_candidate_ids, r.max_top_k),
                             cfg.estimator_top_k),
            "teacher_topk": ("teacher max_top_k", t.max_top_k, cfg.estimator_top_k)}.get(cfg.estimator)
    if need is not None and need[1] < need[2]:
        what, have, want = need
        raise ConfigurationError(f"opd_estimator={cfg.estimator} needs {want} ids per position but the {what} is "
                                 f"{have}: raise it on the service (e.g. --max-candidate-ids {want}) or pick another "
                                 "estimator / a smaller estimator_top_k")


def _save_before_exit(save: Callable[[int], Path | None], step: int, start: int) -> Path | None:
    """A checkpoint of the last completed step (none when no step completed since the start)."""
    if step <= start:
        return None
    try:
        return save(step)
    except TopdError as exc:
        log.error("could not write a checkpoint on the way out: %s", exc)
        return None


def _prompt_room(s: TrainerSettings, state: TrainState, clients: ServiceClients | None) -> int:
    """Tokens a prompt may have: the context (the student's, the rollout's) minus max_new_tokens."""
    context = getattr(unwrap(state.model).config, "max_position_embeddings", None) or 1 << 30
    if clients is not None and clients.rollout_info is not None and clients.rollout_info.max_seq_len:
        context = min(context, clients.rollout_info.max_seq_len)
    return context - s.sampling.max_new_tokens


def _resume(run: RunDir, state: TrainState, source: SampleSource, clients: ServiceClients) -> int:
    """Load this run's latest checkpoint (checked to be this run's by open_run_dir) into the run."""
    path = run.resume_from
    saved = checkpoint.load_into(path, state.model, state.optimizer, state.scheduler)
    pinned = checkpoint.read_manifest(path).get("teacher") or {}
    now = clients.teacher_info.tokenizer_fingerprint if clients.teacher_info else None
    if pinned.get("tokenizer_fingerprint") not in (None, now):
        raise TokenizerMismatchError(f"checkpoint {path} was trained against a teacher with tokenizer "
                                     f"{pinned['tokenizer_fingerprint'][:16]}..., this teacher has {now[:16]}...")
    source.data.restore(saved["data"])
    state.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
    log.info("resumed run %s from %s (step %d)", run.run_id, path, saved["step"])
    return int(saved["step"])


def _hooks(s: TrainerSettings, rank: int, start: int, registry: CollectorRegistry, evals: hooks.Evaluation,
           metrics_file: Path, save: Callable, run: RunDir, on_step: Callable | None) -> list[hooks.Hook]:
    """After each step, in order: evaluate, export, log, checkpoint, track, show, call back."""
    out: list[hooks.Hook] = [evals, hooks.Gauges(registry)]
    if rank == 0:
        out += [hooks.MetricsLog(metrics_file), hooks.Checkpoints(s.checkpoint.checkpoint_every, save)]
        if s.report_to:
            out.append(hooks.Tracking(s.report_to, run.path, run.run_id,
                                      s.model_dump(mode="json", exclude={"auth_token"})))
        if s.progress:
            out.append(hooks.Progress(s.max_steps, start, f"topd {s.objective}"))
    if on_step is not None:
        out.append(hooks.Callback(on_step))
    return out
