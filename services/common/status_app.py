"""The REST status app every service runs beside its gRPC server (FastAPI + uvicorn, same process).

Endpoints: `/healthz` (process alive), `/readyz` (200 only once ready: model loaded, or trainer
connected), `/status` (JSON from the service's provider), `/metrics` (Prometheus), `/docs`.
Handlers read everything from `app.state.service` (no globals).

With a token (auth on, unless the service was started with `--public-status`), everything but
`/healthz` and `/readyz` needs `Authorization: Bearer <token>`: `/status` lists model paths and
client ids, and `/docs` + `/openapi.json` map the API. Probes stay open.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class ServiceState:
    """What the status app shows: readiness, uptime and the service's own status provider."""

    def __init__(self, service: str, registry: CollectorRegistry, status: Callable[[], dict[str, Any]]) -> None:
        self.service = service
        self.registry = registry
        self._status = status
        self.started = time.time()
        self.ready = False
        self.not_ready_reason = "starting"

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.not_ready_reason = reason

    def status(self) -> dict[str, Any]:
        base = {"service": self.service, "ready": self.ready, "uptime_s": round(time.time() - self.started, 3)}
        if not self.ready:
            base["not_ready_reason"] = self.not_ready_reason
        return {**base, **self._status()}


router = APIRouter()


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    """`curl localhost:8001/healthz` -> `{"status": "ok"}`"""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the service can serve, 503 before")
def readyz(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    if state.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "reason": state.not_ready_reason}, status_code=503)


@router.get("/status", summary="Service status as JSON")
def status(request: Request) -> dict[str, Any]:
    """Model, engine, device, uptime, traffic totals and per-client numbers (teacher), policy version
    (rollout), step/phase/metrics (trainer)."""
    return request.app.state.service.status()


@router.get("/metrics", summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.registry), media_type=CONTENT_TYPE_LATEST)


OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def create_status_app(state: ServiceState, token: str | None = None) -> FastAPI:
    """The status app; with `token`, every path but OPEN_PATHS needs `Authorization: Bearer <token>`."""
    app = FastAPI(title=f"topd {state.service}", version="0.1.0")
    app.state.service = state
    app.include_router(router)
    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            got = request.headers.get("authorization", "").encode()
            if request.url.path in OPEN_PATHS or hmac.compare_digest(got, expected):
                return await call_next(request)
            return JSONResponse({"detail": "missing or wrong auth token (Authorization: Bearer <token>)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return app


class HttpServer:
    """uvicorn in a background thread on a pre-bound socket (port 0 works; `.port` is the real one)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="topd-http", daemon=True)

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
