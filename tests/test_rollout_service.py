"""The rollout service over loopback gRPC, for both engines: sampling vs transformers, live weight
updates (tied and untied models), rejected updates, and updates racing with sampling."""

from __future__ import annotations

import hashlib
import threading

import grpc
import numpy as np
import pytest
import torch

from tests.conftest import ref_logprobs
from tests.procs import service
from topd_client import InvalidInputError, PreconditionError, RolloutClient
from topd_client.safetensors_stream import iter_payload
from topd_client.wire.topd.v1 import rollout_pb2, rollout_pb2_grpc


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not here
        return False
    import importlib.util

    return importlib.util.find_spec("services.common.engine_vllm") is not None


ENGINES = ["hf", pytest.param("vllm", marks=[pytest.mark.vllm,
                                             pytest.mark.skipif(not _vllm_available(), reason="vllm not importable")])]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _perturbed(model, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (p.detach() + scale * torch.randn(p.shape, generator=g)).contiguous()
            for n, p in model.named_parameters()}


def _check_sample_logprobs(model, prompt, completion, tol=1e-4):
    full = np.concatenate([prompt, completion.tokens])
    lp = ref_logprobs(model, full)[len(prompt) - 1:]
    want = lp.gather(-1, torch.as_tensor(np.array(completion.tokens), dtype=torch.long)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(completion.logprobs, want, atol=tol, rtol=0)


PROMPTS = [np.array([5, 17, 42, 99, 7], dtype=np.int32), np.array([200, 3, 3, 150], dtype=np.int32)]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module", params=["untied", "tied"])
def served(request, engine, tiny_model, tiny_tied_model, tmp_path_factory):
    path = tiny_model if request.param == "untied" else tiny_tied_model
    with service("rollout", path, tmp_path_factory.mktemp("logs"), "--engine", engine) as proc:
        yield {"proc": proc, "path": path, "model": _load(path), "client": RolloutClient(proc.address, retries=0)}


def test_greedy_equals_transformers_and_logprobs_match(served):
    model, client = served["model"], served["client"]
    out = client.sample(PROMPTS, max_tokens=8, temperature=0.0, top_k=3)
    for prompt, (c,) in zip(PROMPTS, out):
        ids = torch.as_tensor(prompt, dtype=torch.long)[None]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(c.tokens),
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(c.tokens, ref)
        _check_sample_logprobs(model, prompt, c)
        assert c.topk_ids.shape == (len(c.tokens), 3)
    sampled = client.sample(PROMPTS, max_tokens=8, n=3, seed=5)
    for prompt, group in zip(PROMPTS, sampled):
        assert len(group) == 3
        for c in group:
            _check_sample_logprobs(model, prompt, c)


def test_update_then_logprobs_follow_new_weights(served):
    model, client = served["model"], served["client"]
    version = client.info().policy_version + 1
    new = _perturbed(model, seed=version)
    resp = client.update_weights(new, version=version)
    assert resp.version == version
    model.load_state_dict(new, strict=False)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert client.info().policy_version == version
    long_prompt = np.arange(3, 120, dtype=np.int32) % 380  # long: would reuse stale prefix-cache KV
    for prompt in [*PROMPTS, long_prompt]:
        (c,) = client.continue_from([prompt], max_tokens=6, temperature=0.0)[0]
        assert c.policy_version == version
        _check_sample_logprobs(model, prompt, c)


def _raw_update(proc, chunks):
    with grpc.insecure_channel(proc.address) as ch:
        return rollout_pb2_grpc.RolloutStub(ch).UpdateWeights(iter(chunks), timeout=60)


def test_bad_updates_are_rejected_and_old_weights_keep_serving(served):
    proc, model, client = served["proc"], served["model"], served["client"]
    current = client.info().policy_version
    before = client.sample(PROMPTS, max_tokens=6, temperature=0.0)
    good = _perturbed(model, seed=999)
    payload = b"".join(iter_payload(good))
    sha = hashlib.sha256(payload).hexdigest()
    cases = {
        "truncated": [rollout_pb2.WeightChunk(version=current + 1, sha256=sha, total_bytes=len(payload),
                                              data=payload[: len(payload) // 2])],
        "corrupt": [rollout_pb2.WeightChunk(version=current + 1, sha256=sha, total_bytes=len(payload),
                                            data=payload[:100] + b"\xff" + payload[101:])],
        "not safetensors": [rollout_pb2.WeightChunk(version=current + 1, data=b"garbage" * 10)],
    }
    for what, chunks in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _raw_update(proc, chunks)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    wrong_shape = dict(good)
    wrong_shape["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(InvalidInputError, match="wrong shapes"):
        client.update_weights(wrong_shape, version=current + 1)
    unknown = {**good, "model.extra.weight": torch.zeros(2)}
    with pytest.raises(InvalidInputError, match="unknown names"):
        client.update_weights(unknown, version=current + 1)
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(InvalidInputError, match="missing names"):
        client.update_weights(missing, version=current + 1)
    with pytest.raises(PreconditionError, match="stale update"):
        client.update_weights(good, version=current)
    assert client.info().policy_version == current
    after = client.sample(PROMPTS, max_tokens=6, temperature=0.0)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a[0].tokens, b[0].tokens)
        np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-6)


def test_checkpoint_dir_update(served, tmp_path):
    from safetensors.torch import save_file

    model, client = served["model"], served["client"]
    version = client.info().policy_version + 1
    new = _perturbed(model, seed=4242)
    save_file(new, tmp_path / "model.safetensors")
    assert client.update_weights(tmp_path, version=version).version == version
    model.load_state_dict(new, strict=False)
    (c,) = client.continue_from([PROMPTS[0]], max_tokens=5, temperature=0.0)[0]
    _check_sample_logprobs(model, PROMPTS[0], c)


def test_sampling_racing_an_update_is_consistent(served):
    """Requests in flight finish on the old weights, later ones on the new; every sample's
    logprobs match the weights of the version it reports."""
    model, proc = served["model"], served["proc"]
    client = RolloutClient(proc.address)
    old_version = client.info().policy_version
    refs = {old_version: {n: p.detach().clone() for n, p in model.named_parameters()}}
    new = _perturbed(model, seed=7)
    refs[old_version + 1] = new
    results, errors = [], []

    def sampler(i):
        try:
            with RolloutClient(proc.address, client_id=f"s{i}") as c:
                for _ in range(4):
                    results.extend((PROMPTS[i % 2], comp) for comp in c.sample([PROMPTS[i % 2]], max_tokens=5,
                                                                               seed=i)[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sampler, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    client.update_weights(new, version=old_version + 1)
    [t.join(120) for t in threads]
    assert not errors, errors
    assert len(results) == 16
    assert {c.policy_version for _, c in results} <= {old_version, old_version + 1}
    for version, weights in refs.items():
        model.load_state_dict(weights, strict=False)
        for prompt, c in results:
            if c.policy_version == version:
                _check_sample_logprobs(model, prompt, c)
    model.load_state_dict(new, strict=False)


def test_weights_cast_to_the_serving_dtype_before_the_push_serve_identically(tiny_model, tmp_path):
    """The trainer casts its float32 weights to the rollout's dtype before pushing (half the bytes
    for bfloat16); the rollout would round them the same way itself, so it serves identical logprobs."""
    from services.trainer.student import named_weights, serving_dtype

    model = _load(tiny_model)
    new = _perturbed(model, seed=11)
    model.load_state_dict(new, strict=False)
    with service("rollout", tiny_model, tmp_path, "--engine", "hf", "--dtype", "bfloat16") as proc:
        client = RolloutClient(proc.address, retries=0)
        dtype = serving_dtype(client.info().dtype)
        assert dtype is torch.bfloat16
        outs = []
        for version, weights in ((1, named_weights(model)), (2, named_weights(model, dtype))):
            assert all(t.dtype == (dtype if version == 2 else torch.float32) for t in weights.values())
            client.update_weights(weights, version=version)
            outs.append(client.continue_from(PROMPTS, max_tokens=6, temperature=0.0, top_k=4))
        for (a,), (b,) in zip(*outs):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.logprobs, b.logprobs)
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert outs[1][0][0].policy_version == 2


def test_serving_dtype_names() -> None:
    from services.trainer.student import serving_dtype

    assert serving_dtype("bfloat16") is torch.bfloat16 and serving_dtype("float32") is torch.float32
    assert serving_dtype("int8") is None and serving_dtype("auto") is None and serving_dtype("") is None


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 4 << 20])
def test_streamed_payload_is_valid_safetensors_in_bounded_chunks(chunk_bytes: int) -> None:
    from safetensors.torch import load

    from topd_client.safetensors_stream import payload_sha256, payload_size

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "empty": torch.zeros(0, 4), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2]}
    chunks = list(iter_payload(tensors, chunk_bytes))
    payload = b"".join(chunks)
    assert all(0 < len(c) for c in chunks) and all(len(c) <= chunk_bytes for c in chunks[1:])
    assert len(payload) == payload_size(tensors) and hashlib.sha256(payload).hexdigest() == payload_sha256(tensors)
    back = load(payload)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t.contiguous())


def test_a_dead_engine_makes_the_service_unready_and_exit(tiny_model, monkeypatch):
    """Once the engine is dead (vLLM's engine process gone), the caller gets UNAVAILABLE (it retries),
    /readyz and gRPC health turn to not serving, and `wait()` returns with the failure so the process
    exits non-zero and compose / Kubernetes restart it, instead of a "healthy" service failing
    every request (seen in the first real docker compose run)."""
    import httpx

    from services.common.engine import EngineDeadError
    from services.common.engine_hf import HFEngine
    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings
    from topd_client import UnavailableError

    def dead(self, prompts, spec):
        raise EngineDeadError("engine core process died")

    monkeypatch.setattr(HFEngine, "generate", dead)
    run = start_rollout(RolloutSettings(model=str(tiny_model), engine="hf", grpc_port=0, http_port=0))
    waiter = threading.Thread(target=run.wait)
    try:
        waiter.start()
        assert httpx.get(f"http://127.0.0.1:{run.endpoints.http_port}/readyz").status_code == 200
        with RolloutClient(f"127.0.0.1:{run.endpoints.grpc_port}", retries=0) as client:
            with pytest.raises(UnavailableError, match="engine core process died"):
                client.sample(PROMPTS, max_tokens=4)
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "wait() did not return after the engine died"
        assert run.failure and "engine core process died" in run.failure
        assert run.state.ready is False and "failed" in run.state.not_ready_reason
    finally:
        run.stop()
        waiter.join(timeout=30)


def test_fail_turns_health_to_not_serving_before_the_stop(tiny_model):
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings

    run = start_rollout(RolloutSettings(model=str(tiny_model), engine="hf", grpc_port=0, http_port=0))
    try:
        run.fail("test: engine gone")
        r = httpx.get(f"http://127.0.0.1:{run.endpoints.http_port}/readyz")
        assert r.status_code == 503 and "engine gone" in r.json()["reason"]
        with grpc.insecure_channel(f"127.0.0.1:{run.endpoints.grpc_port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        run.stop()
