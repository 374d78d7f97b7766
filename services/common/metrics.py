"""Traffic accounting for a service: Prometheus series plus the numbers `/status` shows."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class _ClientTotals:
    requests: int = 0
    tokens: int = 0
    latency_s: float = 0.0


class TrafficStats:
    """Per-method and per-client requests, tokens and latency; tokens/s over a sliding window."""

    def __init__(self, registry: CollectorRegistry, window_s: float = 60.0) -> None:
        self.registry = registry
        self.window_s = window_s
        self._requests = Counter("topd_requests", "RPCs served", ["method", "client"], registry=registry)
        self._tokens = Counter("topd_tokens", "Tokens served (scored or generated)", ["method", "client"],
                               registry=registry)
        self._errors = Counter("topd_request_errors", "RPCs that failed", ["method", "code"], registry=registry)
        self._latency = Histogram("topd_request_seconds", "RPC latency", ["method"], registry=registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("topd_queue_depth", "Items waiting in the batcher", registry=registry)
        self._batch_tokens = Histogram("topd_batch_tokens", "Tokens per executed batch", registry=registry,
                                       buckets=(64, 256, 1024, 4096, 16384, 65536, 262144))
        self._lock = threading.Lock()
        self._clients: dict[str, _ClientTotals] = {}
        self._recent: deque[tuple[float, int]] = deque()
        self.total_requests = 0
        self.total_tokens = 0

    def record(self, method: str, client: str, tokens: int, seconds: float) -> None:
        self._requests.labels(method, client).inc()
        self._tokens.labels(method, client).inc(tokens)
        self._latency.labels(method).observe(seconds)
        now = time.monotonic()
        with self._lock:
            c = self._clients.setdefault(client, _ClientTotals())
            c.requests += 1
            c.tokens += tokens
            c.latency_s += seconds
            self.total_requests += 1
            self.total_tokens += tokens
            self._recent.append((now, tokens))
            self._trim(now)

    def record_error(self, method: str, code: str) -> None:
        self._errors.labels(method, code).inc()

    def record_batch(self, tokens: int) -> None:
        self._batch_tokens.observe(tokens)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(t for _, t in self._recent) / self.window_s

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def snapshot(self) -> dict:
        with self._lock:
            clients = {cid: {"requests": c.requests, "tokens": c.tokens,
                             "mean_latency_s": round(c.latency_s / c.requests, 6) if c.requests else 0.0}
                       for cid, c in sorted(self._clients.items())}
            totals = {"requests": self.total_requests, "tokens": self.total_tokens}
        return {**totals, "tokens_per_s_1m": round(self.tokens_per_second(), 3), "clients": clients}
