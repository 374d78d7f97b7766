"""The step's loss on the student, backward in micro-batches, metrics computed in the same pass.

    L = L_OPD(w_t)  [+ lambda * L_traj at the divergent states]

Each micro-batch is divided by the whole batch's N (`aggregate_tokens`' num_tokens), so the
micro-batches' gradients add up to the batch's. Shape suffixes: B samples, T response tokens,
N windows, K window length, k top-k, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from services.trainer import objective as obj
from services.trainer.batch import ScoredBatch
from services.trainer.clients import Branches
from services.trainer.estimators import EstimatorInputs, estimator_loss
from services.trainer.student import position_logits

# Metrics that are sums over micro-batches (already divided by the batch's N); variances over tokens,
# pooled with their mean's key; the others are token means, combined weighted by each micro-batch's
# token count.
_SUMMED = frozenset({"opd/loss", "topd/traj_loss"})
_VARIANCES = {"opd/adv_var": "opd/adv_mean"}


@dataclass(frozen=True)
class LossConfig:
    """What the loss needs, built once from the settings."""

    estimator: str  # `estimators.ESTIMATORS` name
    opd: obj.OPDConfig
    traj: obj.TrajConfig
    traj_normalisation: str
    traj_top_k: int
    window: int
    micro_batch: int


def _combine(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Per-micro-batch metrics -> the batch's (sums for _SUMMED, pooled variances for _VARIANCES:
    E[x^2] - E[x]^2 over all tokens, token-weighted means otherwise)."""
    total = max(sum(n for _, n in parts), 1)
    out: dict[str, float] = {}
    for key in parts[0][0] if parts else ():
        if key in _SUMMED:
            out[key] = sum(m[key] for m, _ in parts)
        elif key in _VARIANCES:
            mean = _VARIANCES[key]
            second = sum((m[key] + m[mean] ** 2) * n for m, n in parts) / total
            out[key] = max(second - (sum(m[mean] * n for m, n in parts) / total) ** 2, 0.0)
        else:
            out[key] = sum(m[key] * n for m, n in parts) / total
    return out


def backward_opd(model: torch.nn.Module, batch: ScoredBatch, weights_BT: Tensor, cfg: LossConfig,
                 device: str) -> tuple[Tensor, dict[str, float]]:
    """Accumulate grads of L_OPD (estimator `cfg.estimator`); returns (loss, metrics) of the whole batch."""
    samples, n_tokens = batch.samples, float(batch.num_tokens)
    seqs = samples.sequences()
    total = torch.zeros((), dtype=torch.float32)
    parts: list[tuple[dict[str, float], int]] = []
    for lo in range(0, len(samples), cfg.micro_batch):
        hi = min(lo + cfg.micro_batch, len(samples))
        counts = [len(samples.response_ids[i]) for i in range(lo, hi)]
        T = max(counts)
        logits = position_logits(model, seqs[lo:hi], [len(p) for p in samples.prompt_ids[lo:hi]], counts, device)
        sl = (slice(lo, hi), slice(0, T))

        def part(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[sl].to(device)

        inp = EstimatorInputs(logits, part(batch.tokens_BT), part(batch.mask_BT), logp_sampler_BT=part(batch.sampler_BT),
                              logp_teacher_BT=part(batch.teacher_BT), ids_BTk=part(batch.ids_BTk),
                              logp_teacher_BTk=part(batch.teacher_BTk), weights_BT=part(weights_BT),
                              num_tokens=n_tokens)
        loss, metrics = estimator_loss(cfg.estimator, inp, cfg.opd)
        if torch.isfinite(loss):
            loss.backward()
        total = total + loss.detach().cpu()
        parts.append((metrics, sum(counts)))
    return total, _combine(parts)


def backward_traj(model: torch.nn.Module, branches: Branches, divergent_N: Tensor, num_response_tokens: float,
                  cfg: LossConfig, device: str) -> tuple[Tensor, dict[str, float]]:
    """Accumulate grads of lambda * L_traj: the student teacher-forced on the teacher's windows."""
    K, k = cfg.window, cfg.traj_top_k
    idx = [n for n in divergent_N.nonzero().flatten().tolist() if len(branches.teacher[n].tokens) > 0]
    if not idx:
        return torch.zeros(()), {"topd/traj_kl": 0.0, "topd/traj_loss": 0.0, "topd/num_windows": 0.0}
    n_window_tokens = sum(min(len(branches.teacher[n].tokens), K) for n in idx)
    denom = obj.traj_num_tokens(cfg.traj_normalisation, num_response_tokens, n_window_tokens)
    total = torch.zeros(())
    parts: list[tuple[dict[str, float], int]] = []
    for lo in range(0, len(idx), cfg.micro_batch):
        chunk = idx[lo:lo + cfg.micro_batch]
        ids_NKk = torch.zeros((len(chunk), K, k), dtype=torch.long)
        logp_NKk = torch.full((len(chunk), K, k), -1e4, dtype=torch.float32)
        mask_NK = torch.zeros((len(chunk), K), dtype=torch.bool)
        seqs, starts, counts = [], [], []
        for j, n in enumerate(chunk):
            c, prefix = branches.teacher[n], branches.prefixes[n]
            t = min(len(c.tokens), K)
            seqs.append(torch.cat([prefix, torch.as_tensor(np.array(c.tokens[:t]), dtype=torch.long)]))
            starts.append(len(prefix))
            counts.append(t)
            kk = min(c.topk_ids.shape[1], k)
            ids_NKk[j, :t, :kk] = torch.as_tensor(np.array(c.topk_ids[:t, :kk]), dtype=torch.long)
            logp_NKk[j, :t, :kk] = torch.as_tensor(np.array(c.topk_logprobs[:t, :kk]))
            mask_NK[j, :t] = True
        logits = position_logits(model, seqs, starts, counts, device)
        if logits.shape[1] < K:
            logits = torch.nn.functional.pad(logits, (0, 0, 0, K - logits.shape[1]))
        loss, metrics = obj.traj_loss(logits, ids_NKk.to(device), logp_NKk.to(device), mask_NK.to(device), denom,
                                      cfg.traj)
        if torch.isfinite(loss):
            loss.backward()
        total = total + loss.detach().cpu()
        parts.append((metrics, int(mask_NK.sum())))
    out = _combine(parts)
    out["topd/num_windows"] = float(len(idx))
    return total, out
