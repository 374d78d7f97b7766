"""CUDA paths against their CPU references (skipped without a GPU; CI has none).

The objective, the OT distance and the trainer's backward passes move tensors between devices:
each test runs the same inputs on CPU and on CUDA and asserts the same numbers, so a tensor left
on the wrong device or a device-dependent shortcut shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from services.trainer import objective as obj  # noqa: E402
from services.trainer.ot import OTConfig, Windows, one_hot_embedding, ot_distances  # noqa: E402


def _windows(gen: torch.Generator, N: int, K: int, V: int) -> Windows:
    lens = torch.randint(0, K + 1, (N,), generator=gen)
    return Windows(torch.randint(0, V, (N, K), generator=gen), lens)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_ot_distances_cuda_match_cpu(solver: str) -> None:
    gen = torch.Generator().manual_seed(0)
    N, K, V, d = 24, 8, 50, 16
    a, b = _windows(gen, N, K, V), _windows(gen, N, K, V)
    table = torch.randn(V, d, generator=gen, dtype=torch.float64)
    cfg = OTConfig(solver=solver, eps=0.05)
    cpu = ot_distances(a, b, table, cfg)
    cuda = ot_distances(Windows(a.ids_NK.cuda(), a.len_N.cuda()), Windows(b.ids_NK.cuda(), b.len_N.cuda()),
                        table.cuda(), cfg)
    assert cuda.device.type == "cpu" and cuda.dtype == torch.float64
    torch.testing.assert_close(cuda, cpu, atol=1e-9, rtol=1e-9)
    ta, tb, eye = one_hot_embedding(Windows(a.ids_NK.cuda(), a.len_N.cuda()), Windows(b.ids_NK.cuda(), b.len_N.cuda()))
    ca, cb, eye_cpu = one_hot_embedding(a, b)
    torch.testing.assert_close(ot_distances(ta, tb, eye, cfg), ot_distances(ca, cb, eye_cpu, cfg))


def test_opd_and_traj_loss_cuda_match_cpu() -> None:
    gen = torch.Generator().manual_seed(1)
    B, T, N, K, k, V = 6, 20, 5, 8, 4, 64
    mask = torch.rand(B, T, generator=gen) > 0.2
    inp = dict(logp_new_BT=-torch.rand(B, T, generator=gen) * 3, logp_sampler_BT=-torch.rand(B, T, generator=gen) * 3,
               logp_teacher_BT=-torch.rand(B, T, generator=gen) * 3, mask_BT=mask,
               weights_BT=torch.rand(B, T, generator=gen) * 2)
    cfg = obj.OPDConfig()
    loss_cpu, m_cpu = obj.opd_loss(obj.OPDInputs(**inp), cfg)
    loss_cuda, m_cuda = obj.opd_loss(obj.OPDInputs(**{n: t.cuda() for n, t in inp.items()}), cfg)
    torch.testing.assert_close(loss_cuda.cpu(), loss_cpu, rtol=1e-5, atol=1e-6)
    assert m_cuda.keys() == m_cpu.keys()

    logits = torch.randn(N, K, V, generator=gen)
    ids = torch.randint(0, V, (N, K, k), generator=gen)
    t_logp = torch.log_softmax(torch.randn(N, K, V, generator=gen), -1).gather(-1, ids)
    wmask = torch.rand(N, K, generator=gen) > 0.3
    tcfg = obj.TrajConfig(lam=0.5, offset_weights=obj.discounted_offset_weights(K, 0.9))
    l_cpu, _ = obj.traj_loss(logits.requires_grad_(), ids, t_logp, wmask, 100.0, tcfg)
    logits_cuda = logits.detach().cuda().requires_grad_()
    l_cuda, _ = obj.traj_loss(logits_cuda, ids.cuda(), t_logp.cuda(), wmask.cuda(), 100.0, tcfg)
    torch.testing.assert_close(l_cuda.cpu(), l_cpu, rtol=1e-5, atol=1e-6)
    l_cpu.backward()
    l_cuda.backward()
    torch.testing.assert_close(logits_cuda.grad.cpu(), logits.grad, rtol=1e-4, atol=1e-7)


def test_backward_opd_and_traj_grads_cuda_match_cpu(tiny_model) -> None:
    """The trainer's micro-batched backward passes give the same gradients on CUDA as on CPU."""
    from transformers import AutoModelForCausalLM

    from services.trainer.losses import backward_opd, backward_traj
    from tests.test_losses import config, make_batch

    batch, branches, divergent = make_batch()
    weights_BT = torch.ones_like(batch.sampler_BT)
    cfg = config(micro_batch=2)
    grads = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(device)
        loss_opd, m_opd = backward_opd(model, batch, weights_BT, cfg, device)
        loss_traj, metrics = backward_traj(model, branches, divergent, float(batch.num_tokens), cfg, device)
        assert loss_opd.device.type == "cpu" and loss_traj.device.type == "cpu"
        assert metrics["topd/num_windows"] == 3.0  # the empty window is left out
        grads[device] = (loss_opd, loss_traj, torch.tensor(m_opd["opd/rho_mean"]),
                         {n: p.grad.detach().cpu() for n, p in model.named_parameters()})
    for a, b in zip(grads["cuda"][:3], grads["cpu"][:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, g in grads["cpu"][3].items():
        torch.testing.assert_close(grads["cuda"][3][name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_hf_engine_cuda_scores_match_cpu(tiny_model) -> None:
    """The transformers engine on CUDA (float32 here) scores like the CPU engine."""
    from services.common.engine_hf import HFEngine

    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 200, n).astype(np.int32) for n in (12, 30, 7)]
    starts = [4, 10, 1]
    cands = [rng.integers(0, 384, (n - r, c)).astype(np.int32) for n, r, c in zip((12, 30, 7), starts, (3, 9, 1))]
    cands[1] = None
    outs = {dev: HFEngine(str(tiny_model), dtype="float32", device=dev).score(seqs, starts, top_k=5, temperature=1.0,
                                                                             candidate_ids=cands)
            for dev in ("cpu", "cuda")}
    for a, b in zip(outs["cuda"], outs["cpu"]):
        np.testing.assert_allclose(a.token_logprobs_R, b.token_logprobs_R, atol=1e-4)
        np.testing.assert_allclose(a.topk_logprobs_Rk, b.topk_logprobs_Rk, atol=1e-4)
        np.testing.assert_array_equal(a.topk_ids_Rk[:, 0], b.topk_ids_Rk[:, 0])
        assert (a.candidate_logprobs_Rc is None) == (b.candidate_logprobs_Rc is None)
        if a.candidate_logprobs_Rc is not None:
            np.testing.assert_allclose(a.candidate_logprobs_Rc, b.candidate_logprobs_Rc, atol=1e-4)


@pytest.mark.parametrize("name", ["sampled", "student_topk", "teacher_topk", "full"])
def test_opd_estimators_cuda_match_cpu(name: str) -> None:
    from services.trainer.estimators import EstimatorInputs, estimator_loss

    gen = torch.Generator().manual_seed(4)
    B, T, V, k = 3, 6, 41, 5
    logits = torch.randn(B, T, V, generator=gen) * 2
    t_BTV = torch.log_softmax(torch.randn(B, T, V, generator=gen) * 2, -1)
    tokens = torch.randint(V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    ids = None if name == "full" else logits.topk(k, -1).indices
    inputs = dict(tokens_BT=tokens, mask_BT=mask, weights_BT=torch.rand(B, T, generator=gen), ids_BTk=ids,
                  logp_teacher_BTk=t_BTV if ids is None else t_BTV.gather(-1, ids),
                  logp_sampler_BT=torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0],
                  logp_teacher_BT=t_BTV.gather(-1, tokens[..., None])[..., 0])
    out = {}
    for device in ("cpu", "cuda"):
        x = logits.clone().to(device).requires_grad_()
        moved = {n: None if v is None else v.to(device) for n, v in inputs.items()}
        loss, metrics = estimator_loss(name, EstimatorInputs(x, num_tokens=50.0, **moved))
        loss.backward()
        out[device] = (loss.detach().cpu(), x.grad.cpu(), metrics)
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-4, atol=1e-7)
    assert out["cuda"][2] == pytest.approx(out["cpu"][2], rel=1e-4, abs=1e-6)


def test_named_weights_from_cuda_are_cpu_copies_in_the_serving_dtype(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from services.trainer.student import named_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda()
    for dtype in (None, torch.bfloat16):
        weights = named_weights(model, dtype)
        for name, p in model.named_parameters():
            t = weights[name]
            assert t.device.type == "cpu" and t.dtype == (dtype or torch.float32)
            assert torch.equal(t, p.detach().cpu().to(t.dtype)), name  # the same round-to-nearest cast
