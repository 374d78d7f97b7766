"""Start topd services as real subprocesses on free loopback ports, and stop them cleanly.

Used by `topd demo`, the benchmarks and the tests: a service in its own process is what runs in
production (and keeps vLLM, which pins threads and seeds the global RNG, out of the caller).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Endpoint:
    """A service's two loopback ports: gRPC and REST."""

    grpc_port: int
    http_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass
class Proc(Endpoint):
    """A service subprocess, its ports and its log."""

    proc: subprocess.Popen
    log: Path


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pids: list[int]) -> list[int]:
    """Every live process below the given ones (Linux /proc; [] elsewhere): vLLM runs its engine core and
    workers as child processes of the service, and their CPU time is the service's."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            children.setdefault(int(_proc_stat(int(entry.name))[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process, the given ones and their descendants
    (Linux /proc; 0 for each elsewhere or once gone). On idle cores a pipeline whose phases run one after
    another takes at most this much wall-clock time; single-threaded processes make it a load-independent
    budget (the benches run so), multi-threaded ones waiting for a busy core inflate it."""
    total = time.process_time()
    for pid in {*pids, *descendants(pids)}:
        try:
            fields = _proc_stat(pid)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM, SIGKILL after `timeout`; then the same for what the service left behind: vLLM's engine core
    outlives a rollout terminated while vLLM was starting, holding its memory."""
    left = descendants([proc.pid]) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _end(left, timeout=5.0)
    return proc.returncode


def _alive(pid: int) -> bool:
    try:
        return _proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _end(pids: list[int], timeout: float) -> None:
    """SIGTERM the live ones, SIGKILL those still there after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [pid for pid in pids if _alive(pid)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = [pid for pid in live if _alive(pid)]
        if not live:
            return


def launch(kind: str, model: str | Path, logs: Path, *args: str, grpc_port: int | None = None,
           http_port: int | None = None, env: dict | None = None, wait: bool = True) -> Proc:
    """Start `topd <kind> --model M --grpc-port P --http-port H ...` (free ports unless given: a
    service restarted on its old ports is the same address to its clients); wait until it is ready."""
    grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
    log = logs / f"{kind}-{grpc_port}.log"
    cmd = [sys.executable, "-m", "services.cli", kind, "--model", str(model), "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), *args]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if wait:
        try:
            wait_ready(f"http://127.0.0.1:{http_port}/readyz", proc, log)
        except BaseException:
            stop(proc)
            raise
    return Proc(grpc_port, http_port, proc, log)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in this process (main thread, default handler only), so the
    `finally` blocks that stop its services run: a terminated demo or bench leaves no orphan services."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def _exit(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, _exit)


@contextmanager
def service(kind: str, model: str | Path, tmp: Path, *args: str, env: dict | None = None):
    """`launch(...)` until the block ends, SIGTERM of this process included (exit_on_sigterm)."""
    exit_on_sigterm()
    proc = launch(kind, model, tmp, *args, env=env)
    try:
        yield proc
    finally:
        stop(proc.proc)
