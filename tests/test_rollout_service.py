"""The rollout service over loopback gRPC, for both engines: sampling vs transformers, live weight
updates (tied and untied models) and updates racing with sampling. Refused updates and the update
protocol itself: tests/test_weight_sync.py."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from tests.conftest import ref_logprobs
from tests.procs import service
from topd_client import RolloutClient


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


def serve(served, weights: dict[str, torch.Tensor] | None = None) -> int:
    """Make the rollout serve `weights` (default: its checkpoint's) as a new version, and the test's
    reference model hold the same: every test starts from a known state, whatever ran before it."""
    model, client = served["model"], served["client"]
    weights = weights if weights is not None else dict(_load(served["path"]).named_parameters())
    weights = {n: t.detach().contiguous() for n, t in weights.items()}
    version = client.info().policy_version + 1
    assert client.update_weights(weights, version=version).version == version
    model.load_state_dict(weights, strict=False)
    return version


def test_greedy_equals_transformers_and_logprobs_match(served):
    model, client = served["model"], served["client"]
    serve(served)
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
    serve(served)
    version = serve(served, _perturbed(model, seed=11))
    assert client.info().policy_version == version
    long_prompt = np.arange(3, 120, dtype=np.int32) % 380  # long: would reuse stale prefix-cache KV
    for prompt in [*PROMPTS, long_prompt]:
        (c,) = client.continue_from([prompt], max_tokens=6, temperature=0.0)[0]
        assert c.policy_version == version
        _check_sample_logprobs(model, prompt, c)


def test_checkpoint_dir_update(served):
    from safetensors.torch import save_file

    model, client = served["model"], served["client"]
    serve(served)
    version = client.info().policy_version + 1
    new = _perturbed(model, seed=4242)
    ckpt = served["weights_dir"] / f"v{version}"
    ckpt.mkdir(exist_ok=True)
    save_file(new, ckpt / "model.safetensors")
    assert client.update_weights(ckpt, version=version).version == version
    model.load_state_dict(new, strict=False)
    (c,) = client.continue_from([PROMPTS[0]], max_tokens=5, temperature=0.0)[0]
    _check_sample_logprobs(model, PROMPTS[0], c)


def test_sampling_racing_an_update_is_consistent(served):
    """Requests in flight finish on the old weights, later ones on the new; every sample's
    logprobs match the weights of the version it reports, and both versions are seen."""
    model, proc = served["model"], served["proc"]
    client = RolloutClient(proc.address)
    old_version = serve(served)
    refs = {old_version: {n: p.detach().clone() for n, p in model.named_parameters()}}
    new = _perturbed(model, seed=7)
    refs[old_version + 1] = new
    results, errors, stop = [], [], threading.Event()
    seen = {v: threading.Event() for v in refs}

    def sampler(i):
        try:
            with RolloutClient(proc.address, client_id=f"s{i}") as c:
                while not stop.is_set():
                    for comp in c.sample([PROMPTS[i % 2]], max_tokens=5, seed=i)[0]:
                        results.append((PROMPTS[i % 2], comp))
                        seen[comp.policy_version].set()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sampler, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    try:
        assert seen[old_version].wait(120)  # samplers are running on the old weights ...
        client.update_weights(new, version=old_version + 1)
        assert seen[old_version + 1].wait(120)  # ... and go on on the new ones
    finally:
        stop.set()
        [t.join(120) for t in threads]
    assert not errors, errors
    assert {c.policy_version for _, c in results} == {old_version, old_version + 1}
    for version, weights in refs.items():
        model.load_state_dict(weights, strict=False)
        for prompt, c in results:
            if c.policy_version == version:
                _check_sample_logprobs(model, prompt, c)


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
