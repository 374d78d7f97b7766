"""Admission of every gRPC call: who may call, which thread pool serves it, how many may wait.

Why several pools. grpcio's sync server runs each call on a pool thread for the call's whole life:
a Score waiting for its batch, a stream waiting for its client's next chunk. With one pool, 48 heavy
Scores left gRPC health and GetInfo queued behind them for seconds. The options were:

- grpc.aio (calls as coroutines, none holds a thread): the cleanest in theory, but every servicer,
  the weight-update stream and the auth interceptor would change programming model, and a sync
  handler run under aio never sees its client cancel (`add_callback` fires only after it returns),
  so the batcher would compute the items of every cancelled call;
- one bound on heavy calls, refusing beyond it: refuses work that would have queued fine;
- what this module does: **control calls** (health Check and Watch, GetInfo: answered from memory)
  run on a small pool of their own that nothing else reaches (grpcio's per-handler
  `experimental_thread_pool`, the hook grpc_health itself uses). **Request streams** (weight
  updates, reflection), which wait on their client between messages, run on a small pool of their
  own and are refused once it is busy, so silent streams cannot take the threads Score and Sample
  need. Every other call runs on the **work pool**, whose queue is bounded: past `max_pending`
  calls running or waiting for a thread, a call is refused at once with RESOURCE_EXHAUSTED
  (retryable: the pool drains) instead of waiting without bound.

Decided on gRPC's polling thread, in order, before a pool is involved: auth (UNAUTHENTICATED; only
health is open), the `client-id` metadata (INVALID_ARGUMENT: 1-64 characters of
[A-Za-z0-9._:@/+-]; refused rather than rewritten, so two callers never merge silently), shutting
down (UNAVAILABLE), busy (RESOURCE_EXHAUSTED). A refused call is answered without reading its
request (a refused 200 MiB Score costs nothing). Request bytes that do not parse get
INVALID_ARGUMENT (grpcio answers INTERNAL "Exception deserializing request!" and logs an ERROR).
Every failed call is counted in `topd_request_errors_total{method, code}`, here, in one place.

Not covered: a raw HTTP/2 client that opens calls and never sends their request message holds a
thread per call until it cancels (grpcio reads the message on the pool thread); keep such clients
out with auth (refusals do not wait for the message) or a proxy.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from topd_client.errors import InvalidInputError

HEALTH_PREFIX = "/grpc.health.v1.Health/"
CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+\-]{1,64}")
StatusCode = grpc.StatusCode


class MalformedRequestError(InvalidInputError):
    """Request bytes that are not the method's message."""


class _Malformed:
    """What a request that failed to parse is delivered as (grpcio would abort with INTERNAL)."""

    def __init__(self, error: str) -> None:
        self.error = error


class WorkPool(futures.ThreadPoolExecutor):
    """A thread pool that knows how many calls it holds, running or queued."""

    def __init__(self, max_workers: int, name: str = "topd-grpc") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=name)
        self.max_workers = max_workers
        self._cv = threading.Condition()
        self.pending = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        with self._cv:
            self.pending += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: futures.Future) -> None:
        with self._cv:
            self.pending -= 1
            self._cv.notify_all()

    def wait_idle(self, timeout: float, interrupt: threading.Event | None = None) -> bool:
        """Block until no call is held (True), `timeout` passes or `interrupt` is set (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0 or (interrupt is not None and interrupt.is_set()):
                    return False
                self._cv.wait(min(left, 0.1))
        return True


class CallGate(grpc.ServerInterceptor):
    """The server's only interceptor (see the module docstring for what it decides and why)."""

    def __init__(self, work: WorkPool, streams: WorkPool, *, max_pending: int, control_methods: Iterable[str],
                 registry: CollectorRegistry, auth_token: str | None = None, control_workers: int = 4) -> None:
        self.work, self.streams = work, streams
        self.max_pending = max_pending
        self.control_methods = frozenset(control_methods)
        self.control_pool = futures.ThreadPoolExecutor(control_workers, thread_name_prefix="topd-grpc-control")
        self._expected = None if auth_token is None else f"Bearer {auth_token}".encode()
        self.closing = False
        self._errors = Counter("topd_request_errors", "RPCs that failed, by method and status code",
                               ["method", "code"], registry=registry)
        Gauge("topd_rpcs_in_flight", "Calls running or waiting for a worker thread (control calls excluded)",
              registry=registry).set_function(self.pending)

    def pending(self) -> int:
        return self.work.pending + self.streams.pending

    def close(self) -> None:
        """Refuse new work from now on (UNAVAILABLE); control calls still answer."""
        self.closing = True

    def wait_idle(self, timeout: float, interrupt: threading.Event | None = None) -> bool:
        """Block until no call is held (True), `timeout` passes or `interrupt` is set (False)."""
        deadline = time.monotonic() + timeout
        return all(pool.wait_idle(max(deadline - time.monotonic(), 0.0), interrupt)
                   for pool in (self.work, self.streams))

    def shutdown(self) -> None:
        self.control_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ deciding
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpcio answers UNIMPLEMENTED (and no label is minted)
            return None
        method = handler_call_details.method or ""
        if method in self.control_methods:
            pool: futures.ThreadPoolExecutor = self.control_pool
        else:
            pool = self.streams if handler.request_streaming else self.work
        refusal = self._refusal(method, pool, dict(handler_call_details.invocation_metadata or ()))
        if refusal is not None:
            return self._refused(handler, method, *refusal)
        return self._wrap(handler, method, pool)

    def _refusal(self, method: str, pool: futures.ThreadPoolExecutor,
                 metadata: dict) -> tuple[StatusCode, str] | None:
        if self._expected is not None and not method.startswith(HEALTH_PREFIX):
            if not hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected):
                return StatusCode.UNAUTHENTICATED, "missing or wrong auth token (authorization: Bearer <token>)"
        client = metadata.get("client-id")
        if client is not None and not CLIENT_ID.fullmatch(str(client)):
            return (StatusCode.INVALID_ARGUMENT, f"client-id {str(client)[:80]!r} must be 1-64 characters of "
                                                 "letters, digits and ._:@/+-")
        if pool is self.control_pool:
            return None
        if self.closing:
            return StatusCode.UNAVAILABLE, "server is shutting down; retry (another replica, or this one once restarted)"
        if pool is self.streams and self.streams.pending >= self.streams.max_workers:
            return (StatusCode.RESOURCE_EXHAUSTED, f"server busy: {self.streams.pending} request streams open (limit "
                                                   f"{self.streams.max_workers}, --max-request-streams); retry later")
        if pool is self.work and self.work.pending >= self.max_pending:
            return (StatusCode.RESOURCE_EXHAUSTED, f"server busy: {self.work.pending} calls running or waiting "
                                                   f"(limit {self.max_pending}, --max-pending-rpcs); retry with backoff")
        return None

    def _refused(self, handler: grpc.RpcMethodHandler, method: str, code: StatusCode,
                 details: str) -> grpc.RpcMethodHandler:
        """A handler that answers `code` without reading the request: declared request-streaming, its
        request is never received (nor parsed), whatever the method's real shape."""
        def refuse(requests, context):
            context.abort(code, details)

        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
        refusal = make(refuse, response_serializer=handler.response_serializer)
        return self._wrap(refusal, method, self.control_pool)

    # ------------------------------------------------------------------ running
    def _wrap(self, handler: grpc.RpcMethodHandler, method: str,
              thread_pool: futures.ThreadPoolExecutor) -> grpc.RpcMethodHandler:
        """The same handler with request parsing that cannot fail, error counting and its pool."""
        kind = _KIND[(handler.request_streaming, handler.response_streaming)]
        inner = getattr(handler, kind)
        name = method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            def run(request, context, *rest):
                return self._stream(inner, name, _checked(request, handler.request_streaming), context, rest)
        else:
            def run(request, context, *rest):
                return self._unary(inner, name, _checked(request, handler.request_streaming), context, rest)
        run.experimental_non_blocking = getattr(inner, "experimental_non_blocking", False)
        run.experimental_thread_pool = thread_pool
        return handler._replace(**{kind: run, "request_deserializer": _safe(handler.request_deserializer)})

    def _unary(self, behavior: Callable, name: str, request: Any, context, rest: tuple) -> Any:
        failed = True
        try:
            _abort_if_malformed(request, context)
            response = behavior(request, context, *rest)
            failed = False
            return response
        except MalformedRequestError as exc:
            context.abort(StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self._count(name, context, failed)

    def _stream(self, behavior: Callable, name: str, request: Any, context, rest: tuple) -> Iterator | None:
        try:
            _abort_if_malformed(request, context)
            responses = behavior(request, context, *rest)
        except BaseException:
            self._count(name, context, failed=True)
            raise
        if responses is None:  # a non-blocking handler (health Watch) answers through its callback
            return None
        return self._counted(responses, name, context)

    def _counted(self, responses: Iterator, name: str, context) -> Iterator:
        failed = True
        try:
            yield from responses
            failed = False
        except MalformedRequestError as exc:
            context.abort(StatusCode.INVALID_ARGUMENT, str(exc))
        except GeneratorExit:  # grpcio dropped the stream: the client cancelled or the deadline passed
            context.set_code(context.code() or StatusCode.CANCELLED)
            raise
        finally:
            self._count(name, context, failed)

    def _count(self, name: str, context, failed: bool) -> None:
        code = context.code() or (StatusCode.UNKNOWN if failed else StatusCode.OK)
        if code != StatusCode.OK:
            self._errors.labels(name, code.name).inc()


_KIND = {(False, False): "unary_unary", (False, True): "unary_stream",
         (True, False): "stream_unary", (True, True): "stream_stream"}


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bytes
            return _Malformed(f"{type(exc).__name__}: {exc}")
    return parse


def _checked(request: Any, streaming: bool) -> Any:
    return _checked_iter(request) if streaming else request


def _checked_iter(requests: Iterator) -> Iterator:
    for message in requests:
        if isinstance(message, _Malformed):
            raise MalformedRequestError(f"request message does not parse ({message.error})")
        yield message


def _abort_if_malformed(request: Any, context) -> None:
    if isinstance(request, _Malformed):
        context.abort(StatusCode.INVALID_ARGUMENT, f"request does not parse as this method's message ({request.error})")
