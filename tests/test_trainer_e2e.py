"""The trainer against real teacher and rollout subprocesses (tiny local models, hf engines)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from services.trainer.run import train
from services.trainer.settings import load_settings
from tests.procs import free_port, service
from topd_client import RolloutClient, TokenizerMismatchError

REQUIRED_METRICS = {
    "loss", "loss/opd", "loss/traj", "opd/reverse_kl", "opd/rho_mean", "grad_norm", "lr", "tokens_per_s",
    "time/sample", "time/score", "time/train", "time/sync", "time/step", "policy_version", "stale_dropped",
}
DETECTION_METRICS = {"topd/num_candidates", "topd/num_divergent", "topd/false_alarm_frac", "topd/mean_ot",
                     "topd/pearson", "topd/spearman", "time/branch"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("e2e")
    teacher = build_tiny_model(root / "teacher", TinyModelSpec(seed=11))
    student = build_tiny_model(root / "student", TinyModelSpec(seed=12, num_layers=1))
    train_file = root / "train.jsonl"
    with open(train_file, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"question: what is {i} + {i + 3} ?", "answer": str(2 * i + 3)}) + "\n")
    return {"teacher": teacher, "student": student, "train": train_file, "root": root}


@pytest.fixture(scope="module")
def stack(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with service("teacher", models["teacher"], logs, "--engine", "hf") as t, \
            service("rollout", models["student"], logs, "--engine", "hf") as r:
        yield {"teacher": t, "rollout": r}


def _settings(models, stack, out, **kw):
    base = dict(student_model=str(models["student"]), teacher_address=stack["teacher"].address,
                rollout_address=stack["rollout"].address, train_file=str(models["train"]), output_dir=str(out),
                http_port=free_port(), max_steps=3, prompts_per_step=3, samples_per_prompt=2, max_new_tokens=12,
                window=5, max_candidates=16, progress=False, checkpoint_every=0, lr=1e-3)
    base.update(kw)
    return load_settings(None, [], **base)


@pytest.mark.parametrize("objective", ["opd", "opd_suppress", "opd_suppress_control", "topd"])
def test_three_steps_of_each_variant(models, stack, tmp_path, objective):
    from safetensors.torch import load_file

    settings = _settings(models, stack, tmp_path / objective, objective=objective)
    seen_status = []

    def on_step(step, metrics):
        seen_status.append(httpx.get(f"http://127.0.0.1:{settings.http_port}/status", timeout=5).json())

    result = train(settings, on_step=on_step)
    assert result.steps == 3
    # the student's weights changed
    before = load_file(next(models["student"].glob("*.safetensors")))
    after = load_file(next(result.final_model.glob("*.safetensors")))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # rollout serves the version of the last push
    info = RolloutClient(stack["rollout"].address).info()
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert info.policy_version == rows[-1]["policy_version"]
    assert rows[0]["policy_version"] + 2 == rows[-1]["policy_version"]
    # every field is there
    want = REQUIRED_METRICS | (DETECTION_METRICS if objective != "opd" else set())
    for r in rows:
        assert want <= r.keys(), want - r.keys()
    if objective == "topd":
        assert {"topd/traj_kl", "topd/num_windows"} <= rows[-1].keys()
        assert any(r["loss/traj"] > 0 for r in rows)
    # REST status answered during training, with the step and the services' health
    assert [s["step"] for s in seen_status] == [1, 2, 3]
    assert seen_status[-1]["teacher"]["healthy"] and seen_status[-1]["rollout"]["healthy"]
    assert (tmp_path / objective / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("estimator", ["student_topk", "teacher_topk"])
def test_each_opd_estimator_trains_against_the_services(models, stack, tmp_path, estimator):
    """The estimator's teacher call (top-k, or the sampler's top-k ids as candidate ids) is wired."""
    result = train(_settings(models, stack, tmp_path / estimator, objective="topd", max_steps=2,
                             opd_estimator=estimator, estimator_top_k=8))
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["loss/opd"]) and r["opd/reverse_kl"] >= 0  # a binned KL, not a one-sample estimate
        assert 0 < r["opd/teacher_topk_mass"] <= 1 and 0 < r["opd/student_topk_mass"] <= 1


def test_full_estimator_needs_the_whole_vocabulary_from_the_teacher(models, stack, tmp_path):
    from topd_client.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="opd_estimator=full needs 384 ids per position"):
        train(_settings(models, stack, tmp_path / "full", max_steps=1, opd_estimator="full"))


def test_resume_reaches_the_same_loss(models, stack, tmp_path):
    """Uninterrupted 3 steps vs 2 steps + resume: step 3's loss is the same."""
    from tests.procs import service as svc

    losses = {}
    for name, plan in {"straight": [3], "resumed": [2, 3]}.items():
        with svc("rollout", models["student"], tmp_path, "--engine", "hf") as rollout:
            stack_r = {"teacher": stack["teacher"], "rollout": rollout}
            for i, steps in enumerate(plan):
                s = _settings(models, stack_r, tmp_path / name, objective="topd", max_steps=steps,
                              checkpoint_every=2, resume=i > 0, seed=3)
                train(s)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss"] for r in rows}
    assert sorted(losses["resumed"]) == [1, 2, 3]  # the resumed run appended step 3 only
    np.testing.assert_allclose(losses["resumed"][3], losses["straight"][3], rtol=1e-5, atol=1e-6)


def test_refuses_teacher_with_other_tokenizer(models, stack, tmp_path):
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(tmp_path / "other", TinyModelSpec(seed=1, vocab_size=300))
    with service("teacher", other, tmp_path, "--engine", "hf") as t:
        s = _settings(models, {"teacher": t, "rollout": stack["rollout"]}, tmp_path / "run", max_steps=1)
        with pytest.raises(TokenizerMismatchError, match="teacher tokenizer differs") as err:
            train(s)
        assert str(other) in str(err.value) and str(models["student"]) in str(err.value)


def test_nonfinite_loss_skips_the_step(models, stack, tmp_path, monkeypatch):
    from services.trainer.clients import ServiceClients

    real = ServiceClients.score
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.token_logp[0] = out.token_logp[0].copy()
            out.token_logp[0][0] = float("nan")
        return out

    monkeypatch.setattr(ServiceClients, "score", poisoned)
    result = train(_settings(models, stack, tmp_path / "nan", objective="opd", max_steps=3))
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1]
    assert np.isnan(rows[1]["grad_norm"])  # no update was taken at the poisoned step
    assert np.isfinite(rows[2]["grad_norm"])
