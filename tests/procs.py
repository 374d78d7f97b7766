"""Service subprocesses for tests (the implementation lives in services.common.launch)."""

from pathlib import Path

from services.common.launch import Proc, free_port, service, stop, wait_ready  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
