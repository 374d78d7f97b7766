"""The rollout service: the student policy of one trainer, with live, atomic weight updates.

Every engine call (a merged batch of samples, or a weight update) runs under one lock, so a batch
in flight finishes on the weights it started with and reports that version; an update waits for it,
then later batches see the new weights.
"""

from __future__ import annotations

import threading
import time
from typing import Hashable

from prometheus_client import CollectorRegistry, Gauge

from services.common import validation
from services.common.batcher import BatchStats, DynamicBatcher
from services.common.engine import Engine, SamplingSpec
from services.common.engines import completion_to_wire, load_engine
from services.common.grpc_server import client_id_of, deadline_of, grpc_errors
from services.common.metrics import TrafficStats
from services.common.runner import ServiceRun, start_service
from services.common.status_app import ServiceState
from services.rollout import weights
from services.rollout.settings import RolloutSettings
from topd_client.errors import InvalidInputError, PreconditionError, UnavailableError
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name


class RolloutCore:
    """Engine, version, batcher; no gRPC in here."""

    def __init__(self, settings: RolloutSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.tokenizer = None
        self.version = 0
        self.last_update: dict = {}
        self._engine_lock = threading.Lock()
        self.stats = TrafficStats(registry)
        self._version_gauge = Gauge("topd_policy_version", "Policy version now serving", registry=registry)
        self._update_seconds = Gauge("topd_last_update_seconds", "Duration of the last weight update",
                                     registry=registry)
        self.batcher = DynamicBatcher(self._run_batch, max_batch_tokens=settings.max_batch_tokens,
                                      max_wait_s=settings.max_wait_ms / 1000, max_queue_items=settings.max_queue_items,
                                      on_batch=self._on_batch)

    def load(self) -> None:
        from transformers import AutoTokenizer

        s = self.settings
        self.engine = load_engine(s.engine, s.model, device=s.device, dtype=s.dtype, max_top_k=s.max_top_k,
                                  max_seq_len=s.max_seq_len, seed=s.seed,
                                  kv_cache_mb=s.kv_cache_mb, gpu_memory_utilization=s.gpu_memory_utilization)
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine.meta.model)

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("student model is still loading; retry shortly")
        return self.engine

    def close(self) -> None:
        self.batcher.close()
        if self.engine is not None:
            self.engine.close()

    def _run_batch(self, key: Hashable, prompts: list) -> list:
        spec: SamplingSpec = key[1]
        with self._engine_lock:
            version = self.version
            outs = self.require_engine().generate(prompts, spec)
        grouped: list[list] = [[] for _ in prompts]
        for o in outs:
            grouped[o.prompt_index].append((o, version))
        return grouped

    def _on_batch(self, stats: BatchStats) -> None:
        self.stats.record_batch(stats.tokens)
        self.stats.queue_depth.set(self.batcher.depth)

    def update(self, update: weights.WeightUpdate) -> tuple[int, int, float]:
        engine = self.require_engine()
        tensors = weights.check_against(update.tensors, engine.weight_shapes())
        start = time.monotonic()
        with self._engine_lock:
            if update.version <= self.version:  # re-checked under the lock: two racing updates
                raise PreconditionError(f"stale update: version {update.version} is not above {self.version}")
            payload_ok = update.payload is not None and len(tensors) == len(update.tensors)
            if payload_ok and hasattr(engine, "load_weights_bytes"):
                engine.load_weights_bytes(update.payload)  # already verified: no decode/encode round trip
            else:
                engine.load_weights(tensors)
            self.version = update.version
        seconds = time.monotonic() - start
        self.last_update = {"version": update.version, "at": time.time(), "apply_seconds": round(seconds, 4),
                            "num_tensors": len(tensors), "source": update.checkpoint_dir or "stream"}
        self._version_gauge.set(update.version)
        self._update_seconds.set(seconds)
        return update.version, len(tensors), seconds

    def render_prompt(self, prompt: rollout_pb2.Prompt, index: int):
        meta = self.require_engine().meta
        kind = prompt.WhichOneof("prompt")
        if kind == "token_ids":
            return validation.token_ids(prompt.token_ids, f"prompts[{index}].token_ids", meta)
        if kind is None:
            raise InvalidInputError(f"prompts[{index}]: set one of token_ids, text, messages")
        tok = self.tokenizer
        if kind == "messages" or tok.chat_template:
            messages = ([{"role": m.role, "content": m.content} for m in prompt.messages.messages]
                        if kind == "messages" else [{"role": "user", "content": prompt.text}])
            if not tok.chat_template:
                raise InvalidInputError(f"prompts[{index}]: chat messages given but the tokenizer has no chat template")
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt.text)["input_ids"]
        from topd_client.tensors import to_wire
        return validation.token_ids(to_wire(ids, "int32"), f"prompts[{index}] (rendered)", meta)

    def status(self) -> dict:
        meta = self.engine.meta if self.engine is not None else None
        return {
            "model": self.settings.model if meta is None else meta.model,
            "engine": None if meta is None else meta.engine, "device": None if meta is None else meta.device,
            "dtype": None if meta is None else meta.dtype, "policy_version": self.version,
            "last_update": self.last_update, "queue_depth": self.batcher.depth, **self.stats.snapshot(),
        }


class RolloutServicer(rollout_pb2_grpc.RolloutServicer):
    """Thin: validate, submit to the batcher (or the update protocol), pack."""

    def __init__(self, core: RolloutCore) -> None:
        self.core = core

    @grpc_errors
    def GetInfo(self, request, context):
        m = self.core.require_engine().meta
        return common_pb2.ModelInfo(model=m.model, revision=m.revision, vocab_size=m.vocab_size,
                                    max_seq_len=m.max_seq_len, dtype=m.dtype, engine=m.engine, device=m.device,
                                    tokenizer_fingerprint=m.tokenizer_fingerprint, eos_token_id=m.eos_token_id,
                                    max_top_k=self.core.settings.max_top_k, policy_version=self.core.version)

    def _generate(self, method: str, prompts: list, params, context) -> common_pb2.GenerateResponse:
        start = time.monotonic()
        if not prompts:
            raise InvalidInputError(f"empty batch: {method} got no prompts")
        meta = self.core.require_engine().meta
        spec = validation.sampling_spec(params, meta, self.core.settings.max_top_k, max(len(p) for p in prompts))
        ticket = self.core.batcher.submit(client_id_of(context), ("generate", spec), prompts,
                                          [(len(p) + spec.max_tokens) * spec.n for p in prompts], deadline_of(context))
        context.add_callback(ticket.cancel)
        groups = ticket.results()
        out = [completion_to_wire(o, i, version) for i, g in enumerate(groups) for o, version in g]
        self.core.stats.record(method, ticket.client_id, sum(len(o.tokens_T) for g in groups for o, _ in g),
                               time.monotonic() - start)
        return common_pb2.GenerateResponse(completions=out)

    @grpc_errors
    def Sample(self, request, context):
        prompts = [self.core.render_prompt(p, i) for i, p in enumerate(request.prompts)]
        return self._generate("Sample", prompts, request.params, context)

    @grpc_errors
    def Continue(self, request, context):
        meta = self.core.require_engine().meta
        prefixes = [validation.token_ids(p, f"prefixes[{i}]", meta) for i, p in enumerate(request.prefixes)]
        return self._generate("Continue", prefixes, request.params, context)

    @grpc_errors
    def UpdateWeights(self, request_iterator, context):
        update = weights.receive(request_iterator, self.core.version)
        version, n, seconds = self.core.update(update)
        return rollout_pb2.UpdateWeightsResponse(version=version, num_tensors=n, apply_seconds=seconds)


def start_rollout(settings: RolloutSettings) -> ServiceRun:
    """Start the rollout service (returns once the student is loaded and the service is ready)."""
    registry = CollectorRegistry()
    core = RolloutCore(settings, registry)
    state = ServiceState("rollout", registry, core.status)
    servicer = RolloutServicer(core)
    run = start_service(
        state, host=settings.host, grpc_port=settings.grpc_port, http_port=settings.http_port,
        add_servicers=[lambda server: rollout_pb2_grpc.add_RolloutServicer_to_server(servicer, server)],
        service_names=[SERVICE_NAME], max_message_bytes=settings.max_message_mb << 20,
        auth_token=settings.auth_token, load=core.load)
    run.on_stop.append(core.close)
    return run
