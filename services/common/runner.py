"""The lifecycle every service shares: bind gRPC and HTTP first (so health answers while loading),
load, flip readiness, serve until SIGTERM/SIGINT, then drain and stop.

Stopping drains: readiness and gRPC health drop first (load balancers and trainers stop sending),
new work is refused with UNAVAILABLE (clients retry elsewhere or after the restart), calls in flight
get up to `shutdown_grace_s` (30 s by default) to finish, and only then is what is left cancelled.
A second SIGTERM/SIGINT cuts the wait short.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from services.common.grpc_server import GrpcServer, ServerOptions, create_server, set_serving
from services.common.status_app import HttpServer, ServiceState, create_status_app

log = logging.getLogger(__name__)
FAILED_GRACE_S = 5.0  # a service whose engine died drains at most this long: its calls fail anyway


@dataclass
class Endpoints:
    """Where a running service listens (real ports, also when 0 was asked)."""

    host: str
    grpc_port: int
    http_port: int


@dataclass
class ServiceRun:
    """A started service: `.stop()` drains and shuts it down; `.wait()` blocks until a signal,
    `stop()` or `fail()`."""

    endpoints: Endpoints
    state: ServiceState
    grpc: GrpcServer | None
    http: HttpServer
    service_names: list[str] = field(default_factory=list)
    shutdown_grace_s: float = 30.0
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    failure: str | None = None  # why the service gave up (`fail`); the process then exits non-zero
    _stopped: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _hurry: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = None) -> None:
        """Drain (see the module docstring) for up to `grace` seconds (default: shutdown_grace_s), then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake.set()
        grace = self.shutdown_grace_s if grace is None else grace
        if self.failure:
            grace = min(grace, FAILED_GRACE_S)
        self.state.set_ready(False, f"failed: {self.failure}" if self.failure else "stopping")
        if self.grpc is not None:
            set_serving(self.grpc.health, self.service_names, False)
            self.grpc.gate.close()
            self._drain(grace)
            self.grpc.server.stop(0).wait(5)
            self.grpc.gate.shutdown()
        for fn in self.on_stop:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.exception("error while stopping")
        self.http.stop()

    def _drain(self, grace: float) -> None:
        gate = self.grpc.gate
        held = gate.pending()
        if not held:
            return
        log.info("%s: draining %d call(s) in flight (grace %.0f s; new work is refused)", self.state.service,
                 held, grace)
        start = time.monotonic()
        if gate.wait_idle(grace, self._hurry):
            log.info("%s: drained in %.1f s", self.state.service, time.monotonic() - start)
        else:  # INFO: cutting calls at the end of the grace is what the grace means (they get CANCELLED)
            log.info("%s: %d call(s) still running after %.1f s; cancelling them", self.state.service,
                     gate.pending(), time.monotonic() - start)

    def fail(self, reason: str) -> None:
        """Give up after a fatal error (the engine died): not ready and NOT_SERVING at once, and
        `wait()` returns, so the process exits non-zero and its supervisor restarts it."""
        if self.failure is None:
            self.failure = reason
            log.error("%s: %s; exiting so that it is restarted", self.state.service, reason)
        self.state.set_ready(False, f"failed: {reason}")
        if self.grpc is not None:
            set_serving(self.grpc.health, self.service_names, False)
        self._wake.set()

    def wait(self) -> None:
        """Serve until SIGTERM/SIGINT (main thread), `stop()` or `fail()`; then stop. A second
        signal while draining stops at once."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self._wake.wait()
        self.stop()

    def _on_signal(self, signum: int, _frame) -> None:
        if self._wake.is_set():
            log.warning("%s: %s again: stopping now", self.state.service, signal.Signals(signum).name)
            self._hurry.set()
        else:
            log.info("%s: %s: draining, then stopping", self.state.service, signal.Signals(signum).name)
            self._wake.set()


def start_service(state: ServiceState, *, host: str, grpc_port: int | None, http_port: int,
                  add_servicers: Iterable[Callable[[grpc.Server], None]] = (), service_names: Iterable[str] = (),
                  options: ServerOptions = ServerOptions(), http_token: str | None = None,
                  shutdown_grace_s: float = 30.0, load: Callable[[], None] | None = None) -> ServiceRun:
    """Start HTTP (+ gRPC when grpc_port is not None), then run `load()` and mark the service ready.

    `http_token`: when set, REST beyond /healthz and /readyz needs `Authorization: Bearer <token>`.
    A failing `load()` marks the service not ready with the reason, stops it and re-raises: the
    process exits non-zero, so its supervisor restarts it.
    """
    names = list(service_names)
    http = HttpServer(create_status_app(state, token=http_token), host, http_port).start()
    server = None
    if grpc_port is not None:
        server = create_server(add_servicers, names, host=host, port=grpc_port, registry=state.registry,
                               options=options)
        server.server.start()
    run = ServiceRun(Endpoints(host, 0 if server is None else server.port, http.port), state, server, http, names,
                     shutdown_grace_s)
    log.info("%s: http %s:%s%s", state.service, host, http.port, f", grpc {host}:{server.port}" if server else "")
    if load is not None:
        state.set_ready(False, "loading")
        try:
            load()
        except Exception as exc:
            state.set_ready(False, f"load failed: {type(exc).__name__}: {exc}")
            run.stop()
            raise
    state.set_ready(True)
    if server is not None:
        set_serving(server.health, names, True)
    return run
