"""Plain-Python views of wire messages shared by the teacher and rollout clients."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from topd_client.tensors import from_wire
from topd_client.wire.topd.v1 import common_pb2


@dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str
    vocab_size: int
    max_seq_len: int
    dtype: str
    engine: str
    device: str
    tokenizer_fingerprint: str
    max_top_k: int
    policy_version: int
    eos_token_id: int
    max_candidate_ids: int = 0  # teacher: most candidate ids per Score row; rollout: 0
    instance_id: str = ""  # random per service start: a change means it restarted
    max_score_len: int = 0        # longest sequence Score accepts (0: a server that does not say)
    max_message_bytes: int = 0    # the server's gRPC message limit
    max_request_items: int = 0    # most sequences / prompts in one request
    min_temperature: float = 0.0  # temperatures lie in [min, max]; 0 = greedy sampling
    max_temperature: float = 0.0


@dataclass(frozen=True)
class Completion:
    """One continuation. logprobs are the sampler's temperature-1 logprobs of the sampled tokens."""

    tokens: np.ndarray          # int32 [T]
    logprobs: np.ndarray        # float32 [T]
    topk_ids: np.ndarray        # int32 [T, k] (k = 0 when not asked)
    topk_logprobs: np.ndarray   # float32 [T, k]
    finish_reason: str
    policy_version: int


def info_from_wire(m: common_pb2.ModelInfo) -> ModelInfo:
    """ModelInfo's fields are the wire message's scalar fields, by name."""
    return ModelInfo(**{f.name: getattr(m, f.name) for f in fields(ModelInfo)})


def sampling_to_wire(*, n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None, top_k: int,
                     stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (),
                     ignore_eos: bool = False) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, top_k=top_k,
                                  stop_token_ids=list(stop_token_ids), stop=list(stop), ignore_eos=ignore_eos)
    if seed is not None:
        p.seed = seed
    return p


def completions_from_wire(resp: common_pb2.GenerateResponse, num_prompts: int) -> list[list[Completion]]:
    out: list[list[Completion]] = [[] for _ in range(num_prompts)]
    for c in resp.completions:
        tokens = from_wire(c.tokens)
        k_ids = from_wire(c.topk_ids) if c.HasField("topk_ids") else np.zeros((len(tokens), 0), np.int32)
        k_lp = from_wire(c.topk_logprobs) if c.HasField("topk_logprobs") else np.zeros((len(tokens), 0), np.float32)
        out[c.prompt_index].append(Completion(tokens, from_wire(c.logprobs), k_ids, k_lp, c.finish_reason,
                                              c.policy_version))
    return out
