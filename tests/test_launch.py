"""Service subprocesses as the demo and the benches start them: stopped with their parent, and their CPU
time (vLLM's engine processes included) counted in the demo's and the benches' CPU-second budgets."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.launch import cpu_seconds, stop
from tests.procs import ROOT


def test_cpu_seconds_count_the_grandchildren():
    """A service whose work runs in a child process of its own (vLLM's engine core and workers) is charged
    for it: the grandchild's busy second shows in cpu_seconds([child])."""
    burn = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
            "while time.process_time() - t < 1.0: pass\\ntime.sleep(60)'])\n"
            "print(g.pid, flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        before = cpu_seconds([])
        deadline = time.monotonic() + 30
        while cpu_seconds([child.pid]) - cpu_seconds([]) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cpu_seconds([child.pid]) - cpu_seconds([]) >= 1.0  # the child itself only sleeps
        assert cpu_seconds([]) - before < 1.0  # and this process did not burn it
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()


def test_a_terminated_parent_stops_the_services_it_started(tiny_model, tmp_path):
    """SIGTERM to a process inside `service(...)` (the demo, a bench) stops its services too: no orphans
    holding ports and memory after `kill <demo>`."""
    script = (f"import sys, time\nfrom services.common.launch import service\n"
              f"with service('teacher', {str(tiny_model)!r}, __import__('pathlib').Path({str(tmp_path)!r}), "
              f"'--engine', 'hf') as p:\n    print(p.proc.pid, flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # the service runs
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(60) == 143
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"service {child} outlived its terminated parent")


def _alive(pid: int) -> bool:
    """Running (a zombie left to an init that does not reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_ends_what_the_service_left_behind():
    """A service that exits on SIGTERM while a child of its own runs on (vLLM's engine core when the rollout
    is stopped during vLLM's start): stop() ends the child too, instead of leaving it to init."""
    script = ("import signal, subprocess, sys, time\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import signal, time\\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)'])\n"
              "print(g.pid, flush=True)\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    try:
        assert _alive(grandchild)
        assert stop(proc, timeout=10) == 0  # the service itself exited cleanly on SIGTERM
        assert not _alive(grandchild)  # and its child, which ignores SIGTERM, was killed
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
