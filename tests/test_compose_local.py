"""docker-compose.yml cannot rot: start the default stack's exact commands and environment as local
processes on loopback (ports remapped, volumes as local directories), to the first training step."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.common.launch import free_port, stop, wait_ready
from tests.support.compose_local import LocalRemap, compose_ports, load_services, start_order
from services.common.model_files import data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_stack_reaches_first_training_step(tmp_path):
    compose = ROOT / "docker-compose.yml"
    ports = {p: free_port() for p in compose_ports(compose)}
    (tmp_path / "auth").mkdir()
    (tmp_path / "shm").mkdir()
    remap = LocalRemap(ports=ports, paths={"/data": str(data_dir()), "/checkpoints": str(tmp_path / "ckpt"),
                                           "/run/topd": str(tmp_path / "auth"), "/weights-shm": str(tmp_path / "shm")})
    services = load_services(compose, remap=remap, variables={"TOPD_MAX_STEPS": "3"})
    order = start_order(services)
    assert order[-1] == "trainer" and {"token", "prepare"} <= set(order[:2])
    procs: list[subprocess.Popen] = []
    try:
        for name in start_order(services):
            svc = services[name]
            if svc.argv[0] == "python3":  # the token service's inline script
                argv = [sys.executable, *svc.argv[1:]]
            else:
                assert svc.argv[0] == "topd"
                argv = [sys.executable, "-m", "services.cli", *svc.argv[1:]]
            log = tmp_path / f"{name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(argv, env={**os.environ, **svc.env}, stdout=out, stderr=subprocess.STDOUT)
            if svc.one_shot:
                assert proc.wait(900) == 0, log.read_text()[-3000:]
                continue
            procs.append(proc)
            wait_ready(svc.ready_url, proc, log, timeout=600)
        status_url = services["trainer"].ready_url.replace("/readyz", "/status")
        token = (tmp_path / "auth" / "token").read_text().strip()  # the token service generated it
        assert httpx.get(status_url, timeout=5).status_code == 401  # /status is not open to anyone
        deadline = time.monotonic() + 600
        status = {}
        while time.monotonic() < deadline:
            status = httpx.get(status_url, timeout=5, headers={"Authorization": f"Bearer {token}"}).json()
            if status.get("step", 0) >= 1:
                break
            assert procs[-1].poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(1)
        assert status.get("step", 0) >= 1, status
        assert status["teacher"]["healthy"] and status["rollout"]["healthy"]
    finally:
        for proc in reversed(procs):
            stop(proc)
