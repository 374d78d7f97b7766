"""The teacher service: validate, hand to the shared batcher, return. One teacher, many trainers."""

from __future__ import annotations

import logging
import time
from typing import Hashable, Iterator

from prometheus_client import CollectorRegistry

from services.common.batcher import BatchStats, DynamicBatcher, Ticket
from services.common.engine import Engine, SamplingSpec, ScoreOutput
from services.common.engines import completion_to_wire, load_engine
from services.common.grpc_server import client_id_of, deadline_of, grpc_errors
from services.common.metrics import TrafficStats
from services.common.runner import ServiceRun, start_service
from services.common.status_app import ServiceState
from services.common import validation
from services.teacher.settings import TeacherSettings
from topd_client.errors import InvalidInputError, UnavailableError
from topd_client.tensors import to_wire
from topd_client.wire.topd.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name


class TeacherCore:
    """Engine + batcher + traffic stats; no gRPC in here (testable on its own)."""

    def __init__(self, settings: TeacherSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.stats = TrafficStats(registry)
        self.batcher = DynamicBatcher(self._run_batch, max_batch_tokens=settings.max_batch_tokens,
                                      max_wait_s=settings.max_wait_ms / 1000, max_queue_items=settings.max_queue_items,
                                      on_batch=self._on_batch)

    def load(self) -> None:
        s = self.settings
        self.engine = load_engine(s.engine, s.model, device=s.device, dtype=s.dtype, max_top_k=s.max_top_k,
                                  max_seq_len=s.max_seq_len, seed=s.seed,
                                  kv_cache_mb=s.kv_cache_mb, gpu_memory_utilization=s.gpu_memory_utilization)

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("teacher model is still loading; retry shortly")
        return self.engine

    def close(self) -> None:
        self.batcher.close()
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------- batch work
    def _run_batch(self, key: Hashable, payloads: list) -> list:
        engine = self.require_engine()
        if key[0] == "score":
            _, k, temperature = key
            return engine.score([p[0] for p in payloads], [p[1] for p in payloads], k, temperature)
        spec: SamplingSpec = key[1]
        outs = engine.generate(payloads, spec)
        grouped: list[list] = [[] for _ in payloads]
        for o in outs:
            grouped[o.prompt_index].append(o)
        return grouped

    def _on_batch(self, stats: BatchStats) -> None:
        self.stats.record_batch(stats.tokens)
        self.stats.queue_depth.set(self.batcher.depth)

    def status(self) -> dict:
        meta = self.engine.meta if self.engine is not None else None
        return {
            "model": self.settings.model if meta is None else meta.model,
            "engine": None if meta is None else meta.engine,
            "device": None if meta is None else meta.device,
            "dtype": None if meta is None else meta.dtype,
            "queue_depth": self.batcher.depth,
            **self.stats.snapshot(),
        }


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    """Thin: validate, submit to the batcher, wait, pack."""

    def __init__(self, core: TeacherCore) -> None:
        self.core = core

    @grpc_errors
    def GetInfo(self, request, context):
        m = self.core.require_engine().meta
        return common_pb2.ModelInfo(model=m.model, revision=m.revision, vocab_size=m.vocab_size,
                                    max_seq_len=m.max_seq_len, dtype=m.dtype, engine=m.engine, device=m.device,
                                    tokenizer_fingerprint=m.tokenizer_fingerprint,
                                    max_top_k=self.core.settings.max_top_k, eos_token_id=m.eos_token_id)

    def _submit_score(self, request: teacher_pb2.ScoreRequest, context) -> tuple[Ticket, list[int]]:
        meta = self.core.require_engine().meta
        if not request.sequences:
            raise InvalidInputError("empty batch: ScoreRequest.sequences is empty")
        k = validation.top_k(request.top_k, self.core.settings.max_top_k)
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not temperature > 0:
            raise InvalidInputError(f"temperature {temperature} must be > 0 for scoring")
        payloads, rows = [], []
        for i, seq in enumerate(request.sequences):
            ids = validation.token_ids(seq.tokens, f"sequences[{i}].tokens", meta)
            r = seq.response_start
            if not 1 <= r <= len(ids):
                raise InvalidInputError(f"sequences[{i}].response_start {r} out of range [1, {len(ids)}] "
                                        f"(the first token has no prediction to score)")
            payloads.append((ids, r))
            rows.append(len(ids) - r)
        ticket = self.core.batcher.submit(client_id_of(context), ("score", k, float(temperature)), payloads,
                                          [len(p[0]) for p in payloads], deadline_of(context))
        context.add_callback(ticket.cancel)
        return ticket, rows

    @staticmethod
    def _score_result(index: int, out: ScoreOutput) -> teacher_pb2.ScoreResult:
        return teacher_pb2.ScoreResult(index=index, token_logprobs=to_wire(out.token_logprobs_R, "float32"),
                                       topk_ids=to_wire(out.topk_ids_Rk, "int32"),
                                       topk_logprobs=to_wire(out.topk_logprobs_Rk, "float32"))

    @grpc_errors
    def Score(self, request, context):
        start = time.monotonic()
        ticket, rows = self._submit_score(request, context)
        results = [self._score_result(i, out) for i, out in enumerate(ticket.results())]
        self.core.stats.record("Score", ticket.client_id, sum(rows), time.monotonic() - start)
        return teacher_pb2.ScoreResponse(results=results)

    @grpc_errors
    def ScoreStream(self, request, context) -> Iterator[teacher_pb2.ScoreResult]:
        start = time.monotonic()
        ticket, rows = self._submit_score(request, context)
        for i, out in enumerate(ticket.iter_results()):
            yield self._score_result(i, out)
        self.core.stats.record("ScoreStream", ticket.client_id, sum(rows), time.monotonic() - start)

    @grpc_errors
    def Generate(self, request, context):
        start = time.monotonic()
        meta = self.core.require_engine().meta
        if not request.prompts:
            raise InvalidInputError("empty batch: GenerateRequest.prompts is empty")
        prompts = [validation.token_ids(p, f"prompts[{i}]", meta) for i, p in enumerate(request.prompts)]
        spec = validation.sampling_spec(request.params, meta, self.core.settings.max_top_k,
                                        max(len(p) for p in prompts))
        ticket = self.core.batcher.submit(client_id_of(context), ("generate", spec), prompts,
                                          [(len(p) + spec.max_tokens) * spec.n for p in prompts], deadline_of(context))
        context.add_callback(ticket.cancel)
        groups = ticket.results()
        completions = [completion_to_wire(o, i) for i, group in enumerate(groups) for o in group]
        self.core.stats.record("Generate", ticket.client_id, sum(len(o.tokens_T) for g in groups for o in g),
                               time.monotonic() - start)
        return common_pb2.GenerateResponse(completions=completions)


def start_teacher(settings: TeacherSettings) -> ServiceRun:
    """Start the teacher (returns once the model is loaded and the service is ready)."""
    registry = CollectorRegistry()
    core = TeacherCore(settings, registry)
    state = ServiceState("teacher", registry, core.status)
    servicer = TeacherServicer(core)
    run = start_service(
        state, host=settings.host, grpc_port=settings.grpc_port, http_port=settings.http_port,
        add_servicers=[lambda server: teacher_pb2_grpc.add_TeacherServicer_to_server(servicer, server)],
        service_names=[SERVICE_NAME], max_message_bytes=settings.max_message_mb << 20,
        auth_token=settings.auth_token, load=core.load)
    run.on_stop.append(core.close)
    return run


