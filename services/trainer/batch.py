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
                                 rec, c.finish_reason))
        return cls(*(list(col) for col in zip(*rows))) if rows else cls([], [], [], [], [], [])

    def keep(self, idx: Sequence[int]) -> "Samples":
        return Samples(*[[getattr(self, f)[i] for i in idx] for f in
                         ("prompt_ids", "response_ids", "sampler_logp", "versions", "records", "finish")])

    def sequences(self) -> list[Tensor]:
        """prompt + response of every sample."""
        return [torch.cat([p, y]) for p, y in zip(self.prompt_ids, self.response_ids)]


def drop_stale(samples: Samples, current_version: int, max_staleness: int) -> tuple[Samples, int]:
    """Keep samples drawn at most `max_staleness` versions before `current_version`; (kept, dropped)."""
    keep = [i for i, v in enumerate(samples.versions) if current_version - v <= max_staleness]
    return samples.keep(keep), len(samples) - len(keep)


@dataclass(frozen=True)
class ScoredBatch:
    """Samples plus the teacher's logprob of every sampled token, right-padded once."""

    samples: Samples
    tokens_BT: Tensor  # long, 0 past each response
    mask_BT: Tensor  # bool, True on response tokens
    sampler_BT: Tensor  # float32, the sampler's log pi(y_t)
    teacher_BT: Tensor  # float32, the teacher's log pi_T(y_t)

    @classmethod
    def pad(cls, samples: Samples, teacher_logp: Sequence[np.ndarray]) -> "ScoredBatch":
        B = len(samples)
        T = max((len(r) for r in samples.response_ids), default=0)
        tokens = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        sampler = torch.zeros((B, T), dtype=torch.float32)
        teacher = torch.zeros((B, T), dtype=torch.float32)
        for b, (r, lp, tl) in enumerate(zip(samples.response_ids, samples.sampler_logp, teacher_logp)):
            n = len(r)
            tokens[b, :n], mask[b, :n], sampler[b, :n] = r, True, lp
            teacher[b, :n] = torch.tensor(np.asarray(tl), dtype=torch.float32)
        return cls(samples, tokens, mask, sampler, teacher)

    @property
    def num_tokens(self) -> int:
        return int(self.mask_BT.sum())
