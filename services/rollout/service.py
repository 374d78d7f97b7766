"""The rollout service: the student policy of one trainer, with live, atomic weight updates.

Every engine call (a merged batch of samples, or a weight update) runs under one lock, so a batch
in flight finishes on the weights it started with and reports that version; an update waits for it,
then later batches see the new weights.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge

from services.common import validation
from services.common.grpc_server import grpc_errors
from services.common.model_server import ModelServerCore, start_model_server
from services.common.runner import ServiceRun
from services.rollout import weights
from services.rollout.settings import RolloutSettings
from topd_client.errors import InvalidInputError, PreconditionError
from topd_client.wire.topd.v1 import rollout_pb2, rollout_pb2_grpc

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name


class RolloutCore(ModelServerCore):
    """Adds the policy version, weight updates and prompt rendering to the shared core."""

    role = "student"

    def __init__(self, settings: RolloutSettings, registry: CollectorRegistry) -> None:
        super().__init__(settings, registry)
        self.tokenizer = None
        self.last_update: dict = {}
        self._version_gauge = Gauge("topd_policy_version", "Policy version now serving", registry=registry)
        self._update_seconds = Gauge("topd_last_update_seconds", "Duration of the last weight update",
                                     registry=registry)

    def load(self) -> None:
        from transformers import AutoTokenizer

        super().load()
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine.meta.model)

    def update(self, update: weights.WeightUpdate) -> tuple[int, int, float]:
        engine = self.require_engine()
        tensors = weights.check_against(update.tensors, engine.weight_shapes())
        start = time.monotonic()
        with self.engine_lock:
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
        return {**super().status(), "policy_version": self.version, "last_update": self.last_update}


class RolloutServicer(rollout_pb2_grpc.RolloutServicer):
    """Thin: validate, submit to the batcher (or the update protocol), pack."""

    def __init__(self, core: RolloutCore) -> None:
        self.core = core

    @grpc_errors
    def GetInfo(self, request, context):
        return self.core.model_info()

    @grpc_errors
    def Sample(self, request, context):
        prompts = [self.core.render_prompt(p, i) for i, p in enumerate(request.prompts)]
        return self.core.generate("Sample", prompts, request.params, context)

    @grpc_errors
    def Continue(self, request, context):
        meta = self.core.require_engine().meta
        prefixes = [validation.token_ids(p, f"prefixes[{i}]", meta) for i, p in enumerate(request.prefixes)]
        return self.core.generate("Continue", prefixes, request.params, context)

    @grpc_errors
    def UpdateWeights(self, request_iterator, context):
        update = weights.receive(request_iterator, self.core.version)
        version, n, seconds = self.core.update(update)
        return rollout_pb2.UpdateWeightsResponse(version=version, num_tensors=n, apply_seconds=seconds)


def start_rollout(settings: RolloutSettings) -> ServiceRun:
    """Start the rollout service (returns once the student is loaded and the service is ready)."""
    registry = CollectorRegistry()
    core = RolloutCore(settings, registry)
    return start_model_server("rollout", core, registry, RolloutServicer(core),
                              rollout_pb2_grpc.add_RolloutServicer_to_server, SERVICE_NAME)
