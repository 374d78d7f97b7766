"""The near-future test of one step (docs/method.md, section 3): candidates -> windows -> D -> divergent.

Network calls go through `ServiceClients`; the math is `objective` (selection, classification) and
`ot` (the distance). Shape suffixes: B samples, T response tokens, N candidates, K window, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from services.trainer import objective as obj
from services.trainer.batch import ScoredBatch
from services.trainer.clients import Branches, ServiceClients
from services.trainer.ot import OTConfig, Windows, one_hot_embedding, ot_distances
from services.trainer.settings import DetectionSettings

# Ground truth of a task: (batch, rows_N, cols_N) -> bool [N], True where the candidate is an error.
ErrorLabels = Callable[[ScoredBatch, Tensor, Tensor], np.ndarray]


@dataclass(frozen=True)
class DetectionConfig:
    """What the near-future test needs, built once from the settings."""

    candidate_frac: float
    candidate_scope: str
    max_candidates: int | None
    window: int
    window_temperature: float
    divergent_rule: str  # "fraction" | "threshold" (objective.divergent_set)
    divergent_frac: float
    divergent_threshold: float | None
    one_hot: bool  # embedding == "one_hot": D over token identity instead of an embedding table
    ot: OTConfig

    @classmethod
    def from_settings(cls, s: DetectionSettings) -> "DetectionConfig":
        return cls(s.candidate_frac, s.candidate_scope, s.max_candidates, s.window, s.window_temperature,
                   s.divergent_rule, s.divergent_frac, s.divergent_threshold, s.embedding == "one_hot",
                   OTConfig(solver=s.ot_solver, eps=s.ot_eps))


@dataclass(frozen=True)
class DetectionResult:
    """The test's outcome; `branches` feed L_traj."""

    detection: obj.Detection
    branches: Branches


def loss_BT(batch: ScoredBatch) -> Tensor:
    """l_t = log pi_S(y_t) - log pi_T(y_t) at the sampler's logprobs, 0 on padding."""
    return obj.token_loss(batch.sampler_BT, batch.teacher_BT) * batch.mask_BT


def detect(batch: ScoredBatch, clients: ServiceClients, table_Vd: Tensor | None, cfg: DetectionConfig,
           traj_top_k: int, seed: int) -> DetectionResult | None:
    """Candidates (high l_t), every window of the step in one call per service, D, the divergent set.

    None when the batch has no candidate. traj_top_k > 0 asks the teacher for its top-k along its
    windows (L_traj needs them).
    """
    mask_BT = batch.mask_BT
    cand_BT = obj.select_candidates(loss_BT(batch), mask_BT, cfg.candidate_frac, cfg.candidate_scope,
                                    cfg.max_candidates)
    rows_N, cols_N = obj.candidate_positions(cand_BT)
    if len(rows_N) == 0:
        return None
    samples = batch.samples
    prefixes = [torch.cat([samples.prompt_ids[b], samples.response_ids[b][:t]])
                for b, t in zip(rows_N.tolist(), cols_N.tolist())]
    branches = clients.branch(prefixes, window=cfg.window, temperature=cfg.window_temperature, top_k=traj_top_k,
                              seed=seed)
    D_N = divergence(branches, cfg, table_Vd)
    divergent_N = obj.divergent_set(D_N, cfg.divergent_rule, cfg.divergent_frac, cfg.divergent_threshold)
    return DetectionResult(obj.Detection(cand_BT, D_N, divergent_N), branches)


def windows(completions: list, K: int) -> Windows:
    """The first K tokens of each completion, padded."""
    ids_NK = torch.zeros((len(completions), K), dtype=torch.long)
    len_N = torch.zeros(len(completions), dtype=torch.long)
    for n, c in enumerate(completions):
        toks = torch.as_tensor(np.array(c.tokens[:K]), dtype=torch.long)
        ids_NK[n, :len(toks)], len_N[n] = toks, len(toks)
    return Windows(ids_NK, len_N)


def divergence(branches: Branches, cfg: DetectionConfig, table_Vd: Tensor | None) -> Tensor:
    """D_N between the teacher's and the student's windows (float64)."""
    tw, sw = windows(branches.teacher, cfg.window), windows(branches.student, cfg.window)
    if cfg.one_hot or table_Vd is None:
        tw, sw, table_Vd = one_hot_embedding(tw, sw)
    return ot_distances(tw, sw, table_Vd, cfg.ot)
