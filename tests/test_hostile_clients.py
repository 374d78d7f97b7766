"""Services that survive their clients (issue 11): one test per case, real servers on loopback.

In-process servers on port 0 (as tests/test_teacher_service.py) unless a signal or the command line
is involved; the cases the issue names for both engines run on vLLM too (`-m vllm`). The only timing
bounds are behaviour bounds ("answers within 1 s while 48 heavy Scores run", where it used to time
out at 5 s).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.rollout.service import start_rollout
from services.rollout.settings import RolloutSettings
from services.teacher.service import start_teacher
from services.teacher.settings import TeacherSettings
from tests.procs import free_port, service, stop, wait_ready
from topd_client import InvalidInputError, RolloutClient, TeacherClient, UnavailableError
from topd_client.errors import MalformedTensorError, TooLargeError
from topd_client.limits import MAX_TEMPERATURE, MIN_TEMPERATURE
from topd_client.tensors import from_wire, to_wire
from topd_client.wire.topd.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def teacher(tiny_model, **settings):
    run = start_teacher(TeacherSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf",
                                        **{"max_top_k": 8, **settings}))
    try:
        yield run
    finally:
        run.stop(grace=0)


@pytest.fixture(scope="module")
def shared(tiny_model):
    with teacher(tiny_model, max_seq_len=256) as run:
        yield run


def _addr(run) -> str:
    return f"127.0.0.1:{run.endpoints.grpc_port}"


def _http(run) -> str:
    return f"http://127.0.0.1:{run.endpoints.http_port}"


def _seq_pb(ids, start=1) -> teacher_pb2.ScoreSequence:
    return teacher_pb2.ScoreSequence(tokens=to_wire(np.asarray(ids), "int32"), response_start=start)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in a Prometheus text page."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0])), float(line.rsplit(" ", 1)[1])))
    return out


def _metric(run, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    for got, value in _samples(httpx.get(f"{_http(run)}/metrics").text, name):
        if all(got.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def _health(addr: str, timeout: float = 1.0) -> int:
    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


# --------------------------------------------------------------------- 1. no starvation
def test_health_and_getinfo_answer_while_48_heavy_scores_run(tiny_model):
    """48 concurrent heavy Scores held every thread of the one pool: health timed out at 5 s."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 384, 128) for _ in range(24)]
    with teacher(tiny_model) as run:
        addr, done, errors = _addr(run), [], []

        def heavy(i: int) -> None:
            try:
                with TeacherClient(addr, client_id=f"heavy-{i}", retries=0) as c:
                    done.append(len(c.score(seqs, [64] * 24, top_k=8, stream=False)))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=heavy, args=(i,)) for i in range(48)]
        [t.start() for t in threads]
        time.sleep(1.0)  # all sent; ~12 s of forwards queued on this machine
        with TeacherClient(addr, retries=0) as c:
            for _ in range(5):
                assert _health(addr, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
                assert c.call(c._stub.GetInfo, common_pb2.InfoRequest(), timeout=1.0, retry=False).vocab_size == 384
        finished_while_probing = len(done)
        [t.join(300) for t in threads]
    assert finished_while_probing < 40, "the heavy Scores were not in flight while health was probed"
    assert not errors and done == [24] * 48


def test_stalled_streams_cannot_take_the_threads_of_health_or_work(tiny_model):
    """Streams that never send held a thread each of the one pool (40 of them: health, GetInfo and
    Continue all DEADLINE_EXCEEDED). Now they have a small pool of their own and are refused once it
    is full; health, GetInfo and Score keep answering."""
    with teacher(tiny_model, reflection="on", max_request_streams=4) as run:
        addr, release = _addr(run), threading.Event()
        channel = grpc.insecure_channel(addr)

        def silent():
            release.wait()
            return
            yield  # unreachable: a generator (request iterator) that sends nothing until released

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        stalled = [stub.ServerReflectionInfo(silent()) for _ in range(40)]
        try:
            deadline = time.monotonic() + 30
            while sum(call.done() for call in stalled) < 36 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [(call.code(), "request streams open" in call.details()) for call in stalled if call.done()]
            assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, True)] * 36
            assert _health(addr) == health_pb2.HealthCheckResponse.SERVING
            with TeacherClient(addr, retries=0) as c:
                assert c.call(c._stub.GetInfo, common_pb2.InfoRequest(), timeout=1.0, retry=False).vocab_size == 384
                assert c.score([[1, 2, 3]], [1], timeout=10)[0].token_logprobs.shape == (2,)
        finally:
            release.set()
            [call.cancel() for call in stalled]
            channel.close()


def test_work_beyond_max_pending_rpcs_is_refused_at_once(tiny_model):
    """Calls past the bound are refused (RESOURCE_EXHAUSTED, retryable) instead of queueing without end."""
    rng = np.random.default_rng(5)
    big = teacher_pb2.ScoreRequest(sequences=[_seq_pb(rng.integers(0, 384, 256)) for _ in range(48)])
    with teacher(tiny_model, grpc_workers=2, max_pending_rpcs=3) as run, grpc.insecure_channel(_addr(run)) as ch:
        stub = teacher_pb2_grpc.TeacherStub(ch)
        calls = [stub.Score.future(big, timeout=120) for _ in range(6)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                assert "server busy" in err.details()
        assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3,
                                                key=str)
        assert _health(_addr(run)) == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------- 2. client ids
def test_anonymous_and_random_client_ids_do_not_grow_metrics_or_status(tiny_model):
    """Labels came from `ipv4:127.0.0.1:PORT`: +3.25 /metrics lines and +61 /status bytes per connection."""
    with teacher(tiny_model, max_clients=4) as run:
        addr = _addr(run)

        def score_once(client_id=None):
            with TeacherClient(addr, client_id=client_id, retries=0) as c:
                c.score([[1, 2, 3]], [1])

        score_once()
        lines = len(httpx.get(f"{_http(run)}/metrics").text.splitlines())
        for _ in range(500):
            score_once()
        assert len(httpx.get(f"{_http(run)}/metrics").text.splitlines()) == lines
        status = httpx.get(f"{_http(run)}/status").json()
        assert list(status["clients"]) == ["anonymous"] and status["clients"]["anonymous"]["requests"] == 501

        rng = np.random.default_rng(1)
        for _ in range(60):
            score_once("c-" + "".join(rng.choice(list("abcdef0123456789"), 12)))
        clients = httpx.get(f"{_http(run)}/status").json()["clients"]
        assert len(clients) == 5 and clients["other"]["requests"] == 60 - 3  # 4 labels (1 anonymous) + other
        series = {m for m in re.findall(r'topd_requests_total\{client="([^"]*)"', httpx.get(f"{_http(run)}/metrics").text)}
        assert series == set(clients)

        for bad in ["x" * 65, "has space", "<b>html</b>", "quote\"d"]:
            with pytest.raises(InvalidInputError, match="client-id"):
                with grpc.insecure_channel(addr) as ch:
                    try:
                        teacher_pb2_grpc.TeacherStub(ch).Score(teacher_pb2.ScoreRequest(sequences=[_seq_pb([1, 2])]),
                                                               metadata=(("client-id", bad),), timeout=5)
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                        raise InvalidInputError(err.details()) from None


def test_client_table_gives_idle_labels_up_but_never_working_ones():
    from services.common.metrics import OTHER, ClientTable

    table = ClientTable(capacity=2, idle_evict_s=600)
    assert table.entry("a", now=0)[0] == "a" and table.entry("b", now=10)[0] == "b"
    assert table.entry("flood-1", now=20)[0] == OTHER  # a and b are working: nobody is evicted
    label, _, evicted = table.entry("c", now=605)  # a idle for 605 s gives its place up, b (595 s) keeps it
    assert label == "c" and [gone for gone, _ in evicted] == ["a"] and list(table.entries) == ["b", "c"]

    from prometheus_client import CollectorRegistry, generate_latest

    from services.common.metrics import TrafficStats

    stats = TrafficStats(CollectorRegistry(), max_clients=1, idle_evict_s=0.0)
    stats.record("Score", "a", 3, 0.1)
    stats.record("Score", "b", 3, 0.1)  # a is idle (0 s is enough here): its series go, b's come
    text = generate_latest(stats.registry).decode()
    assert 'client="a"' not in text and 'client="b"' in text and list(stats.snapshot()["clients"]) == ["b"]


# --------------------------------------------------------------------- 3. larger than the queue
def test_score_larger_than_the_queue_is_invalid_argument_and_not_retried(tiny_model):
    """Was RESOURCE_EXHAUSTED "queue full (0 items waiting)", retried 5 times by the SDK."""
    with teacher(tiny_model, max_queue_items=4) as run:
        with TeacherClient(_addr(run), retries=5) as c:
            with pytest.raises(TooLargeError, match="larger than the server's queue .4 items"):
                c.score([[1, 2, 3]] * 5, [1] * 5)
            assert len(c.score([[1, 2, 3]] * 4, [1] * 4)) == 4
            assert c.info().max_request_items == 4
        assert _metric(run, "topd_request_errors_total", method="Score", code="INVALID_ARGUMENT") == 1  # once


# --------------------------------------------------------------------- 4. response over the message limit
def test_unary_score_over_the_message_limit_is_refused_before_compute_and_the_sdk_streams(tiny_model):
    """Was RESOURCE_EXHAUSTED after the whole forward (29.5 s there), redone by the SDK's retries."""
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 384, 200) for _ in range(20)]  # 20 x 199 rows x (4 + 8 * 8) bytes > 256 KiB
    with teacher(tiny_model, max_message_mb=1) as run:
        request = teacher_pb2.ScoreRequest(sequences=[_seq_pb(s) for s in seqs * 4], top_k=8)  # ~1.1 MiB
        batches = _metric(run, "topd_batch_tokens_count")
        with grpc.insecure_channel(_addr(run)) as ch:
            with pytest.raises(grpc.RpcError) as err:
                teacher_pb2_grpc.TeacherStub(ch).Score(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ScoreStream" in err.value.details()
        assert _metric(run, "topd_batch_tokens_count") == batches  # refused before any forward
        with TeacherClient(_addr(run), max_message_mb=1, retries=0) as c:
            unary = c.score(seqs * 4, [1] * 80, top_k=8, stream=False)  # switches to ScoreStream by itself
            streamed = c.score(seqs * 4, [1] * 80, top_k=8, stream=True)
        assert len(unary) == 80 and all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(unary, streamed))


# --------------------------------------------------------------------- 5. identical validation, both engines
ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_limits_are_validated_alike_and_advertised(engine, tiny_model, tmp_path):
    """vLLM answered INTERNAL to a Score of exactly max_seq_len tokens and to Sample stop=[""]."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    args = ("--engine", engine, "--max-seq-len", "64", "--max-top-k", "4")
    with service("teacher", tiny_model, tmp_path, *args) as t, service("rollout", tiny_model, tmp_path, *args) as r:
        with TeacherClient(t.address, retries=0) as tc, RolloutClient(r.address, retries=0) as rc:
            info = tc.info()
            assert info.max_seq_len == 64 and info.max_score_len == (63 if engine == "vllm" else 64)
            assert (info.min_temperature, info.max_temperature) == pytest.approx((MIN_TEMPERATURE, MAX_TEMPERATURE))
            assert tc.score([list(range(info.max_score_len))], [1])[0].token_logprobs.shape == (info.max_score_len - 1,)
            with pytest.raises(InvalidInputError, match=f"length {info.max_score_len + 1} over the max sequence length"):
                tc.score([list(range(info.max_score_len + 1))], [1])
            with pytest.raises(InvalidInputError, match=r"stop\[0\] must be 1 to 256 characters"):
                rc.sample(["the quick"], max_tokens=4, stop=[""])
            with pytest.raises(InvalidInputError, match="temperature 2.5 must be 0 .greedy. or in"):
                rc.sample(["the quick"], max_tokens=4, temperature=2.5)
            assert len(rc.sample(["the quick"], max_tokens=4, stop=["fox"], temperature=2.0)[0]) == 1
            _check_stop_string_cut(rc, tiny_model)
            assert len(tc.generate([[1, 2, 3]], max_tokens=61)[0][0].tokens) <= 61
            with pytest.raises(InvalidInputError, match="prompt length 3 \\+ max_tokens 62"):
                tc.generate([[1, 2, 3]], max_tokens=62)


def _check_stop_string_cut(client: RolloutClient, model_dir) -> None:
    """A stop string ends a completion at the token that completes it (vLLM's rule; hf ignored stop)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    (base,), = client.sample(["the quick brown"], max_tokens=12, temperature=0.0)
    text = tok.decode(base.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    want = next(n for n in range(1, len(base.tokens) + 1) if stop in tok.decode(base.tokens[:n], skip_special_tokens=True))
    (cut,), = client.sample(["the quick brown"], max_tokens=12, temperature=0.0, stop=[stop])
    assert list(cut.tokens) == list(base.tokens[:want]) and cut.finish_reason == "stop", (text, stop)


# --------------------------------------------------------------------- 6. int64 overflow in a shape
def test_huge_shape_with_empty_data_is_invalid_argument(shared):
    """[2**32, 2**32] overflowed int64 to 0 elements, passed the byte check and answered INTERNAL."""
    huge = common_pb2.Tensor(dtype="int32", shape=[2**32, 2**32], data=b"")
    with pytest.raises(MalformedTensorError, match="do not fit"):
        from_wire(huge)
    with grpc.insecure_channel(_addr(shared)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            teacher_pb2_grpc.TeacherStub(ch).Score(
                teacher_pb2.ScoreRequest(sequences=[teacher_pb2.ScoreSequence(tokens=huge, response_start=1)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not fit" in err.value.details()


# --------------------------------------------------------------------- 7. garbage bytes
GARBAGE = b"\xff\xff\xff\xff\xff"  # a field tag whose varint never ends: no message parses from it


def _raw(channel, method: str, client_streaming: bool = False, server_streaming: bool = False):
    if client_streaming:
        return lambda: channel.stream_unary(method)(iter([GARBAGE]), timeout=10)
    if server_streaming:
        return lambda: list(channel.unary_stream(method)(GARBAGE, timeout=10))
    return lambda: channel.unary_unary(method)(GARBAGE, timeout=10)


def test_garbage_bytes_to_every_method_is_invalid_argument_without_an_error_log(shared, tiny_model, caplog):
    """Was INTERNAL "Exception deserializing request!", logged at ERROR by grpcio."""
    rollout = start_rollout(RolloutSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf"))
    try:
        calls = {
            _addr(shared): ["/topd.v1.Teacher/GetInfo", "/topd.v1.Teacher/Score", ("/topd.v1.Teacher/ScoreStream", "s"),
                            "/topd.v1.Teacher/Generate", "/grpc.health.v1.Health/Check"],
            _addr(rollout): ["/topd.v1.Rollout/GetInfo", "/topd.v1.Rollout/Sample", "/topd.v1.Rollout/Continue",
                             "/topd.v1.Rollout/BeginUpdate", ("/topd.v1.Rollout/SendBuckets", "c"),
                             "/topd.v1.Rollout/CommitUpdate", "/topd.v1.Rollout/AbortUpdate",
                             "/topd.v1.Rollout/ReleaseOwner"],
        }
        caplog.set_level(logging.INFO)
        for addr, methods in calls.items():
            with grpc.insecure_channel(addr) as ch:
                for m in methods:
                    name, kind = (m, "") if isinstance(m, str) else m
                    with pytest.raises(grpc.RpcError) as err:
                        _raw(ch, name, client_streaming=kind == "c", server_streaming=kind == "s")()
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
                    assert "does not parse" in err.value.details()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        rollout.stop(grace=0)


# --------------------------------------------------------------------- 8. one temperature rule
@pytest.mark.parametrize("temperature", [float("inf"), 1e30, 1e-30, float("nan"), -1.0, 2.5])
def test_score_and_generate_share_one_temperature_rule(shared, temperature):
    """Score accepted inf / 1e30 / 1e-30 (uniform or -1e30 logprobs) while Generate refused inf."""
    with TeacherClient(_addr(shared), retries=0) as c:
        with pytest.raises(InvalidInputError, match=f"in \\[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}\\]"):
            c.score([[1, 2, 3]], [1], temperature=temperature)
        with pytest.raises(InvalidInputError, match=f"in \\[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}\\]"):
            c.generate([[1, 2, 3]], max_tokens=2, temperature=temperature)


def test_temperature_bounds_are_accepted_by_both(shared):
    with TeacherClient(_addr(shared), retries=0) as c:
        for t in (MIN_TEMPERATURE, MAX_TEMPERATURE):
            assert np.isfinite(c.score([[1, 2, 3]], [1], temperature=t)[0].token_logprobs).all()
            assert len(c.generate([[1, 2, 3]], max_tokens=2, temperature=t)[0]) == 1
        assert len(c.generate([[1, 2, 3]], max_tokens=2, temperature=0.0)[0]) == 1  # greedy
        with pytest.raises(InvalidInputError, match="must be in"):
            c.score([[1, 2, 3]], [1], temperature=0.0)  # scoring has no greedy


# --------------------------------------------------------------------- 9. cancels and deadlines are quiet
def test_cancels_deadlines_and_shutdown_are_logged_without_a_traceback(tiny_model, caplog):
    """Each was `ERROR internal error` with a CancelledError traceback."""
    caplog.set_level(logging.DEBUG)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 384, 256) for _ in range(64)]
    request = teacher_pb2.ScoreRequest(sequences=[_seq_pb(s) for s in seqs], top_k=8)
    with teacher(tiny_model) as run:
        with grpc.insecure_channel(_addr(run)) as ch:
            stub = teacher_pb2_grpc.TeacherStub(ch)
            for _ in range(3):  # client cancels while its items wait or run
                future = stub.Score.future(request, timeout=60)
                time.sleep(0.2)
                future.cancel()
            ahead = [stub.Score.future(request, timeout=60) for _ in range(4)]  # one batch each, run in turn
            with pytest.raises(grpc.RpcError) as err:  # deadline passes while waiting behind them
                stub.Score(request, timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for f in ahead:
                f.result()
            in_flight = [stub.Score.future(request, timeout=60) for _ in range(8)]  # one batch each, run in turn
            time.sleep(0.1)
            run.stop(grace=0)  # shutdown cancels what is in flight
            assert [f for f in in_flight if f.exception() is not None], "shutdown cancelled nothing in flight"
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR
            or (r.levelno >= logging.WARNING and r.name.startswith("services"))]
    assert not loud, "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud)
    assert not [r for r in caplog.records if r.exc_info and "Cancel" in str(r.exc_info[0])]


# --------------------------------------------------------------------- 10. errors are counted
def test_request_errors_are_counted_per_method_and_code(tiny_model):
    """topd_request_errors_total was never incremented."""
    with teacher(tiny_model, auth_token="s3cret") as run, grpc.insecure_channel(_addr(run)) as ch:
        stub = teacher_pb2_grpc.TeacherStub(ch)
        good = (("authorization", "Bearer s3cret"),)
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                stub.Score(teacher_pb2.ScoreRequest(sequences=[_seq_pb([1, 999])]), metadata=good, timeout=10)
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.GetInfo(common_pb2.InfoRequest(), timeout=10)  # no token
        with pytest.raises(grpc.RpcError):
            ch.unary_unary("/topd.v1.Teacher/Generate")(GARBAGE, metadata=good, timeout=10)
        with pytest.raises(grpc.RpcError):
            list(stub.ScoreStream(teacher_pb2.ScoreRequest(sequences=[_seq_pb([1, 2])], temperature=9.0),
                                  metadata=good, timeout=10))
        stub.Score(teacher_pb2.ScoreRequest(sequences=[_seq_pb([1, 2])]), metadata=good, timeout=10)
        headers = {"authorization": "Bearer s3cret"}
        text = httpx.get(f"{_http(run)}/metrics", headers=headers).text
    counts = {(labels["method"], labels["code"]): v for labels, v in _samples(text, "topd_request_errors_total")}
    assert counts == {("Score", "INVALID_ARGUMENT"): 3, ("GetInfo", "UNAUTHENTICATED"): 2,
                      ("Generate", "INVALID_ARGUMENT"): 1, ("ScoreStream", "INVALID_ARGUMENT"): 1}


# --------------------------------------------------------------------- 11. SIGTERM drains
def test_sigterm_drains_in_flight_work_and_refuses_new_work(tiny_model, tmp_path):
    """Was a fixed 2 s grace, then "Cancelling all calls": the Score in flight was lost."""
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 384, 512) for _ in range(240)]  # a forward of several seconds here
    with service("teacher", tiny_model, tmp_path, "--engine", "hf", "--shutdown-grace-s", "120") as proc:
        result: dict = {}

        def long_score() -> None:
            try:
                with TeacherClient(proc.address, client_id="inflight", retries=0) as c:
                    result["scores"] = c.score(seqs, [256] * len(seqs), stream=False)
            except Exception as exc:  # noqa: BLE001 - checked below
                result["error"] = exc

        worker = threading.Thread(target=long_score)
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the Score is queued or running
            m = httpx.get(f"{proc.http}/metrics").text
            if re.search(r"^topd_rpcs_in_flight 1\.0$", m, re.M):
                break
            time.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{proc.http}/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{proc.http}/readyz").json()["reason"] == "stopping"
        assert _health(proc.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with TeacherClient(proc.address, retries=0) as c:
            with pytest.raises(UnavailableError, match="shutting down"):
                c.score([[1, 2, 3]], [1])
            assert c.info().vocab_size == 384  # control calls still answer while draining
        assert proc.proc.poll() is None, "exited before the Score in flight was done"
        worker.join(120)
        assert proc.proc.wait(60) == 0
    assert "error" not in result, result
    assert len(result["scores"]) == len(seqs)
    log = proc.log.read_text()
    assert "draining 1 call(s)" in log and "drained in" in log


# --------------------------------------------------------------------- 12. auth on
def test_auth_covers_rest_and_reflection_token_from_a_file(tiny_model, tmp_path, monkeypatch):
    """With TOPD_AUTH_TOKEN set, /status (model paths, client ids), /metrics, /docs and reflection were open."""
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-from-file\n")
    with teacher(tiny_model, auth_token_file=str(token_file)) as run:
        base, auth = _http(run), {"authorization": "Bearer s3cret-from-file"}
        for path in ("/healthz", "/readyz"):
            assert httpx.get(base + path).status_code == 200
        for path in ("/status", "/metrics", "/docs", "/openapi.json"):
            assert httpx.get(base + path).status_code == 401, path
            assert httpx.get(base + path, headers={"authorization": "Bearer wrong"}).status_code == 401, path
            assert httpx.get(base + path, headers=auth).status_code == 200, path
        with grpc.insecure_channel(_addr(run)) as ch:  # reflection is off by default with auth on
            answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=tuple(auth.items()))
            with pytest.raises(grpc.RpcError) as err:
                list(answers)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert TeacherClient(_addr(run), token_file=str(token_file)).info().vocab_size == 384
        monkeypatch.setenv("TOPD_AUTH_TOKEN_FILE", str(token_file))
        assert TeacherClient(_addr(run)).info().vocab_size == 384  # the SDK reads the env's file
        monkeypatch.delenv("TOPD_AUTH_TOKEN_FILE")
    with teacher(tiny_model, auth_token="s3cret", public_status=True, reflection="on") as run:
        assert httpx.get(_http(run) + "/status").status_code == 200
        with grpc.insecure_channel(_addr(run)) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            with pytest.raises(grpc.RpcError) as err:  # on, but behind the token like every RPC
                list(stub.ServerReflectionInfo(request))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            names = {s.name for a in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=(("authorization", "Bearer s3cret"),)) for s in a.list_services_response.service}
            assert "topd.v1.Teacher" in names


def test_auth_token_file_keeps_the_secret_out_of_ps(tiny_model, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-secret-123\n")
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "teacher.log"
    cmd = [sys.executable, "-m", "services.cli", "teacher", "--model", str(tiny_model), "--engine", "hf",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--auth-token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPD_AUTH")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(f"http://127.0.0.1:{http_port}/readyz", proc, log)
        assert b"file-secret-123" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        with TeacherClient(f"127.0.0.1:{grpc_port}", token="file-secret-123", retries=0) as c:
            assert c.info().vocab_size == 384
        with TeacherClient(f"127.0.0.1:{grpc_port}", retries=0) as c:
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                c.info()
    finally:
        assert stop(proc) == 0


def test_trainer_reads_the_token_file_setting(monkeypatch, tmp_path):
    from services.trainer.settings import load_settings

    monkeypatch.setenv("TOPD_AUTH_TOKEN_FILE", str(tmp_path / "t"))
    assert load_settings(None).auth_token_file == str(tmp_path / "t")
