"""`topd top` against live services: a teacher in-process on the tiny model with two trainers' traffic,
a trainer's status app, and an address where nothing listens; a fixed number of refreshes, then what
it printed."""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from services.common.launch import free_port
from services.common.runner import start_service
from services.common.status_app import ServiceState
from topd_client import TeacherClient
from topd_client.cli import main
from topd_client.top import fmt_duration, read_token, run_top, status_url


@pytest.fixture(scope="module")
def teacher(tiny_teacher_run):
    return tiny_teacher_run


TRAINER_STATUS = {
    "step": 3, "max_steps": 10, "phase": "score", "objective": "topd", "eta_s": 70.0,
    "teacher": {"address": "127.0.0.1:50051", "healthy": True},
    "rollout": {"address": "127.0.0.1:50052", "healthy": False, "policy_version": 3},
    "last_metrics": {"loss": 0.25, "opd/reverse_kl": 0.125, "eval/accuracy": 0.5, "time/step": 2.0,
                     "time/sample": 0.5, "time/score": 1.0, "time/train": 0.4, "time/sync": 0.1},
}


@pytest.fixture(scope="module")
def trainer():
    state = ServiceState("trainer", CollectorRegistry(), lambda: TRAINER_STATUS)
    state.set_ready(True)
    run = start_service(state, host="127.0.0.1", grpc_port=None, http_port=0)
    yield run
    run.stop()


def score_until(stop: threading.Event, address: str, client_id: str) -> None:
    rng = np.random.default_rng(0)
    with TeacherClient(address, client_id=client_id, retries=0) as client:
        while not stop.is_set():
            seqs = [rng.integers(0, 384, size=20) for _ in range(4)]
            client.score(seqs, [5] * 4, top_k=0)


def test_top_shows_teacher_clients_trainer_progress_and_dead_services(teacher, trainer):
    grpc_address = f"127.0.0.1:{teacher.endpoints.grpc_port}"
    for client_id in ("student-b", "student-a"):  # both known to the teacher before the first refresh
        with TeacherClient(grpc_address, client_id=client_id, retries=0) as client:
            client.score([np.arange(10, 30)], [5], top_k=0)
    stop = threading.Event()
    busy = threading.Thread(target=score_until, args=(stop, grpc_address, "student-a"), daemon=True)
    busy.start()
    out = io.StringIO()
    console = Console(file=out, width=150, color_system=None, force_terminal=False)
    dead = f"127.0.0.1:{free_port()}"
    try:
        run_top([f"127.0.0.1:{teacher.endpoints.http_port}", f"http://127.0.0.1:{trainer.endpoints.http_port}/",
                 dead], refreshes=3, interval=0.5, console=console)
    finally:
        stop.set()
        busy.join(30)
    text = out.getvalue()
    frames = re.split(r"\n─+\n", text)
    assert len(frames) == 3, text
    last = frames[-1]
    assert "teacher 127.0.0.1:" in last and "ready" in last
    lines = [line.strip("│ ") for line in last.splitlines()]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("student-")}
    assert set(rows) == {"student-a", "student-b"}, last
    assert rows["student-b"][1] == "0"  # silent since the first refresh
    rates = []  # student-a's tokens/s since the previous refresh, in refreshes 2 and 3
    for frame in frames[1:]:
        line = next(line.strip("│ ") for line in frame.splitlines() if "student-a" in line)
        rates.append(float(line.split()[1].replace(",", "")))
    assert max(rates) > 0, rates
    first = [line.strip("│ ") for line in frames[0].splitlines() if "student-a" in line]
    assert first[0].split()[1] == "-"  # no rate before a second read
    assert "step 3/10" in last and "phase score" in last and "ETA 1m10s" in last
    assert "reverse KL 0.125" in last and "accuracy 0.5" in last
    assert "rollout 127.0.0.1:50052 v3" in last and "unhealthy" in last
    assert "sample 0.50s  score 1.00s  train 0.40s  sync 0.10s" in last
    assert f"─ {dead} ─" in last and "cannot reach" in last


def test_topd_top_command(teacher, capsys):
    assert main(["top", f"127.0.0.1:{teacher.endpoints.http_port}", "-n", "1", "--interval", "0"]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "queue 0" in printed


def test_helpers(tmp_path, monkeypatch):
    assert status_url("h:1") == "http://h:1/status" == status_url("http://h:1/status")
    assert [fmt_duration(s) for s in (None, 5, 62, 3725)] == ["-", "5s", "1m02s", "1h02m"]
    monkeypatch.delenv("TOPD_AUTH_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("abc\n")
    monkeypatch.setenv("TOPD_AUTH_TOKEN_FILE", str(token))
    assert read_token(None) == "abc"
    monkeypatch.setenv("TOPD_AUTH_TOKEN", "env")
    assert read_token(None) == "env" and read_token(str(token)) == "abc"
    with pytest.raises(ValueError, match="at least one"):
        run_top([], refreshes=1, interval=0, console=Console(file=io.StringIO()))
