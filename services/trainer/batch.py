"""A step's samples as tensors: one list entry per (prompt, sample), padded once for the loss.

Shape suffixes: B samples, T response tokens (padded to the longest response).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Samples:
    """The step's samples with the sampler's temperature-1 logprobs and the version that drew them."""

    prompt_ids: list[Tensor]
    response_ids: list[Tensor]
    sampler_logp: list[Tensor]
    versions: list[int]
    records: list[dict[str, Any]]
    finish: list[str]
    topk_ids: list[np.ndarray] | None = None  # the sampler's top-k ids [T, k] per sample, when asked for

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def from_completions(cls, records: Sequence[dict[str, Any]], prompt_ids: Sequence[Tensor],
                         groups: Sequence[Sequence[Any]]) -> "Samples":
        """From the rollout's completions (one group per prompt); empty responses carry no token to learn."""
        rows: list[tuple] = []
        for rec, p, group in zip(records, prompt_ids, groups):
            for c in group:
                if len(c.tokens):
                    rows.append((p, torch.as_tensor(np.array(c.tokens), dtype=torch.long),
                                 torch.as_tensor(np.array(c.logprobs), dtype=torch.float32), int(c.policy_version),
                                 rec, c.finish_reason, np.asarray(c.topk_ids)))
        if not rows:
            return cls([], [], [], [], [], [])
        cols = [list(col) for col in zip(*rows)]
        with_topk = all(ids.shape[-1] > 0 for ids in cols[6])
        return cls(*cols[:6], topk_ids=cols[6] if with_topk else None)

    def keep(self, idx: Sequence[int]) -> "Samples":
        picked = [[getattr(self, f)[i] for i in idx] for f in
                  ("prompt_ids", "response_ids", "sampler_logp", "versions", "records", "finish")]
        return Samples(*picked, topk_ids=None if self.topk_ids is None else [self.topk_ids[i] for i in idx])

    def sequences(self) -> list[Tensor]:
        """prompt + response of every sample."""
        return [torch.cat([p, y]) for p, y in zip(self.prompt_ids, self.response_ids)]


def drop_stale(samples: Samples, current_version: int, max_staleness: int) -> tuple[Samples, int]:
    """Keep samples drawn at most `max_staleness` versions before `current_version`; (kept, dropped)."""
    keep = [i for i, v in enumerate(samples.versions) if current_version - v <= max_staleness]
    return samples.keep(keep), len(samples) - len(keep)


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's numbers for each sample: log pi_T(y_t), and log pi_T at k ids per position
    (its top-k, or ids the trainer chose) when the OPD estimator needs them."""

    token_logp: list[np.ndarray]  # [T] per sample
    ids: list[np.ndarray] | None = None  # [T, k] per sample (None: in id order, k = V)
    ids_logp: list[np.ndarray] | None = None  # [T, k] per sample


@dataclass(frozen=True)
class ScoredBatch:
    """Samples plus the teacher's scores, right-padded once."""

    samples: Samples
    tokens_BT: Tensor  # long, 0 past each response
    mask_BT: Tensor  # bool, True on response tokens
    sampler_BT: Tensor  # float32, the sampler's log pi(y_t)
    teacher_BT: Tensor  # float32, the teacher's log pi_T(y_t)
    ids_BTk: Tensor | None = None  # long, the k ids of teacher_BTk (None: teacher_BTk is in id order)
    teacher_BTk: Tensor | None = None  # float32, log pi_T at ids_BTk

    @classmethod
    def pad(cls, samples: Samples, scores: TeacherScores) -> "ScoredBatch":
        B = len(samples)
        T = max((len(r) for r in samples.response_ids), default=0)
        tokens = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        sampler = torch.zeros((B, T), dtype=torch.float32)
        for b, (r, lp) in enumerate(zip(samples.response_ids, samples.sampler_logp)):
            tokens[b, :len(r)], mask[b, :len(r)], sampler[b, :len(r)] = r, True, lp
        teacher = _pad_rows(scores.token_logp, (B, T), torch.float32)
        ids = None if scores.ids is None else _pad_rows(scores.ids, (B, T, scores.ids[0].shape[-1]), torch.long)
        ids_logp = (None if scores.ids_logp is None else
                    _pad_rows(scores.ids_logp, (B, T, scores.ids_logp[0].shape[-1]), torch.float32))
        return cls(samples, tokens, mask, sampler, teacher, ids, ids_logp)

    @property
    def num_tokens(self) -> int:
        return int(self.mask_BT.sum())


def _pad_rows(rows: Sequence[np.ndarray], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Stack per-sample arrays of T_b rows into a zero-padded [B, T, ...] tensor."""
    out = torch.zeros(shape, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(np.asarray(row), dtype=dtype)
    return out
