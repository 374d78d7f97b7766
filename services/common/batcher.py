"""Dynamic batching shared by all clients of a model server.

Requests are split into items (one sequence or prompt each) that wait in per-client queues. A
single worker thread forms each batch by visiting clients round robin, one item at a time, until a
token budget is full, so one client with a huge request cannot starve the others; it waits at most
`max_wait_s` for a batch to fill, and not at all once every recently active client has work queued. Only items with the same key (kind and parameters) are merged.
The queue is bounded: `submit` raises `OverloadedError` (retryable: the queue drains) instead of
growing without bound, and `TooLargeError` for a request larger than the whole queue (it never fits).

The batcher knows nothing about models: `run_batch(key, payloads) -> results` does the work.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from services.common.validation import request_items
from topd_client.errors import InvalidInputError, OverloadedError, UnavailableError

RunBatch = Callable[[Hashable, list[Any]], list[Any]]

# A client that submitted within this many seconds counts as active: the batcher stops waiting for a
# batch to fill once every active client has work queued (a trainer's next request follows its last
# within a step, well under a second).
ACTIVE_CLIENT_WINDOW_S = 1.0


@dataclass
class Ticket:
    """One submitted request: cancel it to drop its items that have not run yet."""

    client_id: str
    futures: list[Future]
    deadline: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        for f in self.futures:
            f.cancel()

    def results(self) -> list[Any]:
        """Wait for every item in order; past the deadline, cancel the rest and raise TimeoutError."""
        return list(self.iter_results())

    def iter_results(self):
        for fut in self.futures:
            timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
            try:
                yield fut.result(timeout=timeout)
            except FutureTimeout:
                self.cancel()
                raise TimeoutError("deadline exceeded while waiting for the batch") from None

    def expired(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now > self.deadline)


@dataclass
class _Item:
    key: Hashable
    payload: Any
    cost: int
    future: Future
    ticket: Ticket
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like (for metrics)."""

    key: Hashable
    items: int
    tokens: int
    clients: dict[str, int]
    seconds: float


class DynamicBatcher:
    """Round-robin, token-budgeted, bounded batching in front of one engine."""

    def __init__(self, run_batch: RunBatch, *, max_batch_tokens: int = 16384, max_wait_s: float = 0.005,
                 max_queue_items: int = 4096, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        if max_batch_tokens <= 0 or max_queue_items <= 0:
            raise ValueError("max_batch_tokens and max_queue_items must be positive")
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self._on_batch = on_batch
        self._queues: OrderedDict[str, deque[_Item]] = OrderedDict()
        self._size = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._last_submit: dict[str, float] = {}
        self._worker = threading.Thread(target=self._loop, name="topd-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Items waiting (not yet running)."""
        return self._size

    def submit(self, client_id: str, key: Hashable, payloads: Sequence[Any], costs: Sequence[int],
               deadline: float | None = None) -> Ticket:
        """Queue one request's items; their futures resolve in payload order."""
        if not payloads:
            raise InvalidInputError("empty batch: the request has no sequences")
        request_items(len(payloads), self.max_queue_items)  # no amount of waiting makes it fit: not retryable
        ticket = Ticket(client_id, [Future() for _ in payloads], deadline)
        with self._cv:
            if self._stopped:
                raise UnavailableError("server is shutting down; retry (another replica, or this one once restarted)")
            if self._size + len(payloads) > self.max_queue_items:
                raise OverloadedError(
                    f"queue full ({self._size} items waiting, limit {self.max_queue_items}); retry with backoff")
            self._last_submit[client_id] = time.monotonic()
            q = self._queues.setdefault(client_id, deque())
            for payload, cost, fut in zip(payloads, costs, ticket.futures):
                q.append(_Item(key, payload, max(int(cost), 1), fut, ticket))
            self._size += len(payloads)
            self._cv.notify()
        return ticket

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._worker.join(timeout)

    # ----------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._size == 0 and not self._stopped:
                    self._cv.wait()
                if self._stopped and self._size == 0:
                    return
                first_seen = min(q[0].enqueued for q in self._queues.values() if q)
                while (not self._stopped and self._pending_tokens() < self.max_batch_tokens
                       and not self._all_active_clients_waiting()):
                    left = first_seen + self.max_wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = self._take_batch()
            if batch:
                self._execute(batch)

    def _all_active_clients_waiting(self) -> bool:
        """No one else is likely to join: every client active in the last ACTIVE_CLIENT_WINDOW_S has items queued.
        A lone trainer then never waits for a batch to fill; several never wait longer than before."""
        now = time.monotonic()
        self._last_submit = {c: t for c, t in self._last_submit.items() if now - t < ACTIVE_CLIENT_WINDOW_S}
        return all(self._queues.get(c) for c in self._last_submit)

    def _pending_tokens(self) -> int:
        return sum(it.cost for q in self._queues.values() for it in q)

    def _take_batch(self) -> list[_Item]:
        """Round robin over clients, one item per visit, same key as the first item taken."""
        now = time.monotonic()
        self._drop_expired(now)
        batch: list[_Item] = []
        tokens, key = 0, None
        progress = True
        while progress:
            progress = False
            for client in list(self._queues):
                q = self._queues[client]
                if not q or (key is not None and q[0].key != key):
                    continue
                item = q[0]
                if batch and tokens + item.cost > self.max_batch_tokens:
                    continue
                q.popleft()
                self._size -= 1
                batch.append(item)
                tokens += item.cost
                key = item.key
                progress = True
                self._queues.move_to_end(client)  # next batch starts with the next client
        for client in [c for c, q in self._queues.items() if not q]:
            del self._queues[client]
        return batch

    def _drop_expired(self, now: float) -> None:
        for q in self._queues.values():
            keep = [it for it in q if not it.ticket.expired(now)]
            dropped = len(q) - len(keep)
            if dropped:
                for it in q:
                    if it.ticket.expired(now):
                        it.future.cancel()
                q.clear()
                q.extend(keep)
                self._size -= dropped

    def _execute(self, batch: list[_Item]) -> None:
        start = time.monotonic()
        live = [it for it in batch if it.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._run_batch(live[0].key, [it.payload for it in live])
            if len(results) != len(live):
                raise RuntimeError(f"engine returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # noqa: BLE001 - delivered to every waiting caller
            for it in live:
                it.future.set_exception(exc)
            return
        for it, res in zip(live, results):
            it.future.set_result(res)
        if self._on_batch is not None:
            clients: dict[str, int] = {}
            for it in live:
                clients[it.ticket.client_id] = clients.get(it.ticket.client_id, 0) + it.cost
            self._on_batch(BatchStats(live[0].key, len(live), sum(it.cost for it in live), clients,
                                      time.monotonic() - start))
