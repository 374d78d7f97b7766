"""Input checks shared by the model servers; each failure names the problem (INVALID_ARGUMENT).

Every limit an engine has is checked here, before the request reaches the engine, so the hf and
vLLM engines refuse exactly the same requests with the same message (an engine's own ValueError
would surface as INTERNAL). What a server accepts is advertised in GetInfo.
"""

from __future__ import annotations

import math

import numpy as np

from services.common.engine import EngineMeta, SamplingSpec
from topd_client.errors import InvalidInputError, TooLargeError
from topd_client.limits import MAX_TEMPERATURE, MIN_TEMPERATURE
from topd_client.tensors import from_wire
from topd_client.wire.topd.v1 import common_pb2

MAX_SAMPLES_PER_PROMPT = 64
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256


def token_ids(tensor: common_pb2.Tensor, what: str, meta: EngineMeta, allow_empty: bool = False,
              max_len: int | None = None) -> np.ndarray:
    """A 1-D int tensor of ids inside the vocabulary and at most `max_len` long (default: the model's)."""
    arr = from_wire(tensor, what)
    if tensor.dtype not in ("int32", "int64"):
        raise InvalidInputError(f"{what}: token ids must be int32 or int64, got {tensor.dtype}")
    if arr.ndim != 1:
        raise InvalidInputError(f"{what}: token ids must be 1-D, got shape {list(arr.shape)}")
    if arr.size == 0 and not allow_empty:
        raise InvalidInputError(f"{what}: empty sequence")
    _check_in_vocab(arr, what, meta)
    limit = meta.max_seq_len if max_len is None else max_len
    if arr.size > limit:
        raise InvalidInputError(f"{what}: length {arr.size} over the max sequence length {limit}"
                                + ("" if limit == meta.max_seq_len else f" for this call ({meta.engine} engine)"))
    return arr.astype(np.int32, copy=False)


def candidate_ids(tensor: common_pb2.Tensor, what: str, rows: int, meta: EngineMeta, limit: int) -> np.ndarray:
    """An int [rows, c] block of vocabulary ids, 1 <= c <= limit (the server's max_candidate_ids)."""
    arr = from_wire(tensor, what)
    if tensor.dtype not in ("int32", "int64"):
        raise InvalidInputError(f"{what}: token ids must be int32 or int64, got {tensor.dtype}")
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise InvalidInputError(f"{what}: shape {list(arr.shape)} must be [R, c] with R = {rows} response rows")
    if not 1 <= arr.shape[1] <= limit:
        raise InvalidInputError(f"{what}: {arr.shape[1]} ids per row outside [1, {limit}] "
                                f"(the server's max_candidate_ids is {limit})")
    _check_in_vocab(arr, what, meta)
    return arr.astype(np.int32, copy=False)


def _check_in_vocab(arr: np.ndarray, what: str, meta: EngineMeta) -> None:
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= meta.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(f"{what}: token id {bad} outside the vocabulary [0, {meta.vocab_size})")


def top_k(k: int, limit: int) -> int:
    if k < 0 or k > limit:
        raise InvalidInputError(f"top_k {k} outside [0, {limit}] (the server's max_top_k is {limit})")
    return k


def temperature(value: float, *, greedy_ok: bool) -> float:
    """One rule for Score and sampling: finite, in [MIN_TEMPERATURE, MAX_TEMPERATURE]; 0 = greedy
    where sampling allows it."""
    if value == 0 and greedy_ok:
        return 0.0
    if not (math.isfinite(value) and _LOWEST <= value <= _HIGHEST):
        greedy = "0 (greedy) or " if greedy_ok else ""
        raise InvalidInputError(f"temperature {value:.6g} must be {greedy}in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    return float(value)


_LOWEST, _HIGHEST = float(np.float32(MIN_TEMPERATURE)), float(np.float32(MAX_TEMPERATURE))  # as the wire's float


def stop_strings(stop: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidInputError(f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidInputError(f"stop[{i}] must be 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
    return tuple(stop)


def request_items(count: int, limit: int) -> None:
    """A request with more items than the whole queue can never be served: refuse it for good, and
    first, before validating its items (RESOURCE_EXHAUSTED stays for a full queue that will drain)."""
    if count > limit:
        raise TooLargeError(f"request of {count} items is larger than the server's queue ({limit} items, "
                            f"--max-queue-items): it can never fit; split it into requests of at most {limit}")


def response_fits(estimated_bytes: int, limit: int, advice: str) -> None:
    """Refuse before computing a response that one gRPC message cannot carry."""
    if estimated_bytes > limit:
        raise TooLargeError(f"the response would be about {estimated_bytes / 2**20:.1f} MiB, over the "
                            f"{limit / 2**20:.0f} MiB message limit; {advice}")


def sampling_spec(p: common_pb2.SamplingParams, meta: EngineMeta, max_top_k: int,
                  longest_prompt: int) -> SamplingSpec:
    """Defaults: n=1, temperature 1, top_p 1; checks that prompt + max_tokens fits the model."""
    n = p.n or 1
    if not 1 <= n <= MAX_SAMPLES_PER_PROMPT:
        raise InvalidInputError(f"n {n} outside [1, {MAX_SAMPLES_PER_PROMPT}]")
    temp = temperature(p.temperature if p.HasField("temperature") else 1.0, greedy_ok=True)
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidInputError(f"top_p {top_p} outside (0, 1]")
    if p.max_tokens <= 0:
        raise InvalidInputError(f"max_tokens must be positive, got {p.max_tokens}")
    if longest_prompt + p.max_tokens > meta.max_seq_len:
        raise InvalidInputError(f"prompt length {longest_prompt} + max_tokens {p.max_tokens} over the max "
                                f"sequence length {meta.max_seq_len}")
    for t in p.stop_token_ids:
        if not 0 <= t < meta.vocab_size:
            raise InvalidInputError(f"stop token id {t} outside the vocabulary [0, {meta.vocab_size})")
    return SamplingSpec(n=n, temperature=temp, top_p=float(top_p), max_tokens=p.max_tokens,
                        seed=p.seed if p.HasField("seed") else None, stop_token_ids=tuple(p.stop_token_ids),
                        stop=stop_strings(p.stop), top_k=top_k(p.top_k, max_top_k), ignore_eos=p.ignore_eos)
