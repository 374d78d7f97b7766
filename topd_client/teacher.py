"""`TeacherClient`: scores and near-future windows from a (shared) teacher service, as numpy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from topd_client._channel import BaseClient
from topd_client.limits import score_response_bytes
from topd_client.results import Completion, ModelInfo, completions_from_wire, info_from_wire, sampling_to_wire
from topd_client.tensors import from_wire, to_wire
from topd_client.wire.topd.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc

log = logging.getLogger(__name__)


# Score requests of more sequences than this stream their results (one message per sequence):
# above a few sequences that moved ~2x the bytes/s of one large unary message on loopback here.
STREAM_ABOVE = 8


@dataclass(frozen=True)
class ScoreResult:
    """Row j scores tokens[response_start + j]."""

    token_logprobs: np.ndarray      # float32 [R]
    topk_ids: np.ndarray            # int32 [R, k]
    topk_logprobs: np.ndarray       # float32 [R, k]
    candidate_logprobs: np.ndarray  # float32 [R, c] at the sequence's candidate_ids (c = 0 when none given)


class TeacherClient(BaseClient):
    """Client of the teacher service.

    >>> teacher = TeacherClient("127.0.0.1:50051", client_id="trainer-0")
    >>> teacher.score([ids], [prompt_len], top_k=20)[0].token_logprobs
    >>> teacher.score([ids], [prompt_len], candidate_ids=[student_topk_ids_Rc])[0].candidate_logprobs
    """

    kind = "teacher"

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(address, **kwargs)
        self._stub = teacher_pb2_grpc.TeacherStub(self._channel)

    def info(self) -> ModelInfo:
        return info_from_wire(self.call(self._stub.GetInfo, common_pb2.InfoRequest()))

    def score(self, sequences: Sequence[Sequence[int] | np.ndarray], response_starts: Sequence[int], *,
              top_k: int = 0, temperature: float = 1.0,
              candidate_ids: Sequence[np.ndarray | Sequence[Sequence[int]] | None] | None = None,
              stream: bool | None = None, timeout: float | None = None) -> list[ScoreResult]:
        """Teacher logprobs of each response token and the top-k at each response position.

        `candidate_ids`, one int array [R, c] per sequence (R = len(sequence) - response_start, or
        None for a sequence that needs none), asks for the teacher's log-softmax(logits /
        temperature) at those ids in each row: `ScoreResult.candidate_logprobs`, same order. c is at
        most `info().max_candidate_ids`. `stream` (default: on for more than STREAM_ABOVE sequences) receives one
        message per sequence, which moved ~2x the bytes/s of one large unary message on loopback here. A
        unary call whose response would not fit one message (`max_message_mb`) streams instead.
        """
        if len(sequences) != len(response_starts):
            raise ValueError(f"{len(sequences)} sequences but {len(response_starts)} response_starts")
        if candidate_ids is not None and len(candidate_ids) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(candidate_ids)} candidate_ids")
        cands = candidate_ids if candidate_ids is not None else [None] * len(sequences)
        request = teacher_pb2.ScoreRequest(
            sequences=[_score_sequence(s, r, c) for s, r, c in zip(sequences, response_starts, cands)],
            top_k=top_k, temperature=temperature)
        if stream is None:
            stream = len(sequences) > STREAM_ABOVE
        widths = [0 if c is None else int(np.shape(c)[-1]) for c in cands]
        if not stream and score_response_bytes([len(s) - int(r) for s, r in zip(sequences, response_starts)],
                                               top_k, widths) > self.max_message_bytes:
            log.info("score: the response would exceed one %d MiB message; streaming it instead",
                     self.max_message_bytes >> 20)
            stream = True
        if stream:
            out: list[ScoreResult | None] = [None] * len(sequences)
            for res in self._with_retry_stream(request, timeout):
                out[res.index] = _score_from_wire(res)
            return out  # type: ignore[return-value]
        resp = self.call(self._stub.Score, request, timeout=timeout)
        return [_score_from_wire(r) for r in resp.results]

    def _with_retry_stream(self, request, timeout):
        # collected whole inside one attempt: a retry after a partial delivery starts over, and the
        # caller never sees half a result
        def collect(req, timeout, metadata):
            return list(self._stub.ScoreStream(req, timeout=timeout, metadata=metadata))
        return self.call(collect, request, timeout=timeout)

    def generate(self, prompts: Sequence[Sequence[int] | np.ndarray], *, max_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None, top_k: int = 0,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 timeout: float | None = None) -> list[list[Completion]]:
        """n continuations of up to max_tokens per prefix (temperature 0 = greedy): per prompt, a list."""
        request = teacher_pb2.GenerateRequest(
            prompts=[to_wire(np.asarray(p), "int32") for p in prompts],
            params=sampling_to_wire(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    top_k=top_k, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos))
        resp = self.call(self._stub.Generate, request, timeout=timeout)
        return completions_from_wire(resp, len(prompts))


def _score_sequence(tokens, response_start: int, candidate_ids) -> teacher_pb2.ScoreSequence:
    seq = teacher_pb2.ScoreSequence(tokens=to_wire(np.asarray(tokens), "int32"), response_start=int(response_start))
    if candidate_ids is not None:
        seq.candidate_ids.CopyFrom(to_wire(np.asarray(candidate_ids), "int32"))
    return seq


def _score_from_wire(res: teacher_pb2.ScoreResult) -> ScoreResult:
    token_logprobs = from_wire(res.token_logprobs)
    cand = (from_wire(res.candidate_logprobs) if res.HasField("candidate_logprobs")
            else np.zeros((len(token_logprobs), 0), np.float32))
    return ScoreResult(token_logprobs, from_wire(res.topk_ids), from_wire(res.topk_logprobs), cand)
