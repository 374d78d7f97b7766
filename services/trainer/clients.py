"""The trainer's two services behind one small object: its teacher and its rollout.

Everything the trainer asks of the network goes through here: readiness and identity, samples,
teacher scores, the near-future windows of a step (one teacher Generate and one rollout Continue,
run concurrently), and weight pushes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from services.common.fingerprint import tokenizer_fingerprint
from services.trainer.batch import Samples
from services.trainer.settings import ServicesSettings
from services.trainer.student import named_weights, serving_dtype
from topd_client import ModelInfo, RolloutClient, TeacherClient
from topd_client.errors import TokenizerMismatchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Branches:
    """Near-future windows from each candidate's prefix (teacher's and student's, in candidate order)."""

    prefixes: list[Tensor]
    teacher: list[Any]  # topd_client.Completion, with the teacher's top-k along the window
    student: list[Any]


class ServiceClients:
    """Teacher + rollout clients of one trainer rank."""

    def __init__(self, cfg: ServicesSettings, rank: int = 0, token: str | None = None) -> None:
        common = dict(token=token, timeout=cfg.service_timeout)
        self.cfg = cfg
        self.teacher = TeacherClient(cfg.teacher_address, client_id=cfg.client_id, **common)
        self.rollout = RolloutClient(cfg.rollout_for(rank), client_id=f"{cfg.client_id}-r{rank}", **common)
        # Two requests at a time: the teacher's and the rollout's windows of one step.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="topd-branch")
        self.teacher_info: ModelInfo | None = None
        self.rollout_info: ModelInfo | None = None
        self.pushed_version = 0
        self._push_dtype: torch.dtype | None = None

    # ------------------------------------------------------------ identity
    def connect(self, tokenizer: Any, student_name: str) -> None:
        """Wait for both services; refuse one whose tokenizer is not the student's."""
        self.teacher.wait_ready(self.cfg.service_timeout)
        self.rollout.wait_ready(self.cfg.service_timeout)
        self.teacher_info, self.rollout_info = self.teacher.info(), self.rollout.info()
        mine = tokenizer_fingerprint(tokenizer)
        for name, info in (("teacher", self.teacher_info), ("rollout", self.rollout_info)):
            if info.tokenizer_fingerprint != mine and not self.cfg.allow_tokenizer_mismatch:
                raise TokenizerMismatchError(
                    f"{name} tokenizer differs from the student's: {name} {info.model} has fingerprint "
                    f"{info.tokenizer_fingerprint[:16]}..., student {student_name} has {mine[:16]}...; "
                    f"logprobs over different vocabularies are not comparable (override: allow_tokenizer_mismatch)")
        self.pushed_version = self.rollout_info.policy_version
        self._push_dtype = serving_dtype(self.rollout_info.dtype)

    # ------------------------------------------------------------ step calls
    def sample(self, records: Sequence[dict[str, Any]], prompt_ids: Sequence[Tensor], *, n: int, max_tokens: int,
               temperature: float, seed: int) -> Samples:
        """P prompts x n samples from the student's rollout."""
        groups = self.rollout.sample([p.numpy() for p in prompt_ids], max_tokens=max_tokens, n=n,
                                     temperature=temperature, seed=seed)
        return Samples.from_completions(records, prompt_ids, groups)

    def score(self, samples: Samples, temperature: float) -> list:
        """The teacher's logprob of every sampled token, one array per sample."""
        res = self.teacher.score([s.numpy() for s in samples.sequences()], [len(p) for p in samples.prompt_ids],
                                 top_k=0, temperature=temperature)
        return [r.token_logprobs for r in res]

    def branch(self, prefixes: list[Tensor], *, window: int, temperature: float, top_k: int, seed: int) -> Branches:
        """Every window of the step in one teacher Generate and one rollout Continue, run concurrently."""
        arrays = [p.numpy() for p in prefixes]
        t_fut = self._pool.submit(self.teacher.generate, arrays, max_tokens=window, temperature=temperature,
                                  seed=seed, top_k=top_k)
        s_fut = self._pool.submit(self.rollout.continue_from, arrays, max_tokens=window, temperature=temperature,
                                  seed=seed)
        return Branches(prefixes, [g[0] for g in t_fut.result()], [g[0] for g in s_fut.result()])

    def push(self, model: torch.nn.Module, version: int) -> None:
        """The student's weights, cast to the rollout's serving dtype, as policy `version`."""
        self.rollout.update_weights(named_weights(model, self._push_dtype), version)
        self.pushed_version = version

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {"teacher": {"address": self.cfg.teacher_address, "healthy": self.teacher.healthy()},
                "rollout": {"address": self.rollout.address, "healthy": self.rollout.healthy(),
                            "policy_version": self.pushed_version}}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.teacher.close()
        self.rollout.close()
