"""What every topd client shares: channel options, metadata, typed errors, retries, health wait."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Callable, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from topd_client.auth import resolve_token
from topd_client.errors import (ERROR_CLASS_KEY, AuthError, InvalidInputError, MalformedTensorError,
                                OverloadedError, PreconditionError, TooLargeError, TopdError, UnavailableError)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
}
_REFINED = {cls.__name__: cls for cls in (TooLargeError, MalformedTensorError)}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _over_message_limit(err: grpc.RpcError) -> bool:
    """gRPC's own RESOURCE_EXHAUSTED for a message over a size limit: the same call fails again."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (err.details() or "")


def retryable(err: grpc.RpcError) -> bool:
    return err.code() in RETRYABLE and not _over_message_limit(err)


def to_topd_error(err: grpc.RpcError) -> Exception:
    """The typed error for a failed call: by status code, refined by the class the server named
    (trailing metadata `topd-error`) when it is a known subclass of that code's error."""
    code = err.code()
    cls = TooLargeError if _over_message_limit(err) else _ERROR_OF.get(code, TopdError)
    named = dict(err.trailing_metadata() or ()).get(ERROR_CLASS_KEY) if hasattr(err, "trailing_metadata") else None
    refined = _REFINED.get(named or "")
    if refined is not None and issubclass(refined, cls):
        cls = refined
    return cls(f"{code.name}: {err.details()}")


class BaseClient:
    """A channel to one service (or a DNS name of many replicas, balanced round robin)."""

    def __init__(self, address: str, *, token: str | None = None, token_file: str | None = None,
                 client_id: str | None = None, timeout: float = 600.0, max_message_mb: int = 256, retries: int = 5,
                 backoff_s: float = 0.2) -> None:
        """`token` (or `token_file`, or env TOPD_AUTH_TOKEN_FILE / TOPD_AUTH_TOKEN): the servers' shared
        auth token. `client_id`: 1-64 characters of letters, digits and ._:@/+- (the server refuses others)."""
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        limit = max_message_mb << 20
        self.max_message_bytes = limit
        token = resolve_token(token, token_file)
        service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.service_config", service_config), ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
        ])
        md = []
        if client_id:
            md.append(("client-id", client_id))
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self.metadata = tuple(md)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, fn: Callable[..., T], request, *, timeout: float | None = None, retry: bool = True) -> T:
        """Invoke a unary RPC; retry UNAVAILABLE / RESOURCE_EXHAUSTED with jittered exponential backoff."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return fn(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if retryable(err) and attempt + 1 < attempts:
                    delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random())
                    log.warning("%s: %s, retry %d/%d in %.2fs", self.address, err.code().name, attempt + 1,
                                attempts - 1, delay)
                    time.sleep(delay)
                    continue
                raise to_topd_error(err) from None
        raise AssertionError("unreachable")

    def stream(self, fn: Callable, request, *, timeout: float | None = None):
        """Iterate a server-streaming RPC, mapping errors (no retry: results may be half-consumed)."""
        try:
            yield from fn(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise to_topd_error(err) from None

    def healthy(self, service: str = "") -> bool:
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 300.0, service: str = "") -> None:
        """Block until the health service says SERVING, or raise UnavailableError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.healthy(service):
            if time.monotonic() > deadline:
                raise UnavailableError(f"{self.address} not ready after {timeout:.0f}s")
            time.sleep(0.2)
