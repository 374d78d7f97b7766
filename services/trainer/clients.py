"""The trainer's two services behind one small object: its teacher and its rollout.

Everything the trainer asks of the network goes through here: readiness and identity, samples,
teacher scores, the near-future windows of a step (one teacher Generate and one rollout Continue,
run concurrently), and weight pushes. A service that is down, restarting or loading is waited for
(`service_timeout`, by the SDK's retries); a restart is noticed by its instance id, after which
the teacher's identity is checked again and a rollout that lost the trainer's weights gets them back.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from services.common.fingerprint import tokenizer_fingerprint
from services.trainer import weight_sync
from services.trainer.batch import Samples, TeacherScores
from services.trainer.settings import ServicesSettings
from services.trainer.student import named_weights, serving_dtype
from topd_client import ModelInfo, RolloutClient, TeacherClient
from topd_client.errors import TokenizerMismatchError, UnavailableError

log = logging.getLogger(__name__)


class TeacherChangedError(TokenizerMismatchError):
    """The teacher came back as another model: scores before and after are not comparable."""


class RolloutOutOfSync(RuntimeError):
    """The rollout no longer serves the trainer's weights (it restarted): re-push, redo the step."""


@dataclass(frozen=True)
class Branches:
    """Near-future windows from each candidate's prefix (teacher's and student's, in candidate order)."""

    prefixes: list[Tensor]
    teacher: list[Any]  # topd_client.Completion, with the teacher's top-k along the window
    student: list[Any]


@dataclass(frozen=True)
class Instances:
    """Which process of each service answered (GetInfo's instance ids) at some moment."""

    teacher: str
    rollout: str


class ServiceClients:
    """Teacher + rollout clients of one trainer rank."""

    def __init__(self, cfg: ServicesSettings, rank: int = 0, token: str | None = None,
                 stop_event: threading.Event | None = None, run_id: str = "") -> None:
        common = dict(token=token, timeout=cfg.rpc_timeout, retry_for_s=cfg.service_timeout)
        self.cfg = cfg
        self.teacher = TeacherClient(cfg.teacher_address, client_id=cfg.client_id, **common)
        # the rollout takes weights from this run only (its lease), so a second trainer cannot take it over
        self.rollout = RolloutClient(cfg.rollout_for(rank), client_id=f"{cfg.client_id}-r{rank}",
                                     owner=f"{cfg.client_id}/{run_id}" if run_id else "", **common)
        self.stop_event = stop_event or threading.Event()  # set to end waits for a service early (shutdown)
        self.teacher.stop_event = self.rollout.stop_event = self.stop_event
        # Two requests at a time: the teacher's and the rollout's windows of one step.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="topd-branch")
        self.teacher_info: ModelInfo | None = None
        self.rollout_info: ModelInfo | None = None
        self.pushed_version = 0  # the last version the rollout committed
        self.last_push: dict[str, float] = {}
        self._inflight: tuple[int, Future] | None = None  # an async push: (version, its future)
        self.push_pending = False  # the last push did not reach the rollout: it goes again before the next step
        self._known: Instances | None = None
        self._student_fingerprint = ""
        self._student_name = ""
        self._push_dtype: torch.dtype | None = None

    # ------------------------------------------------------------ identity
    def connect(self, tokenizer: Any, student_name: str) -> None:
        """Wait for both services; refuse one whose tokenizer is not the student's."""
        self._student_fingerprint, self._student_name = tokenizer_fingerprint(tokenizer), student_name
        self.teacher.wait_ready(self.cfg.service_timeout)
        self.rollout.wait_ready(self.cfg.service_timeout)
        self.teacher_info, self.rollout_info = self.teacher.info(), self.rollout.info()
        for name, info in (("teacher", self.teacher_info), ("rollout", self.rollout_info)):
            self._check_tokenizer(name, info)
        self.pushed_version = self.rollout_info.policy_version
        self._push_dtype = serving_dtype(self.rollout_info.dtype)
        self._known = Instances(self.teacher_info.instance_id, self.rollout_info.instance_id)

    def _check_tokenizer(self, name: str, info: ModelInfo) -> None:
        if info.tokenizer_fingerprint != self._student_fingerprint and not self.cfg.allow_tokenizer_mismatch:
            raise TokenizerMismatchError(
                f"{name} tokenizer differs from the student's: {name} {info.model} has fingerprint "
                f"{info.tokenizer_fingerprint[:16]}..., student {self._student_name} has "
                f"{self._student_fingerprint[:16]}...; logprobs over different vocabularies are not comparable "
                "(override: allow_tokenizer_mismatch)")

    def verify(self) -> None:
        """Check that both services are still the ones the trainer knows (one GetInfo each; waits for a
        service that is down). After a restart (its instance id changed) the teacher must be the same
        model as at connect (else TeacherChangedError), and the rollout must serve the trainer's
        weights (else RolloutOutOfSync: `restore` them and redo the step)."""
        t_info, r_info = self.teacher.info(), self.rollout.info()
        known, self._known = self._known, Instances(t_info.instance_id, r_info.instance_id)
        if known is None:
            return
        if t_info.instance_id != known.teacher:
            self._check_tokenizer("teacher", t_info)
            first = self.teacher_info
            if first is not None and (t_info.model, t_info.revision) != (first.model, first.revision):
                raise TeacherChangedError(f"the teacher at {self.cfg.teacher_address} restarted as another model: "
                                          f"{t_info.model}@{t_info.revision}, was {first.model}@{first.revision}")
            log.warning("teacher at %s restarted (same model); training goes on", self.cfg.teacher_address)
        if r_info.instance_id != known.rollout:
            self._check_tokenizer("rollout", r_info)
            if r_info.policy_version not in (self.pushed_version, self.newest_version):
                raise RolloutOutOfSync(f"rollout at {self.rollout.address} restarted and serves policy version "
                                       f"{r_info.policy_version}, not the trainer's {self.pushed_version}")

    # ------------------------------------------------------------ step calls
    def sample(self, records: Sequence[dict[str, Any]], prompt_ids: Sequence[Tensor], *, n: int, max_tokens: int,
               temperature: float, seed: int, top_k: int = 0) -> Samples:
        """P prompts x n samples from the student's rollout (with the sampler's top-k ids when top_k > 0)."""
        groups = self.rollout.sample([p.numpy() for p in prompt_ids], max_tokens=max_tokens, n=n,
                                     temperature=temperature, seed=seed, top_k=top_k)
        return Samples.from_completions(records, prompt_ids, groups)

    def score(self, samples: Samples, temperature: float, *, top_k: int = 0,
              candidate_ids: Sequence[np.ndarray] | None = None) -> TeacherScores:
        """The teacher's logprob of every sampled token; with top_k, its top-k ids and logprobs; with
        candidate_ids ([T, c] per sample), its logprobs at those ids."""
        res = self.teacher.score([s.numpy() for s in samples.sequences()], [len(p) for p in samples.prompt_ids],
                                 top_k=top_k, temperature=temperature, candidate_ids=candidate_ids)
        token = [r.token_logprobs for r in res]
        if candidate_ids is not None:
            return TeacherScores(token, list(candidate_ids), [r.candidate_logprobs for r in res])
        if top_k:
            return TeacherScores(token, [r.topk_ids for r in res], [r.topk_logprobs for r in res])
        return TeacherScores(token)

    def branch(self, prefixes: list[Tensor], *, window: int, temperature: float, top_k: int, seed: int) -> Branches:
        """Every window of the step in one teacher Generate and one rollout Continue, run concurrently.

        The student's windows must come from the trainer's weights: a rollout that restarted in the
        meantime answers with another version (RolloutOutOfSync)."""
        arrays = [p.numpy() for p in prefixes]
        t_fut = self._pool.submit(self.teacher.generate, arrays, max_tokens=window, temperature=temperature,
                                  seed=seed, top_k=top_k)
        s_fut = self._pool.submit(self.rollout.continue_from, arrays, max_tokens=window, temperature=temperature,
                                  seed=seed)
        student = [g[0] for g in s_fut.result()]
        stale = {c.policy_version for c in student} - {self.pushed_version, self.newest_version}
        if stale:
            t_fut.result()
            raise RolloutOutOfSync(f"rollout answered near-future windows with policy version(s) {sorted(stale)}, "
                                   f"not the trainer's {self.pushed_version}")
        return Branches(prefixes, [g[0] for g in t_fut.result()], student)

    def push(self, model: torch.nn.Module, version: int, wait: bool = True) -> None:
        """The student's weights, cast to the rollout's serving dtype, as policy `version`; with
        wait=False it travels while the next step samples (see `settle`)."""
        self.settle()
        weights = named_weights(model, self._push_dtype, on_cpu=self.cfg.weight_transport != "nccl")
        if wait:
            self._record(weight_sync.push(self.rollout, weights, version, self.cfg.weight_transport), version)
            return
        # float32 CPU parameters come back uncopied from named_weights; the optimizer would change them
        shared = any(t.data_ptr() == p.data_ptr() for t, p in zip(weights.values(), model.parameters()))
        self._inflight = (version, weight_sync.push_async(self.rollout, weights, version, self.cfg.weight_transport,
                                                          copy=shared))

    def settle(self) -> None:
        """Wait for an async push in flight. One that could not reach the rollout leaves the push
        pending (the loop pushes again); any other failure raises here."""
        if self._inflight is not None:
            version, fut = self._inflight
            self._inflight = None
            try:
                self._record(fut.result(), version)
            except UnavailableError as exc:
                log.warning("weights of version %d not pushed (%s); pushing again before the next step", version, exc)
                self.push_pending = True

    @property
    def newest_version(self) -> int:
        """The version the rollout serves once the push in flight lands."""
        return self._inflight[0] if self._inflight is not None else self.pushed_version

    def _record(self, result: weight_sync.PushResult, version: int) -> None:
        self.pushed_version, self.push_pending = version, False
        self.last_push = {"sync/push_s": result.seconds, "sync/pause_s": result.pause_seconds,
                          "sync/gb_per_s": result.gb_per_s}

    def restore(self, model: torch.nn.Module) -> None:
        """Give a restarted rollout the trainer's current weights again (a new version above its own)."""
        self.settle()
        version = max(self.pushed_version, self.rollout.info().policy_version) + 1
        log.warning("rollout at %s lost the trainer's weights; pushing them again as version %d",
                    self.rollout.address, version)
        self.push(model, version)

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        def one(client: Any, address: str) -> dict[str, Any]:
            import time

            down = None if client.down_since is None else round(time.monotonic() - client.down_since, 1)
            return {"address": address, "healthy": client.healthy(), "down_s": down}

        return {"teacher": one(self.teacher, self.cfg.teacher_address),
                "rollout": {**one(self.rollout, self.rollout.address), "policy_version": self.pushed_version}}

    def close(self, release: bool = True) -> None:
        """Finish: wait for a push in flight and, when the run ended (release), give the rollout up."""
        try:
            self.settle()
            if release:
                self.rollout.retry_for_s = min(self.rollout.retry_for_s, 5.0)
                self.rollout.release_owner(timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - closing: the next start pushes again anyway
            log.warning("closing the rollout's session: %s", exc)
        self.stop_event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.teacher.close()
        self.rollout.close()
