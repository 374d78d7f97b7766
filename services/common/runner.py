"""The lifecycle every service shares: bind gRPC and HTTP first (so health answers while loading),
load, flip readiness, serve until SIGTERM/SIGINT, stop gracefully."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import grpc

from services.common.grpc_server import create_server, set_serving
from services.common.status_app import HttpServer, ServiceState, create_status_app

log = logging.getLogger(__name__)


@dataclass
class Endpoints:
    """Where a running service listens (real ports, also when 0 was asked)."""

    host: str
    grpc_port: int
    http_port: int


@dataclass
class ServiceRun:
    """A started service: `.stop()` shuts it down; `.wait()` blocks until a signal, `stop()` or `fail()`."""

    endpoints: Endpoints
    state: ServiceState
    grpc_server: grpc.Server | None
    http: HttpServer
    health: Any = None  # grpc_health's HealthServicer (None without gRPC)
    service_names: list[str] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    failure: str | None = None  # why the service gave up (`fail`); the process then exits non-zero
    _stopped: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake.set()
        self.state.set_ready(False, f"failed: {self.failure}" if self.failure else "stopping")
        if self.grpc_server is not None:
            self.grpc_server.stop(grace).wait(grace + 1)
        for fn in self.on_stop:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.exception("error while stopping")
        self.http.stop()

    def fail(self, reason: str) -> None:
        """Give up after a fatal error (the engine died): not ready and NOT_SERVING at once, and
        `wait()` returns, so the process exits non-zero and its supervisor restarts it."""
        if self.failure is None:
            self.failure = reason
            log.error("%s: %s; exiting so that it is restarted", self.state.service, reason)
        self.state.set_ready(False, f"failed: {reason}")
        if self.health is not None:
            set_serving(self.health, self.service_names, False)
        self._wake.set()

    def wait(self) -> None:
        """Serve until SIGTERM/SIGINT (main thread), `stop()` or `fail()`; then stop."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._wake.set())
        self._wake.wait()
        self.stop()


def start_service(state: ServiceState, *, host: str, grpc_port: int | None, http_port: int,
                  add_servicers: Iterable[Callable[[grpc.Server], None]] = (), service_names: Iterable[str] = (),
                  max_message_bytes: int = 256 << 20, auth_token: str | None = None,
                  load: Callable[[], None] | None = None) -> ServiceRun:
    """Start HTTP (+ gRPC when grpc_port is not None), then run `load()` and mark the service ready.

    A failing `load()` marks the service not ready with the reason, stops it and re-raises: the
    process exits non-zero, so its supervisor restarts it.
    """
    names = list(service_names)
    http = HttpServer(create_status_app(state), host, http_port).start()
    server, bound, health = (None, 0, None)
    if grpc_port is not None:
        server, bound, health = create_server(add_servicers, names, host=host, port=grpc_port,
                                              max_message_bytes=max_message_bytes, auth_token=auth_token)
        server.start()
    run = ServiceRun(Endpoints(host, bound, http.port), state, server, http, health, names)
    log.info("%s: http %s:%s%s", state.service, host, http.port, f", grpc {host}:{bound}" if server else "")
    if load is not None:
        state.set_ready(False, "loading")
        try:
            load()
        except Exception as exc:
            state.set_ready(False, f"load failed: {type(exc).__name__}: {exc}")
            run.stop()
            raise
    state.set_ready(True)
    if health is not None:
        set_serving(health, names, True)
    return run
