"""The near-future detector on one fixed batch, scored against the task's ground truth, without training.

What `topd demo` reports before and after training (report.json, `detector`) and what the benchmarks
measure on a student: the rollout samples a seeded batch of the given prompts, the teacher scores it,
the step's detection runs with the settings' detector (candidates, windows, D, the divergent set),
and the task labels every candidate benign (still completable into a correct answer) or error.
The rollout must serve the student named by `student_model` (its weights give the embedding table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from services.common.model_files import resolve_model
from services.trainer.clients import ServiceClients
from services.trainer.data import encode_prompts
from services.trainer.detect import detect, loss_BT
from services.trainer.diagnostics import batch_diagnostics, detector_scores
from services.trainer.embeddings import student_table, teacher_table
from services.trainer.objective import candidate_positions
from services.trainer.settings import TrainerSettings
from services.trainer.step import StepConfig, score
from services.trainer.task_api import CandidateTruth, candidate_truth, resolve_task
from topd_client.errors import ConfigurationError


@dataclass(frozen=True)
class DetectorProbe:
    """One batch's detection: per-candidate D, loss and ground truth, and the summary metrics."""

    metrics: dict[str, float]
    D_N: np.ndarray = field(repr=False)
    loss_N: np.ndarray = field(repr=False)
    truth: CandidateTruth | None = field(repr=False)  # None when the task cannot label these prompts


def detector_settings(s: TrainerSettings) -> dict[str, Any]:
    """The detector's settings as reported beside its scores."""
    return s.detection.model_dump(mode="json")


def probe_detector(s: TrainerSettings, records: Sequence[dict[str, Any]], *, samples_per_prompt: int = 2,
                   seed: int = 12345) -> DetectorProbe:
    """Detect on `records` x samples_per_prompt responses sampled by the rollout (seeded) and score the
    detector against the task's labels (gt/auc, gt/benign_frac, gt/precision, gt/recall, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = resolve_task(s.task, s.student_model)
    if task is None:
        raise ConfigurationError("probing the detector needs a task with ground truth (setting `task`)")
    path = resolve_model(s.student_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if s.detection.embedding == "student":
        table = student_table(AutoModelForCausalLM.from_pretrained(path))
    elif s.detection.embedding == "teacher":
        table = teacher_table(s.detection.teacher_embedding_model)
    else:
        table = None
    cfg = StepConfig.from_settings(s, len(tokenizer))
    clients = ServiceClients(s.services, token=s.auth_token)
    try:
        clients.connect(tokenizer, path)
        records = list(records)
        ids = encode_prompts(tokenizer, records, s.data.prompt_field, s.data.chat_template)
        samples = clients.sample(records, ids, n=samples_per_prompt, max_tokens=s.sampling.max_new_tokens,
                                 temperature=s.sampling.temperature, seed=seed)
        batch = score(clients, samples, cfg)
        found = detect(batch, clients, table, cfg.detection, 0, seed)
    finally:
        clients.close()
    metrics = batch_diagnostics(loss_BT(batch), batch.mask_BT, found.detection if found is not None else None)
    if found is None:
        return DetectorProbe(metrics, np.zeros(0), np.zeros(0), None)
    det = found.detection
    rows, cols = candidate_positions(det.candidates_BT)
    truth = candidate_truth(task, samples.records, [r.tolist() for r in samples.response_ids], rows.tolist(),
                            cols.tolist(), tokenizer)
    if truth is not None:
        metrics.update(detector_scores(truth.error_N, det.D_N, det.divergent_N, truth.fork_N))
    loss_N = loss_BT(batch)[det.candidates_BT.bool()].double().numpy()
    return DetectorProbe(metrics, det.D_N.numpy(), loss_N, truth)
