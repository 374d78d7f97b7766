"""gRPC server plumbing shared by the services: limits, auth, health, reflection, error mapping.

`create_server` binds (port 0 allowed, as in gRPC's examples) and returns the real port. Domain
errors map to status codes in one place (`grpc_errors`), so servicers stay thin.
"""

from __future__ import annotations

import functools
import hmac
import logging
from concurrent import futures
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.engine import EngineDeadError
from topd_client.errors import (AuthError, InvalidInputError, OverloadedError, PreconditionError,
                                UnavailableError)

log = logging.getLogger(__name__)

_STATUS_OF = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]
OPEN_METHODS_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Message limits well above gRPC's 4 MiB default (big score batches), plus keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def client_id_of(context: grpc.ServicerContext) -> str:
    """The caller's `client-id` metadata, else its peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == "client-id" and value:
            return str(value)[:128]
    return context.peer() or "anonymous"


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock (None when the client set none)."""
    import time

    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def grpc_errors(method: Callable) -> Callable:
    """Map topd errors raised in a servicer method to gRPC status codes (unary and streaming)."""

    def _abort(servicer: Any, context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, EngineDeadError) and callable(getattr(servicer, "on_engine_dead", None)):
            servicer.on_engine_dead(str(exc))  # the service exits to be restarted; this caller retries
        for cls, code in _STATUS_OF:
            if isinstance(exc, cls):
                context.abort(code, str(exc))
        log.exception("internal error in %s", method.__qualname__)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    if _is_generator(method):
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


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


class AuthInterceptor(grpc.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every RPC except health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHODS_PREFIXES):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token (authorization: Bearer <token>)")

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def create_server(add_servicers: Iterable[Callable[[grpc.Server], None]], service_names: Iterable[str], *,
                  host: str, port: int, max_message_bytes: int, auth_token: str | None,
                  max_workers: int = 32) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Bind a server with our services, health and reflection; returns (server, bound port, health).

    Health starts NOT_SERVING; the service flips it to SERVING once its model is loaded.
    """
    interceptors = [AuthInterceptor(auth_token)] if auth_token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="topd-grpc"),
                         interceptors=interceptors, options=channel_options(max_message_bytes))
    for add in add_servicers:
        add(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    return server, bound, health_servicer


def set_serving(health_servicer: health.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        health_servicer.set(name, status)
