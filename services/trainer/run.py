"""`topd train`: distributed setup, REST status, progress bar, the step loop, metrics, checkpoints."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from prometheus_client import CollectorRegistry, Gauge

from services.common.runner import ServiceRun, start_service
from services.common.status_app import ServiceState
from services.trainer.loop import Trainer, write_jsonl
from services.trainer.settings import TrainerSettings
from services.trainer.student import unwrap
from topd_client.auth import resolve_token

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    metrics_file: Path
    final_model: Path | None
    last_metrics: dict[str, Any]
    eval_accuracy: list[tuple[int, float]]


def _distributed() -> tuple[int, int]:
    """(rank, world) under torchrun; initialises the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _progress(trainer: Trainer, enabled: bool):
    if not enabled or trainer.rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=trainer.s.max_steps, initial=trainer.step, desc=f"topd {trainer.s.objective}", unit="step",
                dynamic_ncols=True)


def train(settings: TrainerSettings, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training to max_steps (or resume to it). Rank 0 writes metrics and checkpoints."""
    rank, world = _distributed()
    trainer = Trainer(settings, rank, world)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
    registry = CollectorRegistry()
    g_step = Gauge("topd_trainer_step", "Completed training steps", registry=registry)
    g_loss = Gauge("topd_trainer_loss", "Loss of the last step", registry=registry)
    g_kl = Gauge("topd_trainer_reverse_kl", "Mean reverse KL of the last step", registry=registry)
    state = ServiceState("trainer", registry, trainer.status)
    http_port = settings.http_port if rank == 0 else 0
    service: ServiceRun = start_service(state, host=settings.host, grpc_port=None, http_port=http_port,
                                        http_token=resolve_token(settings.auth_token, settings.auth_token_file))
    state.set_ready(False, "connecting to teacher and rollout")
    evals: list[tuple[int, float]] = []
    bar = None
    try:
        trainer.connect()
        start = trainer.resume() if settings.resume else 0
        if start == 0:
            trainer.push_weights()
        if not settings.resume and rank == 0 and metrics_file.exists():
            metrics_file.unlink()
        trainer.step = start
        state.set_ready(True)
        eval_records = trainer.eval_records() if settings.eval_every else []
        bar = _progress(trainer, settings.progress)
        for step in range(start + 1, settings.max_steps + 1):
            t0 = time.perf_counter()
            result = trainer.train_step(step, trainer._prefetched)
            m = result.metrics
            if eval_records and (step % settings.eval_every == 0 or step == settings.max_steps):
                trainer.phase = "eval"
                acc = trainer.evaluate(eval_records)
                m["eval/accuracy"] = acc
                evals.append((step, acc))
            trainer.step = step
            trainer.step_times.append(time.perf_counter() - t0)
            m["time/step"] = trainer.step_times[-1]
            trainer.last_metrics = m
            if rank == 0:
                write_jsonl(metrics_file, {"step": step, "time": time.time(), **m})
            g_step.set(step)
            g_loss.set(m["loss"])
            g_kl.set(m["opd/reverse_kl"])
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                trainer.save(step)
            if bar is not None:
                post = {"kl": f"{m['opd/reverse_kl']:.3f}", "loss": f"{m['loss']:.3f}"}
                if "eval/accuracy" in m:
                    post["acc"] = f"{m['eval/accuracy']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if on_step is not None:
                on_step(step, m)
        trainer.phase = "done"
        final = None
        if rank == 0:
            if settings.checkpoint_every == 0 or settings.max_steps % max(settings.checkpoint_every, 1):
                trainer.save(trainer.step)
            final = out / "final"
            unwrap(trainer.model).save_pretrained(final, safe_serialization=True)
            trainer.tokenizer.save_pretrained(final)
        return TrainResult(trainer.step, metrics_file, final, trainer.last_metrics, evals)
    finally:
        if bar is not None:
            bar.close()
        trainer.close()
        service.stop()
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
