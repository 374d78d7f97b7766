"""gRPC server plumbing shared by the services: limits, admission, health, reflection, error mapping.

`create_server` binds (port 0 allowed, as in gRPC's examples) and returns the real port. Domain
errors map to status codes in one place (`grpc_errors`), so servicers stay thin; who may call and
on which thread pool is decided in one interceptor (`call_gate.CallGate`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.call_gate import CallGate, WorkPool
from services.common.engine import EngineDeadError
from services.common.metrics import ANONYMOUS
from topd_client.errors import (ERROR_CLASS_KEY, AuthError, InvalidInputError, OverloadedError,
                                PreconditionError, UnavailableError)

log = logging.getLogger(__name__)

_STATUS_OF = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CancelledError, grpc.StatusCode.CANCELLED),  # the caller cancelled, or shutdown cancelled its call
]
# What callers (or shutdown) cause and the service handles: no ERROR, no traceback.
_QUIET = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class ServerOptions:
    """How a gRPC server is bound and guarded (from the service's settings)."""

    max_message_bytes: int = 256 << 20
    auth_token: str | None = None
    reflection: bool = True
    workers: int = 64           # threads of the work pool
    max_pending: int = 1024     # calls running or waiting for a work thread before RESOURCE_EXHAUSTED
    request_streams: int = 8    # request-streaming calls (weight updates, reflection) open at once


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Message limits well above gRPC's 4 MiB default (big score batches), plus keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients ping every 30 s even between calls (topd_client keeps channels warm); gRPC's server
        # default tolerates one every 5 min and answers more with GOAWAY "too_many_pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def client_id_of(context: grpc.ServicerContext) -> str:
    """The caller's `client-id` metadata (checked by the gate), else "anonymous": never the peer
    address, which is new on every connection and would mint a label per connection."""
    for key, value in context.invocation_metadata() or ():
        if key == "client-id" and value:
            return str(value)
    return ANONYMOUS


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def grpc_errors(method: Callable) -> Callable:
    """Map topd errors raised in a servicer method to gRPC status codes (unary and streaming)."""

    def _abort(servicer: Any, context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, EngineDeadError) and callable(getattr(servicer, "on_engine_dead", None)):
            servicer.on_engine_dead(str(exc))  # the service exits to be restarted; this caller retries
        for cls, code in _STATUS_OF:
            if isinstance(exc, cls):
                context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))  # the SDK's finer type
                if code in _QUIET:
                    log.debug("%s: %s (%s)", method.__qualname__, code.name, exc or type(exc).__name__)
                context.abort(code, str(exc) or code.name.lower())
        log.exception("internal error in %s", method.__qualname__)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except grpc.RpcError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                _abort(self, context, exc)
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(self, context, exc)
    return wrapper


@dataclass
class GrpcServer:
    """A bound, not yet started server with its health servicer and its gate."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    gate: CallGate


def create_server(add_servicers: Iterable[Callable[[grpc.Server], None]], service_names: Iterable[str], *,
                  host: str, port: int, registry: CollectorRegistry, options: ServerOptions) -> GrpcServer:
    """Bind a server with our services, health and (unless turned off) reflection.

    Health starts NOT_SERVING; the service flips it to SERVING once its model is loaded.
    """
    names = list(service_names)
    pool = WorkPool(options.workers)
    gate = CallGate(pool, WorkPool(options.request_streams, "topd-grpc-stream"), max_pending=options.max_pending,
                    registry=registry, auth_token=options.auth_token,
                    control_methods=[f"/{health.SERVICE_NAME}/Check", f"/{health.SERVICE_NAME}/Watch",
                                     *(f"/{name}/GetInfo" for name in names)])
    server = grpc.server(pool, interceptors=[gate], options=channel_options(options.max_message_bytes))
    for add in add_servicers:
        add(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if options.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    return GrpcServer(server, bound, health_servicer, gate)


def set_serving(health_servicer: health.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        health_servicer.set(name, status)
