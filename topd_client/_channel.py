"""What every topd client shares: channel options, metadata, typed errors, retries, health wait."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
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
    """A channel to one service (or a DNS name of many replicas, balanced round robin).

    Retryable failures (UNAVAILABLE: down, restarting, still loading; RESOURCE_EXHAUSTED: queue
    full) are retried with jittered exponential backoff for up to `retry_for_s` seconds in all
    (`retries` caps the count; 0 = no retry), logging "waiting for <kind> at ADDR (down N s)" at a
    steady pace. `down_since` says since when the service has not answered (None while it does);
    `reconnected` counts recoveries, so a caller can re-check what it talks to after one.
    """

    kind = "service"  # what the logs call it: "teacher", "rollout"

    def __init__(self, address: str, *, token: str | None = None, token_file: str | None = None,
                 client_id: str | None = None, timeout: float = 600.0, max_message_mb: int = 256,
                 retry_for_s: float = 30.0, retries: int | None = None, backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0) -> None:
        """`token` (or `token_file`, or env TOPD_AUTH_TOKEN_FILE / TOPD_AUTH_TOKEN): the servers' shared
        auth token. `client_id`: 1-64 characters of letters, digits and ._:@/+- (the server refuses others)."""
        self.address = address
        self.timeout = timeout
        self.retry_for_s = retry_for_s
        self.retries = retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.down_since: float | None = None
        self.reconnected = 0
        self.stop_event: threading.Event | None = None  # set it to end a wait early (UnavailableError)
        # Jitter from a private generator: trainers with one seed must not retry in lockstep.
        self._jitter = random.Random(int.from_bytes(os.urandom(8), "little"))
        limit = max_message_mb << 20
        self.max_message_bytes = limit
        token = resolve_token(token, token_file)
        service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.service_config", service_config), ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
            # reconnect to a restarted service quickly (gRPC's default backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2_000),
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
        """Invoke an RPC; retry UNAVAILABLE / RESOURCE_EXHAUSTED for up to `retry_for_s` (see the class).
        retry=False for a call that cannot simply be sent again (a client stream already consumed)."""
        waiting = _Wait(self)
        while True:
            try:
                out = fn(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if not retry or not retryable(err) or not waiting.another(err):
                    raise to_topd_error(err) from None
                continue
            waiting.done()
            return out

    def _stopping(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (0.5 + self._jitter.random())

    def healthy(self, service: str = "") -> bool:
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 300.0, service: str = "") -> None:
        """Block until the health service says SERVING, or raise UnavailableError after `timeout`."""
        deadline = time.monotonic() + timeout
        waiting = _Wait(self, report_every_s=10.0)
        while not self.healthy(service):
            if time.monotonic() > deadline or self._stopping():
                why = "stopping" if self._stopping() else f"not ready after {timeout:.0f}s"
                raise UnavailableError(f"{self.kind} at {self.address} {why} (is it running and reachable?)")
            waiting.note("not serving yet")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        waiting.done()


class _Wait:
    """One call's retries: backoff, the "waiting for ..." log lines, the client's down/recovered state."""

    def __init__(self, client: BaseClient, report_every_s: float = 10.0) -> None:
        self.client = client
        self.start = time.monotonic()
        self.attempt = 0
        self.report_every_s = report_every_s
        self.last_report = 0.0

    def note(self, why: str) -> None:
        c, now = self.client, time.monotonic()
        if c.down_since is None:
            c.down_since = now
        if now - self.last_report >= self.report_every_s or self.last_report == 0.0:
            log.warning("waiting for %s at %s (down %.0f s): %s", c.kind, c.address, now - c.down_since, why)
            self.last_report = now

    def another(self, err: grpc.RpcError) -> bool:
        """Sleep before the next attempt; False when the window, the count or a stop request ends it."""
        c = self.client
        if c.retries is not None and self.attempt >= c.retries:
            return False
        delay = c._backoff(self.attempt)
        if c._stopping() or time.monotonic() + delay - self.start > c.retry_for_s:
            return False
        self.note(f"{err.code().name}: {err.details()}")
        self.attempt += 1
        if c.stop_event is not None:
            c.stop_event.wait(delay)
        else:
            time.sleep(delay)
        return not c._stopping()

    def done(self) -> None:
        c = self.client
        if c.down_since is not None:
            log.info("%s at %s answers again after %.0f s", c.kind, c.address, time.monotonic() - c.down_since)
            c.down_since = None
            c.reconnected += 1
