"""The step's loss on a real (tiny) student: micro-batching changes nothing, metrics come with the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.trainer import objective as obj
from services.trainer.batch import Samples, ScoredBatch, TeacherScores
from services.trainer.clients import Branches
from services.trainer.losses import LossConfig, backward_opd, backward_traj
from topd_client.results import Completion

K, TOP_K = 4, 4


def make_batch(seed: int = 2, estimator: str = "sampled", vocab: int = 384) -> tuple[ScoredBatch, Branches, torch.Tensor]:
    rng = np.random.default_rng(seed)
    B = 5
    prompts = [torch.as_tensor(rng.integers(3, 200, rng.integers(3, 9))) for _ in range(B)]
    responses = [torch.as_tensor(rng.integers(3, 200, rng.integers(2, 12))) for _ in range(B)]
    samples = Samples(prompts, responses, [-torch.rand(len(y), generator=torch.Generator().manual_seed(i))
                                           for i, y in enumerate(responses)], [0] * B, [{}] * B, ["length"] * B)
    token = [-rng.random(len(y)).astype(np.float32) * 2 for y in responses]
    if estimator == "teacher_topk":  # k distinct ids per position with their (sub-normalised) log-probs
        ids = [np.stack([rng.choice(vocab, TOP_K, replace=False) for _ in y]).astype(np.int32) for y in responses]
        scores = TeacherScores(token, ids, [np.log(rng.dirichlet(np.ones(TOP_K + 1), len(y))[:, :TOP_K])
                                            .astype(np.float32) for y in responses])
    elif estimator == "full":
        ids = [np.broadcast_to(np.arange(vocab, dtype=np.int32), (len(y), vocab)) for y in responses]
        scores = TeacherScores(token, ids, [np.log(rng.dirichlet(np.ones(vocab), len(y))).astype(np.float32)
                                            for y in responses])
    else:
        scores = TeacherScores(token)
    batch = ScoredBatch.pad(samples, scores)

    def completion(n: int) -> Completion:
        toks = rng.integers(3, 200, n).astype(np.int32)
        ids = rng.integers(3, 200, (n, TOP_K)).astype(np.int32)
        return Completion(toks, np.zeros(n, np.float32), ids, -rng.random((n, TOP_K)).astype(np.float32) - 1.5,
                          "length", 0)

    branches = Branches([torch.cat([p, y[:2]]) for p, y in zip(prompts, responses)],
                        [completion(int(n)) for n in (4, 3, 4, 0, 2)], [completion(4) for _ in range(B)])
    return batch, branches, torch.tensor([True, True, False, True, True])


def config(micro_batch: int, normalisation: str = "response_tokens", estimator: str = "sampled") -> LossConfig:
    return LossConfig(estimator=estimator, opd=obj.OPDConfig(adv_clip=1.0), traj=obj.TrajConfig(lam=0.5), traj_normalisation=normalisation,
                      traj_top_k=TOP_K, window=K, micro_batch=micro_batch)


def run(model_dir, micro_batch: int, normalisation: str = "response_tokens", estimator: str = "sampled"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch, branches, divergent = make_batch(estimator=estimator, vocab=model.config.vocab_size)
    weights = torch.ones_like(batch.sampler_BT)
    weights[0, 1] = 0.0  # a suppressed token
    cfg = config(micro_batch, normalisation, estimator)
    l_opd, m_opd = backward_opd(model, batch, weights, cfg, "cpu")
    l_traj, m_traj = backward_traj(model, branches, divergent, float(batch.num_tokens), cfg, "cpu")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return l_opd, m_opd, l_traj, m_traj, grads


@pytest.mark.parametrize("normalisation, estimator", [("response_tokens", "sampled"), ("window_tokens", "sampled"),
                                                       ("response_tokens", "teacher_topk"), ("response_tokens", "full")])
def test_micro_batches_add_up_to_the_whole_batch(tiny_model, normalisation, estimator):
    whole = run(tiny_model, 64, normalisation, estimator)
    pieces = run(tiny_model, 2, normalisation, estimator)
    for a, b in zip(pieces[:4], whole[:4]):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, g in whole[4].items():
        torch.testing.assert_close(pieces[4][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert whole[3]["topd/num_windows"] == 3.0  # the empty window is left out


def test_opd_metrics_are_those_of_the_whole_batch(tiny_model):
    """The per-micro-batch metrics combine into the batch's: the reverse KL is the mean of l_t."""
    _, m, _, _, _ = run(tiny_model, 2)
    batch, _, _ = make_batch()
    want = float(obj.aggregate_tokens(batch.sampler_BT - batch.teacher_BT, batch.mask_BT))
    assert m["opd/reverse_kl"] == pytest.approx(want, rel=1e-6)
