"""Limits the SDK and the servers judge the same way, before any compute.

Wire sizes: a unary response must fit one gRPC message, so both sides estimate it from the
request alone (an upper bound: every generated completion is counted at `max_tokens`).
Temperatures: one range for scoring and sampling, vLLM's sampler range, so that both engines
accept exactly the same requests (vLLM refuses sampling above 2 and silently raises anything in
(0, 0.01) to 0.01; at 1e-30 a scoring forward divides logits into inf).
"""

from __future__ import annotations

from typing import Sequence

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
MESSAGE_OVERHEAD = 96  # per message: field tags, dtype strings, shapes, length prefixes (measured: < 80)


def score_result_bytes(rows: int, top_k: int, candidates: int = 0) -> int:
    """One ScoreResult: float32 logprobs [R], int32 top-k ids [R, k], float32 top-k logprobs [R, k],
    float32 logprobs at the caller's candidate ids [R, c]."""
    return rows * (4 + 8 * top_k + 4 * candidates) + MESSAGE_OVERHEAD


def score_response_bytes(rows: Sequence[int], top_k: int, candidates: Sequence[int] | None = None) -> int:
    """A unary ScoreResponse holding one result per sequence (`rows` = response length of each,
    `candidates` = candidate ids per row of each, none when None)."""
    cands = candidates if candidates is not None else [0] * len(rows)
    return sum(score_result_bytes(r, top_k, c) for r, c in zip(rows, cands)) + MESSAGE_OVERHEAD


def generate_response_bytes(num_prompts: int, n: int, max_tokens: int, top_k: int) -> int:
    """A GenerateResponse if every completion runs to max_tokens: int32 tokens, float32 logprobs,
    and the top-k ids and logprobs of every step."""
    return num_prompts * n * (max_tokens * (8 + 8 * top_k) + MESSAGE_OVERHEAD) + MESSAGE_OVERHEAD
