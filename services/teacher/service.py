"""The teacher service: validate, hand to the shared batcher, return. One teacher, many trainers."""

from __future__ import annotations

import logging
import math
import time
from typing import Hashable, Iterator

from prometheus_client import CollectorRegistry

from services.common import validation
from services.common.batcher import Ticket
from services.common.engine import ScoreOutput
from services.common.grpc_server import client_id_of, deadline_of, grpc_errors
from services.common.model_server import ModelServerCore, start_model_server
from services.common.runner import ServiceRun
from services.teacher.settings import TeacherSettings
from topd_client.errors import InvalidInputError, PreconditionError
from topd_client.limits import score_response_bytes, score_result_bytes
from topd_client.tensors import to_wire
from topd_client.wire.topd.v1 import teacher_pb2, teacher_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name
# Batcher cost of candidate ids: this many ids weigh as much as one token (see `score_cost`).
CANDIDATE_IDS_PER_TOKEN = 256


def score_cost(length: int, rows: int, num_candidates: int) -> int:
    """Token-budget cost of one scored sequence: its length plus rows * c / CANDIDATE_IDS_PER_TOKEN.

    Candidate ids add 8 bytes per id on the wire (in and out) and a gather per row: 32 x 128-token
    sequences with c = 20 or 41 on 96 rows each scored within noise (0.90-1.01x) of plain scoring
    here (bench/teacher_candidates.py). The charge, +12% for c = 41, errs on the safe side and
    keeps a request with a large c from filling a batch far beyond its token count.
    """
    return length + math.ceil(rows * num_candidates / CANDIDATE_IDS_PER_TOKEN)


class TeacherCore(ModelServerCore):
    """Adds scoring batches to the shared core (which handles generate batches)."""

    role = "teacher"

    def _run_batch(self, key: Hashable, payloads: list) -> list:
        if key[0] != "score":
            return super()._run_batch(key, payloads)
        _, k, temperature = key
        with self.engine_lock:
            return self.require_engine().score([p[0] for p in payloads], [p[1] for p in payloads], k, temperature,
                                               candidate_ids=[p[2] for p in payloads])

    def max_candidate_ids(self) -> int:
        """The setting, or less where the engine cannot serve candidate ids (it says why in meta.extra)."""
        cap = self.require_engine().meta.extra.get("max_candidate_ids")
        return self.settings.max_candidate_ids if cap is None else min(cap, self.settings.max_candidate_ids)

    def model_info(self):
        info = super().model_info()
        info.max_candidate_ids = self.max_candidate_ids()
        return info


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    """Thin: validate, submit to the batcher, wait, pack."""

    def __init__(self, core: TeacherCore) -> None:
        self.core = core

    @grpc_errors
    def GetInfo(self, request, context):
        return self.core.model_info()

    def _submit_score(self, request: teacher_pb2.ScoreRequest, context, unary: bool) -> tuple[Ticket, list[int]]:
        meta = self.core.require_engine().meta
        if not request.sequences:
            raise InvalidInputError("empty batch: ScoreRequest.sequences is empty")
        validation.request_items(len(request.sequences), self.core.settings.max_queue_items)
        k = validation.top_k(request.top_k, self.core.settings.max_top_k)
        temperature = validation.temperature(request.temperature if request.HasField("temperature") else 1.0,
                                             greedy_ok=False)
        payloads, rows, costs, widths = [], [], [], []
        for i, seq in enumerate(request.sequences):
            ids = validation.token_ids(seq.tokens, f"sequences[{i}].tokens", meta, max_len=meta.max_score_len)
            r = seq.response_start
            if not 1 <= r <= len(ids):
                raise InvalidInputError(f"sequences[{i}].response_start {r} out of range [1, {len(ids)}] "
                                        f"(the first token has no prediction to score)")
            cands = self._candidate_ids(seq, f"sequences[{i}].candidate_ids", len(ids) - r)
            payloads.append((ids, r, cands))
            rows.append(len(ids) - r)
            costs.append(score_cost(len(ids), len(ids) - r, 0 if cands is None else cands.shape[1]))
            widths.append(0 if cands is None else cands.shape[1])
        limit = self.core.settings.max_message_mb << 20
        if unary:
            validation.response_fits(score_response_bytes(rows, k, widths), limit,
                                     "call ScoreStream (one message per sequence; the SDK switches by itself)")
        else:
            worst = max(range(len(rows)), key=lambda i: score_result_bytes(rows[i], k, widths[i]))
            validation.response_fits(score_result_bytes(rows[worst], k, widths[worst]), limit,
                                     "one sequence's scores must fit one message: lower top_k or the candidate "
                                     "ids, or score fewer response tokens")
        ticket = self.core.batcher.submit(client_id_of(context), ("score", k, float(temperature)), payloads,
                                          costs, deadline_of(context))
        context.add_callback(ticket.cancel)
        return ticket, rows

    def _candidate_ids(self, seq: teacher_pb2.ScoreSequence, what: str, rows: int):
        """The sequence's validated candidate ids [R, c], or None when it names none."""
        if not seq.HasField("candidate_ids"):
            return None
        engine = self.core.require_engine()
        limit = self.core.max_candidate_ids()
        if limit == 0 and "max_candidate_ids" in engine.meta.extra:
            raise PreconditionError(f"{what}: this teacher serves no candidate ids "
                                    f"({engine.meta.extra['candidate_ids']})")
        return validation.candidate_ids(seq.candidate_ids, what, rows, engine.meta, limit)

    @staticmethod
    def _score_result(index: int, out: ScoreOutput) -> teacher_pb2.ScoreResult:
        res = teacher_pb2.ScoreResult(index=index, token_logprobs=to_wire(out.token_logprobs_R, "float32"),
                                      topk_ids=to_wire(out.topk_ids_Rk, "int32"),
                                      topk_logprobs=to_wire(out.topk_logprobs_Rk, "float32"))
        if out.candidate_logprobs_Rc is not None:
            res.candidate_logprobs.CopyFrom(to_wire(out.candidate_logprobs_Rc, "float32"))
        return res

    @grpc_errors
    def Score(self, request, context):
        start = time.monotonic()
        ticket, rows = self._submit_score(request, context, unary=True)
        results = [self._score_result(i, out) for i, out in enumerate(ticket.results())]
        self.core.stats.record("Score", ticket.client_id, sum(rows), time.monotonic() - start)
        return teacher_pb2.ScoreResponse(results=results)

    @grpc_errors
    def ScoreStream(self, request, context) -> Iterator[teacher_pb2.ScoreResult]:
        start = time.monotonic()
        ticket, rows = self._submit_score(request, context, unary=False)
        for i, out in enumerate(ticket.iter_results()):
            yield self._score_result(i, out)
        self.core.stats.record("ScoreStream", ticket.client_id, sum(rows), time.monotonic() - start)

    @grpc_errors
    def Generate(self, request, context):
        meta = self.core.require_engine().meta
        validation.request_items(len(request.prompts), self.core.settings.max_queue_items)
        prompts = [validation.token_ids(p, f"prompts[{i}]", meta) for i, p in enumerate(request.prompts)]
        return self.core.generate("Generate", prompts, request.params, context)


def start_teacher(settings: TeacherSettings) -> ServiceRun:
    """Start the teacher (returns once the model is loaded and the service is ready)."""
    registry = CollectorRegistry()
    core = TeacherCore(settings, registry)
    return start_model_server("teacher", core, registry, TeacherServicer(core),
                              teacher_pb2_grpc.add_TeacherServicer_to_server, SERVICE_NAME)
