"""The dynamic batcher on its own (no model): merging, fairness, bounds, deadlines, isolation."""

import threading
import time

import pytest

from services.common.batcher import DynamicBatcher
from topd_client.errors import InvalidInputError, OverloadedError, TooLargeError


class Recorder:
    """run_batch that records its batches; `gate` holds the worker inside its first batch and
    `entered` says it got there (no sleeps: the tests wait on events)."""

    def __init__(self):
        self.batches: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key, payloads):
        self.entered.set()
        self.gate.wait()
        self.batches.append((key, list(payloads)))
        return [(key, p) for p in payloads]


def test_results_come_back_in_order_and_unmixed():
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_tokens=100, max_wait_s=0.02)
    tickets = [b.submit(f"c{i}", "k", [f"c{i}-{j}" for j in range(5)], [1] * 5) for i in range(4)]
    for i, t in enumerate(tickets):
        assert t.results() == [("k", f"c{i}-{j}") for j in range(5)]
    assert len(rec.batches) < 20  # items were merged
    b.close()


def test_round_robin_one_big_client_cannot_starve_a_small_one():
    rec = Recorder()
    rec.gate.clear()  # hold the worker so both requests are queued before batching
    b = DynamicBatcher(rec, max_batch_tokens=4, max_wait_s=0.0)
    big = b.submit("big", "k", [f"b{j}" for j in range(40)], [1] * 40)
    assert rec.entered.wait(5)  # the worker holds big's first batch
    small = b.submit("small", "k", ["s0", "s1"], [1, 1])
    rec.gate.set()
    small.results(), big.results()
    # the small client's items are all in the first two batches after it arrived
    first_with_small = next(i for i, (_, p) in enumerate(rec.batches) if any(x.startswith("s") for x in p))
    done_small = max(i for i, (_, p) in enumerate(rec.batches) if any(x.startswith("s") for x in p))
    assert done_small - first_with_small <= 1
    assert done_small <= 2
    b.close()


def test_contending_clients_get_equal_shares_of_each_batch():
    """Two clients with 20 queued items each and a budget of 4 tokens: every batch takes 2 + 2."""
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_tokens=4, max_wait_s=0.0)
    first = b.submit("warm", "k", ["w"], [1])
    assert rec.entered.wait(5)  # the worker is held, so both requests below are queued before batching
    a = b.submit("a", "k", [f"a{j}" for j in range(20)], [1] * 20)
    c = b.submit("c", "k", [f"c{j}" for j in range(20)], [1] * 20)
    rec.gate.set()
    first.results(), a.results(), c.results()
    shares = [(sum(p.startswith("a") for p in ps), sum(p.startswith("c") for p in ps)) for _, ps in rec.batches[1:]]
    assert shares == [(2, 2)] * 10, shares
    b.close()


def test_token_budget_and_keys_respected():
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_tokens=10, max_wait_s=0.0)
    t1 = b.submit("a", "k1", ["x", "y", "z"], [4, 4, 4])
    t2 = b.submit("b", "k2", ["u"], [1])
    rec.gate.set()
    t1.results(), t2.results()
    for key, payloads in rec.batches:
        # a batch holds one key: every payload came from that key's request
        assert set(payloads) <= ({"x", "y", "z"} if key == "k1" else {"u"})
        if key == "k1":
            assert len(payloads) <= 2  # 3 x 4 tokens > 10
    assert {k for k, _ in rec.batches} == {"k1", "k2"}
    b.close()


def test_bounded_queue_raises_overloaded():
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_tokens=1, max_wait_s=0.0, max_queue_items=5)
    b.submit("a", "k", list(range(5)), [1] * 5)
    assert rec.entered.wait(5)  # one item is running, four wait
    with pytest.raises(OverloadedError, match="queue full"):
        b.submit("b", "k", list(range(2)), [1] * 2)
    b.submit("b", "k", [0], [1])  # exactly full is accepted
    rec.gate.set()
    b.close()


def test_request_larger_than_the_queue_is_too_large_not_overloaded():
    """Overloaded is retried by clients; a request that can never fit must not be."""
    b = DynamicBatcher(Recorder(), max_queue_items=5)
    with pytest.raises(TooLargeError, match="larger than the server's queue"):
        b.submit("a", "k", list(range(6)), [1] * 6)
    assert not isinstance(TooLargeError("x"), OverloadedError)
    b.close()


def test_empty_request_is_invalid():
    b = DynamicBatcher(Recorder())
    with pytest.raises(InvalidInputError, match="empty batch"):
        b.submit("a", "k", [], [])
    b.close()


def test_deadline_expires_and_items_are_dropped():
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_tokens=1, max_wait_s=0.0)
    blocker = b.submit("a", "k", ["first"], [1])
    late = b.submit("b", "k", ["never"], [1], deadline=time.monotonic() + 0.05)
    with pytest.raises(TimeoutError):
        late.results()
    rec.gate.set()
    blocker.results()
    b.submit("c", "k", ["after"], [1]).results()  # the worker has passed the expired item by now
    assert all("never" not in p for _, p in rec.batches)
    b.close()


def test_engine_error_reaches_every_caller_and_batcher_keeps_serving():
    calls = {"n": 0}

    def flaky(key, payloads):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return payloads

    b = DynamicBatcher(flaky, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        b.submit("a", "k", [1], [1]).results()
    assert b.submit("a", "k", [2], [1]).results() == [2]
    b.close()
