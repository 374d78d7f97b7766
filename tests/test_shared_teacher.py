"""One teacher, three students training at once (issue 6).

A teacher subprocess (hf engine) serves three trainers that run in threads of this process, each
with its own student and its own in-process rollout service. The teacher merges their requests
into shared batches, so a mix-up between clients would hand one trainer another's scores: every
teacher call is checked against an in-process forward of the teacher's weights on that trainer's
own sequences. The teacher's `/status` must list the three client ids and charge each exactly the
tokens it sent. (The batcher's round-robin fairness under contention is tested in test_batcher.py.)
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from services.trainer.clients import ServiceClients
from tests.procs import service

N_TRAINERS = 3
STEPS = 3
TOLERANCE = 1e-4         # |service - in-process| of a teacher logprob


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("shared")
    teacher = build_tiny_model(root / "teacher", TinyModelSpec(seed=21))
    # same vocab_size = same tokenizer; different weights = different samples per trainer
    students = [build_tiny_model(root / f"student{i}", TinyModelSpec(seed=30 + i, num_layers=1))
                for i in range(N_TRAINERS)]
    train_file = root / "train.jsonl"
    with open(train_file, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"question: what is {i} + {2 * i + 1} ?", "answer": str(3 * i + 1)}) + "\n")
    return {"teacher": teacher, "students": students, "train": train_file}


class CheckedScore:
    """Stands in for `ServiceClients.score`: the real call, then the same sequences through an
    in-process copy of the teacher; files the worst |difference| and the tokens sent per client id."""

    def __init__(self, real, reference) -> None:
        self.real, self.reference = real, reference
        self.lock = threading.Lock()
        self.max_diff: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def __call__(self, clients, samples, temperature):
        out = self.real(clients, samples, temperature)
        client = dict(clients.teacher.metadata)["client-id"]
        worst = 0.0
        for got, p, y in zip(out.token_logp, samples.prompt_ids, samples.response_ids):
            assert len(got) == len(y), "one teacher score per response token"
            want_T = self.teacher_logprobs(torch.cat([p, y]), len(p), temperature)
            worst = max(worst, float((torch.tensor(got).double() - want_T).abs().max()))
        with self.lock:
            self.max_diff[client] = max(self.max_diff.get(client, 0.0), worst)
            self.tokens[client] = self.tokens.get(client, 0) + sum(len(y) for y in samples.response_ids)
        return out

    @torch.inference_mode()
    def teacher_logprobs(self, ids_L: torch.Tensor, start: int, temperature: float) -> torch.Tensor:
        """log p_teacher(ids[t] | ids[:t]) for t >= start, float64, one unpadded sequence."""
        with self.lock:
            logits_LV = self.reference(ids_L[None]).logits[0].double()
        logp_LV = torch.log_softmax(logits_LV / temperature, dim=-1)
        return logp_LV[start - 1:-1].gather(-1, ids_L[start:, None]).squeeze(-1)


def train_together(train, runs: list) -> list:
    """train() each settings in its own thread; no trainer starts step 2 before all finished step 1."""
    barrier = threading.Barrier(len(runs))

    def one(settings):
        try:
            return train(settings, on_step=lambda step, _: barrier.wait(timeout=120) if step == 1 else None)
        except BaseException:
            barrier.abort()  # the others stop waiting and fail too
            raise

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(one, s) for s in runs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:  # a trainer's own failure, not the BrokenBarrierError its abort caused in the others
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return [f.result() for f in futures]


def test_three_trainers_share_one_teacher(models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings
    from services.trainer import load_settings, train

    real = ServiceClients.score
    checked = CheckedScore(real, AutoModelForCausalLM.from_pretrained(models["teacher"]).eval())
    monkeypatch.setattr(ServiceClients, "score", lambda self, samples, temperature: checked(self, samples, temperature))
    ids = [f"student-{i}" for i in range(N_TRAINERS)]
    rollouts = []
    try:
        with service("teacher", models["teacher"], tmp_path, "--engine", "hf") as teacher:
            for student in models["students"]:
                rollouts.append(start_rollout(RolloutSettings(model=str(student), engine="hf", grpc_port=0,
                                                              http_port=0)))
            runs = [load_settings(None, [], student_model=str(student), teacher_address=teacher.address,
                                  rollout_address=f"127.0.0.1:{rollout.endpoints.grpc_port}", client_id=cid,
                                  train_file=str(models["train"]), output_dir=str(tmp_path / cid), http_port=0,
                                  objective="opd", max_steps=STEPS, prompts_per_step=3, samples_per_prompt=2,
                                  max_new_tokens=12, progress=False, checkpoint_every=0, seed=i)
                    for i, (cid, student, rollout) in enumerate(zip(ids, models["students"], rollouts))]
            results = train_together(train, runs)
            status = httpx.get(f"{teacher.http}/status", timeout=5).json()
    finally:
        for rollout in rollouts:
            rollout.stop()

    assert [r.steps for r in results] == [STEPS] * N_TRAINERS
    # each trainer's teacher scores are those of its own sequences
    assert sorted(checked.max_diff) == ids
    for cid in ids:
        assert checked.max_diff[cid] < TOLERANCE, (cid, checked.max_diff)
    # the teacher knows the three clients and charged each the tokens it sent
    clients = status["clients"]
    assert sorted(clients) == ids
    for cid in ids:
        assert clients[cid]["requests"] == STEPS
        assert clients[cid]["tokens"] == checked.tokens[cid]
    assert status["tokens"] == sum(checked.tokens.values())
    # and they did run at once (the barrier guarantees it; the metrics must agree)
    spans = []
    for r in results:
        rows = [json.loads(line) for line in r.metrics_file.read_text().splitlines()]
        spans.append((rows[0]["time"] - rows[0]["time/step"], rows[-1]["time"]))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
