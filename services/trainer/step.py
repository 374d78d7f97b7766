"""One training step, top-down: sample -> score -> branch (near-future test) -> loss -> update.

Network calls go through the SDK clients; the math is services.trainer.objective / ot /
diagnostics. Shape suffixes: B samples, T response tokens, N candidates, K window, V vocab.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from services.trainer import objective as obj
from services.trainer.ot import OTConfig, Windows, one_hot_embedding, ot_distances
from services.trainer.settings import TrainerSettings
from services.trainer.student import gather_token_logprobs, position_logits, unwrap
from topd_client import RolloutClient, TeacherClient


@dataclass
class Rollouts:
    """The step's samples, one entry per (prompt, sample)."""

    prompt_ids: list[Tensor]
    response_ids: list[Tensor]
    sampler_logp: list[Tensor]
    versions: list[int]
    records: list[dict[str, Any]]
    finish: list[str]

    def __len__(self) -> int:
        return len(self.response_ids)

    def padded(self) -> tuple[Tensor, Tensor, Tensor]:
        """tokens_BT, mask_BT (bool), sampler_logp_BT, right-padded to the longest response."""
        T = max((len(r) for r in self.response_ids), default=0)
        tokens = torch.zeros((len(self), T), dtype=torch.long)
        mask = torch.zeros((len(self), T), dtype=torch.bool)
        logp = torch.zeros((len(self), T), dtype=torch.float32)
        for b, (r, lp) in enumerate(zip(self.response_ids, self.sampler_logp)):
            tokens[b, :len(r)], mask[b, :len(r)], logp[b, :len(r)] = r, True, lp
        return tokens, mask, logp

    def keep(self, idx: list[int]) -> "Rollouts":
        return Rollouts(*[[getattr(self, f)[i] for i in idx] for f in
                          ("prompt_ids", "response_ids", "sampler_logp", "versions", "records", "finish")])


@dataclass
class Branches:
    """Near-future windows from each candidate's prefix."""

    prefixes: list[Tensor]
    teacher: list[Any]   # topd_client.Completion
    student: list[Any]


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool = False
    phase_s: dict[str, float] = field(default_factory=dict)


def sample(rollout: RolloutClient, records: list[dict[str, Any]], prompt_ids: list[Tensor], s: TrainerSettings,
           seed: int) -> Rollouts:
    """P prompts x n samples from the student's rollout service (temperature-1 sampler logprobs)."""
    groups = rollout.sample([p.numpy() for p in prompt_ids], max_tokens=s.max_new_tokens, n=s.samples_per_prompt,
                            temperature=s.temperature, seed=seed)
    out = Rollouts([], [], [], [], [], [])
    for rec, p, group in zip(records, prompt_ids, groups):
        for c in group:
            if len(c.tokens) == 0:
                continue
            out.prompt_ids.append(p)
            out.response_ids.append(torch.as_tensor(np.array(c.tokens), dtype=torch.long))
            out.sampler_logp.append(torch.as_tensor(np.array(c.logprobs), dtype=torch.float32))
            out.versions.append(c.policy_version)
            out.records.append(rec)
            out.finish.append(c.finish_reason)
    return out


def drop_stale(r: Rollouts, current_version: int, max_staleness: int) -> tuple[Rollouts, int]:
    keep = [i for i, v in enumerate(r.versions) if current_version - v <= max_staleness]
    return r.keep(keep), len(r) - len(keep)


def score(teacher: TeacherClient, r: Rollouts, T: int, temperature: float) -> Tensor:
    """Teacher logprob of every sampled token, [B, T] (zeros past each response)."""
    seqs = [torch.cat([p, y]).numpy() for p, y in zip(r.prompt_ids, r.response_ids)]
    res = teacher.score(seqs, [len(p) for p in r.prompt_ids], top_k=0, temperature=temperature)
    out = torch.zeros((len(r), T), dtype=torch.float32)
    for b, x in enumerate(res):
        out[b, :len(x.token_logprobs)] = torch.as_tensor(np.array(x.token_logprobs))
    return out


def branch(teacher: TeacherClient, rollout: RolloutClient, r: Rollouts, rows: Tensor, cols: Tensor,
           s: TrainerSettings, seed: int, pool: ThreadPoolExecutor) -> Branches:
    """All windows of the step in one teacher Generate and one rollout Continue, run concurrently."""
    prefixes = [torch.cat([r.prompt_ids[b], r.response_ids[b][:t]]) for b, t in zip(rows.tolist(), cols.tolist())]
    arrays = [p.numpy() for p in prefixes]
    top_k = s.traj_top_k if obj.get_variant(s.objective).uses_traj else 0
    t_fut = pool.submit(teacher.generate, arrays, max_tokens=s.window, temperature=s.window_temperature,
                        seed=seed, top_k=top_k)
    s_fut = pool.submit(rollout.continue_from, arrays, max_tokens=s.window, temperature=s.window_temperature,
                        seed=seed)
    return Branches(prefixes, [g[0] for g in t_fut.result()], [g[0] for g in s_fut.result()])


def _windows(completions: list[Any], K: int) -> Windows:
    ids = torch.zeros((len(completions), K), dtype=torch.long)
    lens = torch.zeros(len(completions), dtype=torch.long)
    for n, c in enumerate(completions):
        toks = torch.as_tensor(np.array(c.tokens[:K]), dtype=torch.long)
        ids[n, :len(toks)], lens[n] = toks, len(toks)
    return Windows(ids, lens)


def divergence(b: Branches, s: TrainerSettings, table_Vd: Tensor | None) -> Tensor:
    """D_N between the teacher's and the student's windows (float64)."""
    tw, sw = _windows(b.teacher, s.window), _windows(b.student, s.window)
    if s.embedding == "one_hot" or table_Vd is None:
        tw, sw, table_Vd = one_hot_embedding(tw, sw)
    return ot_distances(tw, sw, table_Vd, OTConfig(solver=s.ot_solver, eps=s.ot_eps))


def backward_opd(model: torch.nn.Module, r: Rollouts, teacher_BT: Tensor, weights_BT: Tensor, s: TrainerSettings,
                 device: str) -> tuple[Tensor, Tensor]:
    """Accumulate grads of L_OPD in micro-batches (normalised by the whole batch's tokens).

    Returns (loss, logp_new_BT detached) for metrics.
    """
    tokens_BT, mask_BT, sampler_BT = r.padded()
    n_tokens = float(mask_BT.sum())
    cfg = obj.OPDConfig(adv_clip=s.adv_clip, kl_discount=s.kl_discount, advantage_from=s.advantage_from)
    logp_new_BT = torch.zeros_like(sampler_BT)
    total = torch.zeros((), dtype=torch.float32)
    for lo in range(0, len(r), s.micro_batch):
        hi = min(lo + s.micro_batch, len(r))
        idx = list(range(lo, hi))
        seqs = [torch.cat([r.prompt_ids[i], r.response_ids[i]]) for i in idx]
        counts = [len(r.response_ids[i]) for i in idx]
        T = max(counts)
        logits = position_logits(model, seqs, [len(r.prompt_ids[i]) for i in idx], counts, device)
        logp = gather_token_logprobs(logits, tokens_BT[lo:hi, :T].to(device))
        inp = obj.OPDInputs(logp_new_BT=logp, logp_sampler_BT=sampler_BT[lo:hi, :T].to(device),
                            logp_teacher_BT=teacher_BT[lo:hi, :T].to(device), mask_BT=mask_BT[lo:hi, :T].to(device),
                            weights_BT=weights_BT[lo:hi, :T].to(device), num_tokens=n_tokens)
        loss, _ = obj.opd_loss(inp, cfg)
        if torch.isfinite(loss):
            loss.backward()
        total = total + loss.detach().cpu()
        logp_new_BT[lo:hi, :T] = logp.detach().cpu()
    return total, logp_new_BT


def backward_traj(model: torch.nn.Module, b: Branches, divergent_N: Tensor, n_response_tokens: float,
                  s: TrainerSettings, device: str) -> tuple[Tensor, dict[str, float]]:
    """Accumulate grads of lambda * L_traj: the student teacher-forced on the teacher's windows."""
    idx = [n for n in divergent_N.nonzero().flatten().tolist() if len(b.teacher[n].tokens) > 0]
    if not idx:
        return torch.zeros(()), {"topd/traj_kl": 0.0, "topd/traj_loss": 0.0, "topd/num_windows": 0.0}
    cfg = obj.TrajConfig(lam=s.traj_lambda, normalisation=s.traj_normalisation,
                         offset_weights=obj.discounted_offset_weights(s.window, s.traj_offset_discount))
    if s.traj_normalisation == "window_tokens":
        n_response_tokens = None  # type: ignore[assignment]
    total, kl_sum, kl_count = torch.zeros(()), 0.0, 0
    n_window_tokens = sum(min(len(b.teacher[n].tokens), s.window) for n in idx)
    for lo in range(0, len(idx), s.micro_batch):
        chunk = idx[lo:lo + s.micro_batch]
        K = s.window
        ids_NKk = torch.zeros((len(chunk), K, s.traj_top_k), dtype=torch.long)
        logp_NKk = torch.full((len(chunk), K, s.traj_top_k), -1e4, dtype=torch.float32)
        mask_NK = torch.zeros((len(chunk), K), dtype=torch.bool)
        seqs, starts, counts = [], [], []
        for j, n in enumerate(chunk):
            c = b.teacher[n]
            k = min(len(c.tokens), K)
            window = torch.as_tensor(np.array(c.tokens[:k]), dtype=torch.long)
            seqs.append(torch.cat([b.prefixes[n], window]))
            starts.append(len(b.prefixes[n]))
            counts.append(k)
            kk = min(c.topk_ids.shape[1], s.traj_top_k)
            ids_NKk[j, :k, :kk] = torch.as_tensor(np.array(c.topk_ids[:k, :kk]), dtype=torch.long)
            logp_NKk[j, :k, :kk] = torch.as_tensor(np.array(c.topk_logprobs[:k, :kk]))
            mask_NK[j, :k] = True
        logits = position_logits(model, seqs, starts, counts, device)
        Kc = logits.shape[1]
        if Kc < K:
            logits = torch.nn.functional.pad(logits, (0, 0, 0, K - Kc))
        # window_tokens: each chunk's share of the mean over all windows' tokens
        denom = n_response_tokens if n_response_tokens is not None else float(n_window_tokens)
        cfg_chunk = obj.TrajConfig(lam=cfg.lam, normalisation="response_tokens", offset_weights=cfg.offset_weights)
        loss, m = obj.traj_loss(logits, ids_NKk.to(device), logp_NKk.to(device), mask_NK.to(device), denom, cfg_chunk)
        if torch.isfinite(loss):
            loss.backward()
        total = total + loss.detach().cpu()
        kl_sum += m["topd/traj_kl"] * int(mask_NK.sum())
        kl_count += int(mask_NK.sum())
    return total, {"topd/traj_kl": kl_sum / max(kl_count, 1), "topd/traj_loss": float(total) / max(s.traj_lambda, 1e-12),
                   "topd/num_windows": float(len(idx))}


class Timer:
    """Wall time per phase of a step."""

    def __init__(self) -> None:
        self.phase_s: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.phase_s[name] = self.phase_s.get(name, 0.0) + time.perf_counter() - t0


def embedding_table(model: torch.nn.Module, s: TrainerSettings, teacher_table: Tensor | None) -> Tensor | None:
    if s.embedding == "student":
        return unwrap(model).get_input_embeddings().weight.detach().double()
    if s.embedding == "teacher":
        return teacher_table
    return None


def is_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and not math.isnan(float(x))
