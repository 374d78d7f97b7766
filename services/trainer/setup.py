"""Pieces of a run built from the settings: evaluation, the OT embedding table, the ground-truth
probe, the checkpoint manifest."""

from __future__ import annotations

from typing import Any, Callable

import torch

from services.trainer import hooks
from services.trainer.clients import ServiceClients
from services.trainer.data import encode_prompts, eval_records, generic_check
from services.trainer.diagnostics import detector_scores
from services.trainer.embeddings import student_table, teacher_table
from services.trainer.objective import Detection, candidate_positions
from services.trainer.settings import TrainerSettings
from services.trainer.state import TrainState
from services.trainer.step import PhaseTimer, Probe
from services.trainer.task_api import Task, candidate_truth


def evaluation(s: TrainerSettings, task: Task | None, state: TrainState, clients: ServiceClients,
               timer: PhaseTimer) -> hooks.Evaluation:
    """Greedy accuracy on held-out prompts, with the task's checker (else the generic one)."""
    records = eval_records(s.data, task)
    ids = [p.numpy() for p in encode_prompts(state.tokenizer, records, s.data.prompt_field, s.data.chat_template)]

    def on_phase(name: str) -> None:
        timer.current = name

    return hooks.Evaluation(s.data.eval_every, s.max_steps, clients.rollout.continue_from, ids, records,
                            task.check if task is not None else generic_check, state.tokenizer,
                            s.sampling.max_new_tokens, on_phase)


def embedding_table(s: TrainerSettings, state: TrainState) -> Callable[[], torch.Tensor | None]:
    """The OT embedding table each step uses (the student's changes every step, so it is read each time)."""
    if s.detection.embedding == "student":
        return lambda: student_table(state.model)
    if s.detection.embedding == "teacher":
        fixed = teacher_table(s.detection.teacher_embedding_model)
        return lambda: fixed
    return lambda: None


def ground_truth_probe(task: Task, tokenizer: Any) -> Probe:
    """The detector scored against the task's own labels of each candidate (benign or error)."""

    def probe(batch, detection: Detection) -> dict[str, float]:
        rows, cols = candidate_positions(detection.candidates_BT)
        truth = candidate_truth(task, batch.samples.records, [r.tolist() for r in batch.samples.response_ids],
                                rows.tolist(), cols.tolist(), tokenizer)
        return {} if truth is None else detector_scores(truth.error_N, detection.D_N, detection.divergent_N,
                                                        truth.fork_N)

    return probe


def manifest(s: TrainerSettings, run_id: str, clients: ServiceClients, state: TrainState) -> dict[str, Any]:
    """What every checkpoint records besides weights: the run, its settings, the teacher it learnt from."""
    t = clients.teacher_info
    return {"run_id": run_id, "settings": s.model_dump(mode="json", exclude={"auth_token"}),
            "teacher": None if t is None else {"model": t.model, "revision": t.revision,
                                               "tokenizer_fingerprint": t.tokenizer_fingerprint},
            "student_model": state.student_path}
