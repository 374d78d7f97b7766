"""The trainer: connects to its services, runs steps, pushes weights, checkpoints, reports.

    prompts -> rollout.Sample -> teacher.Score -> [teacher.Generate + rollout.Continue] -> loss
            -> AdamW -> rollout.UpdateWeights (version = step) -> metrics / checkpoint
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.model_files import resolve_device, resolve_model
from services.trainer import checkpoint
from services.trainer import objective as obj
from services.trainer import step as st
from services.trainer.data import PromptStream, generic_check, load_dataset_records, read_jsonl
from services.trainer.settings import TrainerSettings
from services.trainer.student import load_student, named_weights, serving_dtype, unwrap
from topd_client import RolloutClient, TeacherClient
from topd_client.errors import TokenizerMismatchError

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One rank of a training run."""

    def __init__(self, settings: TrainerSettings, rank: int = 0, world: int = 1) -> None:
        self.s = settings
        self.rank, self.world = rank, world
        self.out = Path(settings.output_dir)
        self.device = resolve_device(settings.device)
        if self.device.startswith("cuda") and world > 1:
            self.device = f"cuda:{rank % torch.cuda.device_count()}"
        _seed_everything(settings.seed + rank)
        self.step = 0
        self.phase = "starting"
        self.last_metrics: dict[str, Any] = {}
        self.nonfinite_steps = 0
        self.pushed_version = 0
        self.push_dtype: torch.dtype | None = None  # the rollout's serving dtype, read in connect()
        self.started = time.time()
        self.step_times: list[float] = []
        self.student_path = resolve_model(settings.student_model)
        self.model, self.tokenizer = load_student(self.student_path, self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        warm = max(settings.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: min(1.0, (i + 1) / (warm + 1)))
        records = self._records()
        self.data = PromptStream(records, settings.seed, rank, world)
        self.checker = self._checker()
        addresses = [a.strip() for a in settings.rollout_address.split(",") if a.strip()]
        common = dict(token=settings.auth_token, token_file=settings.auth_token_file, timeout=settings.service_timeout)
        self.teacher = TeacherClient(settings.teacher_address, client_id=settings.client_id, **common)
        self.rollout = RolloutClient(addresses[rank % len(addresses)], client_id=f"{settings.client_id}-r{rank}",
                                     **common)
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="topd-trainer")
        self.teacher_table = self._teacher_table()
        self.teacher_info = None
        self.variant = obj.get_variant(settings.objective)
        self._prefetched = None
        self.probe = self._probe(records)

    # ----------------------------------------------------------------- setup
    def _records(self) -> list[dict[str, Any]]:
        s = self.s
        if s.dataset:
            return load_dataset_records(s.dataset, s.dataset_split, s.prompt_field)
        if s.train_file:
            return read_jsonl(s.train_file, s.prompt_field)
        from services.task.models import prepare_builtin
        from services.common.model_files import data_dir

        return read_jsonl(prepare_builtin(data_dir()).train_jsonl, s.prompt_field)

    def _checker(self):
        if self.s.student_model.startswith("builtin:") and not self.s.train_file and not self.s.dataset:
            from services.task.arith import Problem, check

            return lambda record, text: check(Problem.from_json(record), text)
        return generic_check

    def _probe(self, records: list[dict[str, Any]]):
        """Ground-truth labels for the detector when the prompts come from the built-in task."""
        if not self.s.ground_truth or not records or "operands" not in records[0]:
            return None
        from services.task.ground_truth import make_probe

        return make_probe(self.tokenizer)

    def _teacher_table(self) -> torch.Tensor | None:
        if self.s.embedding != "teacher":
            return None
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(self.s.teacher_embedding_model, dtype=torch.float32)
        table = teacher.get_input_embeddings().weight.detach().double().clone()
        del teacher
        return table

    def connect(self) -> None:
        """Wait for both services, refuse a teacher whose tokenizer differs, sync weights on resume."""
        self.phase = "connecting"
        self.teacher.wait_ready(self.s.service_timeout)
        self.rollout.wait_ready(self.s.service_timeout)
        self.teacher_info = self.teacher.info()
        rollout_info = self.rollout.info()
        from services.common.fingerprint import tokenizer_fingerprint

        mine = tokenizer_fingerprint(self.tokenizer)
        for name, info in (("teacher", self.teacher_info), ("rollout", rollout_info)):
            if info.tokenizer_fingerprint != mine and not self.s.allow_tokenizer_mismatch:
                raise TokenizerMismatchError(
                    f"{name} tokenizer differs from the student's: {name} {info.model} has fingerprint "
                    f"{info.tokenizer_fingerprint[:16]}..., student {self.student_path} has {mine[:16]}...; "
                    f"logprobs over different vocabularies are not comparable (override: allow_tokenizer_mismatch)")
        self.pushed_version = rollout_info.policy_version
        self.push_dtype = serving_dtype(rollout_info.dtype)

    def push_weights(self) -> None:
        """Make rollout serve exactly the trainer's weights (fresh start, resume): a rollout that
        outlived an earlier run may hold other weights."""
        self._push(self.pushed_version + 1)

    def _push(self, version: int) -> None:
        """The student's weights, cast to the rollout's serving dtype, as policy `version`."""
        self.rollout.update_weights(named_weights(self.model, self.push_dtype), version)
        self.pushed_version = version

    # ------------------------------------------------------------------- run
    def prompt_ids(self, records: list[dict[str, Any]]) -> list[torch.Tensor]:
        out = []
        for r in records:
            text = r[self.s.prompt_field]
            if self.s.chat_template and self.tokenizer.chat_template:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(text)["input_ids"]
            out.append(torch.as_tensor(ids, dtype=torch.long))
        return out

    def _sample_for(self, step: int) -> tuple[st.Rollouts, dict[str, float]]:
        records = self.data.next_batch(self.s.prompts_per_step)
        t0 = time.perf_counter()
        r = st.sample(self.rollout, records, self.prompt_ids(records), self.s, seed=self.s.seed * 100_003 + step)
        return r, {"sample": time.perf_counter() - t0}

    def train_step(self, step: int, prefetched=None) -> st.StepResult:
        """One step: returns metrics; a non-finite loss skips the update (logged and counted)."""
        s, timer = self.s, st.Timer()
        self.phase = "sample"
        rollouts, sample_t = prefetched.result() if prefetched is not None else self._sample_for(step)
        timer.phase_s.update(sample_t)
        rollouts, stale = st.drop_stale(rollouts, self.pushed_version, s.max_staleness)
        tokens_BT, mask_BT, sampler_BT = rollouts.padded()
        next_fut = self.pool.submit(self._sample_for, step + 1) if s.overlap and step < s.max_steps else None
        self.phase = "score"
        teacher_BT = timer("score", st.score, self.teacher, rollouts, tokens_BT.shape[1], s.teacher_temperature)
        loss_BT = obj.token_loss(sampler_BT, teacher_BT) * mask_BT
        detection, branches, probe_metrics = None, None, {}
        if self.variant.needs_detection:
            self.phase = "branch"
            cand_BT = obj.select_candidates(loss_BT, mask_BT, s.candidate_frac, s.candidate_scope, s.max_candidates)
            rows, cols = obj.candidate_positions(cand_BT)
            if len(rows):
                branches = timer("branch", st.branch, self.teacher, self.rollout, rollouts, rows, cols, s,
                                 s.seed * 7919 + step, self.pool)
                D_N = timer("branch", st.divergence, branches, s, st.embedding_table(self.model, s, self.teacher_table))
                detection = obj.Detection(cand_BT, D_N, obj.divergent_by_fraction(D_N, s.divergent_frac))
                if self.probe is not None:
                    probe_metrics = self.probe(rollouts, rows, cols, D_N, detection.divergent_N)
        self.phase = "train"
        t0 = time.perf_counter()
        weights_BT = (obj.variant_weights(s.objective, mask_BT, detection, s.alpha)
                      if detection is not None else torch.ones_like(sampler_BT))
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        opd_total, logp_new_BT = st.backward_opd(model, rollouts, teacher_BT, weights_BT, s, self.device)
        metrics: dict[str, float] = {}
        traj_total = torch.zeros(())
        if self.variant.uses_traj and detection is not None and branches is not None:
            traj_total, traj_m = st.backward_traj(model, branches, detection.divergent_N, float(mask_BT.sum()), s,
                                                  self.device)
            metrics.update(traj_m)
        total = opd_total + traj_total
        skipped = not st.is_finite(total)
        if self.world > 1:
            skipped = average_gradients(self.model, skipped)
        grad_norm = float("nan")
        if skipped:
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss %s, update skipped (%d so far)", step, float(total),
                        self.nonfinite_steps)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
        timer.phase_s["train"] = time.perf_counter() - t0
        self.phase = "sync"
        version = max(step, self.pushed_version + 1)
        timer("sync", self._push, version)
        _, opd_m = obj.opd_loss(obj.OPDInputs(logp_new_BT, sampler_BT, teacher_BT, mask_BT, weights_BT),
                                obj.OPDConfig(adv_clip=s.adv_clip, kl_discount=s.kl_discount,
                                              advantage_from=s.advantage_from))
        from services.trainer.diagnostics import batch_diagnostics

        metrics.update(opd_m)
        metrics.update(batch_diagnostics(loss_BT, mask_BT, detection))
        metrics.update(probe_metrics)
        n_tokens = int(mask_BT.sum())
        step_s = sum(timer.phase_s.values())
        metrics.update({
            "loss": float(total), "loss/opd": float(opd_total), "loss/traj": float(traj_total),
            "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "samples": float(len(rollouts)),
            "response_tokens": float(n_tokens), "stale_dropped": float(stale),
            "finish_stop_frac": sum(f == "stop" for f in rollouts.finish) / max(len(rollouts), 1),
            "nonfinite_steps": float(self.nonfinite_steps), "policy_version": float(version),
            "tokens_per_s": n_tokens / step_s if step_s > 0 else 0.0,
            **{f"time/{k}": v for k, v in timer.phase_s.items()},
        })
        self._prefetched = next_fut
        return st.StepResult(metrics, skipped, timer.phase_s)

    def evaluate(self, records: list[dict[str, Any]]) -> float:
        """Greedy accuracy of the serving student on held-out prompts."""
        from services.trainer.evaluate import greedy_accuracy

        acc, _ = greedy_accuracy(self.rollout.continue_from, [p.numpy() for p in self.prompt_ids(records)], records,
                                 self.checker, self.tokenizer, self.s.max_new_tokens)
        return acc

    def eval_records(self) -> list[dict[str, Any]]:
        if self.s.eval_file:
            return read_jsonl(self.s.eval_file, self.s.prompt_field)[: self.s.eval_size]
        if self.s.train_file or self.s.dataset:
            return []
        from services.common.model_files import data_dir
        from services.task.models import prepare_builtin

        return read_jsonl(prepare_builtin(data_dir()).val_jsonl, self.s.prompt_field)[: self.s.eval_size]

    # ----------------------------------------------------------- checkpoints
    def manifest(self) -> dict[str, Any]:
        t = self.teacher_info
        return {"settings": self.s.model_dump(mode="json", exclude={"auth_token"}),
                "teacher": None if t is None else {"model": t.model, "revision": t.revision,
                                                   "tokenizer_fingerprint": t.tokenizer_fingerprint},
                "student_model": self.student_path}

    def save(self, step: int) -> Path | None:
        if self.rank != 0:
            return None
        self.phase = "checkpoint"
        return checkpoint.save(self.out, step, unwrap(self.model), self.tokenizer, self.optimizer, self.scheduler,
                               {"data": vars(self.data.state), "pushed_version": self.pushed_version,
                                "nonfinite_steps": self.nonfinite_steps}, self.manifest(), self.s.keep_checkpoints)

    def resume(self) -> int:
        path = checkpoint.latest(self.out)
        if path is None:
            log.info("resume: no checkpoint in %s, starting fresh", self.out)
            return 0
        state = checkpoint.load_into(path, self.model, self.optimizer, self.scheduler)
        pinned = checkpoint.read_manifest(path).get("teacher") or {}
        if self.teacher_info and pinned.get("tokenizer_fingerprint") not in (None, self.teacher_info.tokenizer_fingerprint):
            raise TokenizerMismatchError(f"checkpoint {path} was trained against a teacher with tokenizer "
                                         f"{pinned['tokenizer_fingerprint'][:16]}..., this teacher has "
                                         f"{self.teacher_info.tokenizer_fingerprint[:16]}...")
        self.data.restore(state["data"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        step = int(state["step"])
        self.push_weights()
        log.info("resumed from %s (step %d)", path, step)
        return step

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.teacher.close()
        self.rollout.close()

    def eta_s(self) -> float | None:
        if not self.step_times:
            return None
        recent = self.step_times[-10:]
        return (self.s.max_steps - self.step) * sum(recent) / len(recent)

    def status(self) -> dict[str, Any]:
        return {"step": self.step, "max_steps": self.s.max_steps, "phase": self.phase, "objective": self.s.objective,
                "rank": self.rank, "world": self.world, "device": self.device,
                "teacher": {"address": self.s.teacher_address, "healthy": self.teacher.healthy()},
                "rollout": {"address": self.rollout.address, "healthy": self.rollout.healthy(),
                            "policy_version": self.pushed_version},
                "eta_s": self.eta_s(), "nonfinite_steps": self.nonfinite_steps,
                "last_metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in self.last_metrics.items()}}


def average_gradients(model: torch.nn.Module, skipped: bool) -> bool:
    """Data parallel: average gradients over ranks (each rank's loss is normalised by its own tokens)
    and agree on skipping. All-reduce after the backward passes instead of DDP hooks, because ranks
    run different numbers of micro-batches (their branch windows differ)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if skipped else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
    return bool(flag.item() > 0)


def write_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
