"""Traffic accounting for a service: Prometheus series plus the numbers `/status` shows.

Per-client numbers are bounded: a caller without `client-id` metadata counts as "anonymous" (not
as its `ip:port`, which is new on every connection), and at most `max_clients` ids get their own
label in `/metrics` and their own entry in `/status`. Beyond that, calls count under "other". A
client idle for `idle_evict_s` gives its place up (its series are removed, not folded into
"other": folding would show in `rate()` as a burst that never happened), so trainers that come
and go over days do not fill the table for ever, and a flood of made-up ids cannot evict a
trainer that is working.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ANONYMOUS = "anonymous"
OTHER = "other"


@dataclass
class _ClientTotals:
    requests: int = 0
    tokens: int = 0
    latency_s: float = 0.0
    last_seen: float = 0.0
    methods: set[str] = field(default_factory=set)


class ClientTable:
    """Which clients have their own label: at most `capacity`, least recently seen first to go,
    and only once idle for `idle_evict_s`. Not thread-safe: the caller holds its lock."""

    def __init__(self, capacity: int, idle_evict_s: float = 600.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.idle_evict_s = idle_evict_s
        self.entries: OrderedDict[str, _ClientTotals] = OrderedDict()  # least recently seen first
        self.other = _ClientTotals()

    def entry(self, client: str, now: float) -> tuple[str, _ClientTotals, list[tuple[str, set[str]]]]:
        """(label, totals to add to, evicted (client, methods)) for a call from `client`."""
        evicted: list[tuple[str, set[str]]] = []
        if client not in self.entries and client != OTHER:
            while len(self.entries) >= self.capacity:
                oldest, totals = next(iter(self.entries.items()))
                if now - totals.last_seen < self.idle_evict_s:
                    break
                del self.entries[oldest]
                evicted.append((oldest, totals.methods))
            if len(self.entries) < self.capacity:
                self.entries[client] = _ClientTotals()
        if client in self.entries:
            self.entries.move_to_end(client)
            totals, label = self.entries[client], client
        else:
            totals, label = self.other, OTHER
        totals.last_seen = now
        return label, totals, evicted


class TrafficStats:
    """Per-method and per-client requests, tokens and latency; tokens/s over a sliding window."""

    def __init__(self, registry: CollectorRegistry, window_s: float = 60.0, max_clients: int = 64,
                 idle_evict_s: float = 600.0) -> None:
        self.registry = registry
        self.window_s = window_s
        self._requests = Counter("topd_requests", "RPCs served", ["method", "client"], registry=registry)
        self._tokens = Counter("topd_tokens", "Tokens served (scored or generated)", ["method", "client"],
                               registry=registry)
        self._latency = Histogram("topd_request_seconds", "RPC latency", ["method"], registry=registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("topd_queue_depth", "Items waiting in the batcher", registry=registry)
        self._batch_tokens = Histogram("topd_batch_tokens", "Tokens per executed batch", registry=registry,
                                       buckets=(64, 256, 1024, 4096, 16384, 65536, 262144))
        self._lock = threading.Lock()
        self._clients = ClientTable(max_clients, idle_evict_s)
        self._recent: deque[tuple[float, int]] = deque()
        self.total_requests = 0
        self.total_tokens = 0

    def record(self, method: str, client: str, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            label, c, evicted = self._clients.entry(client, now)
            for gone, methods in evicted:
                for m in methods:
                    self._requests.remove(m, gone)
                    self._tokens.remove(m, gone)
            c.methods.add(method)
            c.requests += 1
            c.tokens += tokens
            c.latency_s += seconds
            self.total_requests += 1
            self.total_tokens += tokens
            self._recent.append((now, tokens))
            self._trim(now)
            self._requests.labels(method, label).inc()  # under the lock: an eviction cannot race it
            self._tokens.labels(method, label).inc(tokens)
        self._latency.labels(method).observe(seconds)

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
            entries = sorted(self._clients.entries.items())
            if self._clients.other.requests:
                entries.append((OTHER, self._clients.other))
            clients = {cid: {"requests": c.requests, "tokens": c.tokens,
                             "mean_latency_s": round(c.latency_s / c.requests, 6) if c.requests else 0.0}
                       for cid, c in entries}
            totals = {"requests": self.total_requests, "tokens": self.total_tokens}
        return {**totals, "tokens_per_s_1m": round(self.tokens_per_second(), 3), "clients": clients}
