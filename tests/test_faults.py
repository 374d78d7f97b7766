"""Chaos suite: real processes on loopback, killed and restarted while a trainer runs.

Every case must end with the trainer at max_steps, exit 0, every step exactly once in
metrics.jsonl, no step on zero samples, and, since the teacher and the rollout (hf engines) are
deterministic and every step's sampling is seeded, the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.common.launch import launch, stop
from tests.procs import ROOT, free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("faults")
    teacher = build_tiny_model(root / "teacher", TinyModelSpec(seed=41))
    student = build_tiny_model(root / "student", TinyModelSpec(seed=42, num_layers=1))
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"question: what is {i} + {2 * i} ?", "answer": str(3 * i)})
                                  + "\n" for i in range(30)))
    return {"teacher": teacher, "student": student, "train": train_file, "root": root}


@pytest.fixture(scope="module")
def teacher(models):
    proc = launch("teacher", models["teacher"], models["root"], "--engine", "hf")
    yield proc
    stop(proc.proc)


def trainer_cmd(models, teacher_address: str, rollout_address: str, out: Path, *extra: str) -> list[str]:
    sets = {"student_model": models["student"], "teacher_address": teacher_address,
            "rollout_address": rollout_address, "train_file": models["train"], "output_dir": out, "http_port": 0,
            "max_steps": MAX_STEPS, "prompts_per_step": 3, "samples_per_prompt": 2, "max_new_tokens": 12,
            "window": 5, "max_candidates": 8, "progress": "false", "checkpoint_every": 2, "lr": "1e-3", "seed": 5,
            "service_timeout": 120, "objective": "topd", "resume": "auto"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "services.cli", "train", *args, *extra]


def start_trainer(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while len(rows(out)) < step:
        assert proc.poll() is None, f"trainer exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    rc = proc.wait(timeout)
    assert rc == 0, log.read_text()[-4000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def check_run(out: Path, reference: dict[str, torch.Tensor]) -> list[dict]:
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))  # every step exactly once
    assert all(r["samples"] > 0 for r in got)  # no step on zero samples
    weights = final_weights(out)
    assert weights.keys() == reference.keys()
    for name, ref in reference.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)
    return got


@pytest.fixture(scope="module")
def reference(models, teacher):
    """The uninterrupted run's final weights."""
    out = models["root"] / "reference"
    rollout = launch("rollout", models["student"], models["root"], "--engine", "hf")
    try:
        log = models["root"] / "reference.log"
        proc = start_trainer(trainer_cmd(models, teacher.address, rollout.address, out), log)
        finish(proc, log)
    finally:
        stop(rollout.proc)
    return final_weights(out)


def test_teacher_killed_and_restarted(models, reference, tmp_path):
    own_teacher = launch("teacher", models["teacher"], tmp_path, "--engine", "hf")
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        proc = start_trainer(trainer_cmd(models, own_teacher.address, rollout.address, out), log)
        wait_for_step(out, 2, proc, log)
        own_teacher.proc.send_signal(signal.SIGKILL)
        own_teacher.proc.wait()
        time.sleep(3)  # the trainer notices the teacher is gone
        own_teacher = launch("teacher", models["teacher"], tmp_path, "--engine", "hf", grpc_port=own_teacher.grpc_port,
                             http_port=own_teacher.http_port)
        finish(proc, log)
        check_run(out, reference)
        assert "waiting for teacher at" in log.read_text()
    finally:
        stop(own_teacher.proc)
        stop(rollout.proc)


def test_rollout_killed_and_restarted(models, teacher, reference, tmp_path):
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        proc = start_trainer(trainer_cmd(models, teacher.address, rollout.address, out), log)
        wait_for_step(out, 2, proc, log)
        rollout.proc.send_signal(signal.SIGKILL)
        rollout.proc.wait()
        time.sleep(2)
        # it comes back at policy version 0 with the original student: the trainer must re-push
        rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf", grpc_port=rollout.grpc_port,
                         http_port=rollout.http_port)
        finish(proc, log)
        got = check_run(out, reference)
        # the restarted rollout served the original student until the trainer pushed its weights again
        # (a restore, or the interrupted push landing on return): samples from it would have changed
        # the run, and check_run found the reference run's exact weights
        assert all(r["sample_version_min"] >= r["policy_version"] - 2 for r in got)
    finally:
        stop(rollout.proc)


def test_trainer_killed_and_resumed(models, teacher, reference, tmp_path):
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        cmd = trainer_cmd(models, teacher.address, rollout.address, out)
        proc = start_trainer(cmd, log)
        wait_for_step(out, 3, proc, log)  # checkpoint at step 2; step 3 is redone after the resume
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finish(start_trainer(cmd, log), log)  # the same command: resume=auto continues the run
        check_run(out, reference)
    finally:
        stop(rollout.proc)


def test_trainer_sigterm_checkpoints_and_exits_0(models, teacher, reference, tmp_path):
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        cmd = trainer_cmd(models, teacher.address, rollout.address, out)
        proc = start_trainer(cmd, log)
        wait_for_step(out, 1, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        stopped_at = len(rows(out))
        assert stopped_at < MAX_STEPS and "stopped after step" in log.read_text()
        manifest = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
                               / "manifest.json").read_text())
        assert manifest["step"] == stopped_at  # the last completed step is checkpointed
        finish(start_trainer(cmd, log), log)
        check_run(out, reference)
    finally:
        stop(rollout.proc)


def test_output_dir_of_another_run_is_refused_and_never_resumed(models, teacher, reference, tmp_path):
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        other = trainer_cmd(models, teacher.address, rollout.address, out, "--set", "seed=9", "--set", "max_steps=2")
        finish(start_trainer(other, log), log)
        ours = trainer_cmd(models, teacher.address, rollout.address, out)
        for extra, message in ((("--set", "resume=false"), "holds run"), ((), "with other settings")):
            res = subprocess.run(ours + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert res.returncode == 2 and f"topd: error: output_dir {out} " in res.stderr, res.stderr[-2000:]
            assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        finish(start_trainer(ours + ["--set", "overwrite=true"], log), log)
        check_run(out, reference)  # a fresh run: nothing of the seed-9 run was loaded
    finally:
        stop(rollout.proc)


def test_settings_and_unwritable_output_fail_in_one_line(models, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run directory's parent should be")
    for extra, message in ((("--set", "lr=-1"), "optim.lr: Input should be greater than 0"),
                           (("--set", f"output_dir={blocker}/run"), f"cannot write {blocker}/run: Not a directory"),
                           (("--set", f"train_file={tmp_path}/missing.jsonl"), "cannot read")):
        cmd = trainer_cmd(models, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", tmp_path / "x", *extra)
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines and lines[-1].startswith("topd: error: "), res.stderr[-2000:]
        assert message in lines[-1] and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_teacher_replaced_by_another_model_stops_the_run_after_a_checkpoint(models, tmp_path):
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(tmp_path / "other-teacher", TinyModelSpec(seed=3, vocab_size=300))
    own_teacher = launch("teacher", models["teacher"], tmp_path, "--engine", "hf")
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out, log = tmp_path / "run", tmp_path / "trainer.log"
        proc = start_trainer(trainer_cmd(models, own_teacher.address, rollout.address, out), log)
        wait_for_step(out, 1, proc, log)
        own_teacher.proc.send_signal(signal.SIGKILL)
        own_teacher.proc.wait()
        own_teacher = launch("teacher", other, tmp_path, "--engine", "hf", grpc_port=own_teacher.grpc_port,
                             http_port=own_teacher.http_port)
        assert proc.wait(300) == 2, log.read_text()[-3000:]
        text = log.read_text()
        assert "topd: error: teacher tokenizer differs from the student's" in text
        done = len(rows(out))
        assert done < MAX_STEPS and "Traceback" not in text
        latest = (out / "checkpoints" / "latest").read_text()
        assert latest == f"step-{done:07d}"  # the last completed step was kept before stopping
    finally:
        stop(own_teacher.proc)
        stop(rollout.proc)


def test_a_second_trainer_cannot_take_over_a_rollout(models, teacher, tmp_path):
    rollout = launch("rollout", models["student"], tmp_path, "--engine", "hf")
    try:
        out_a, log_a = tmp_path / "a", tmp_path / "a.log"
        a = start_trainer(trainer_cmd(models, teacher.address, rollout.address, out_a, "--set", "max_steps=100000"),
                          log_a)  # runs until stopped below
        wait_for_step(out_a, 1, a, log_a)
        cmd_b = trainer_cmd(models, teacher.address, rollout.address, tmp_path / "b", "--set", "client_id=other")
        b = subprocess.run(cmd_b, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2 and "FAILED_PRECONDITION: rollout is owned by 'trainer/" in b.stderr, b.stderr[-2000:]
        done = len(rows(out_a))
        wait_for_step(out_a, done + 1, a, log_a)  # the owner was not disturbed ...
        a.send_signal(signal.SIGTERM)
        assert a.wait(120) == 0, log_a.read_text()[-3000:]  # ... and stops cleanly
        assert [r["step"] for r in rows(out_a)] == list(range(1, len(rows(out_a)) + 1))
    finally:
        stop(rollout.proc)
