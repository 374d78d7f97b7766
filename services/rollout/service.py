"""The rollout service: the student policy of one trainer, with live, atomic weight updates.

Every engine call (a merged batch of samples, or applying a weight update) runs under one lock, so
a batch in flight finishes on the weights it started with and reports that version; an update
waits for it, then later batches see the new weights. Receiving and verifying an update
(`updates.WeightUpdates`) happen outside that lock: serving pauses only for the apply.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge

from services.common import validation
from services.common.engine import EngineDeadError, WeightsUnchangedError
from services.common.grpc_server import grpc_errors
from services.common.model_server import ModelServerCore, start_model_server
from services.common.runner import ServiceRun
from services.common.staged_weights import StagedWeights
from services.rollout.settings import RolloutSettings
from services.rollout.shared_dir import open_shared_dir, update_limits
from services.rollout.sources import weight_sync_info
from services.rollout.updates import WeightUpdates
from topd_client.errors import InvalidInputError, PreconditionError
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name


class UpdateRolledBackError(RuntimeError):
    """Applying an update failed half-way; the base weights and version 0 serve instead (INTERNAL)."""


class RolloutCore(ModelServerCore):
    """Adds the policy version, weight updates and prompt rendering to the shared core."""

    role = "student"

    def __init__(self, settings: RolloutSettings, registry: CollectorRegistry) -> None:
        super().__init__(settings, registry)
        self.tokenizer = None
        self.last_update: dict = {}
        self._version_gauge = Gauge("topd_policy_version", "Policy version now serving", registry=registry)
        self._update_seconds = Gauge("topd_last_update_seconds", "How long serving paused for the last weight "
                                     "update", registry=registry)
        self.shared = open_shared_dir(settings.shm_dir)
        self.updates = WeightUpdates(self, update_limits(settings, self.shared), registry)

    def load(self) -> None:
        from transformers import AutoTokenizer

        super().load()
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine.meta.model)

    def engine_options(self) -> dict:
        return {"weight_transfer": self.settings.weight_transfer}

    def init_weight_transfer(self, init_info_json: str) -> None:
        """Join the trainer's NCCL group (blocks until the trainer's side joins too)."""
        try:
            init_info = json.loads(init_info_json)
        except ValueError as exc:
            raise InvalidInputError(f"init_info_json is not JSON: {exc}") from None
        engine = self.require_engine()
        with self.engine_lock:
            engine.init_weight_transfer(init_info)

    def close(self) -> None:
        self.updates.close()
        if self.shared is not None:
            self.shared.remove_probe()
        super().close()

    # ------------------------------------------------------------------ UpdateTarget
    def weight_layout(self) -> tuple[Mapping[str, tuple[int, ...]], Mapping[str, str]]:
        engine = self.require_engine()
        return engine.weight_shapes(), engine.tied_weights()

    def apply_update(self, staged: StagedWeights, version: int) -> float:
        """Apply and bump the version together under the engine lock (batches finish on the weights
        they started with). If the apply fails half-way, the engine reloads its base checkpoint and
        the version goes back to 0 with it, so no sample ever reports weights it was not made with."""
        engine = self.require_engine()
        with self.engine_lock:
            start = time.monotonic()
            try:
                engine.apply_weights(staged)
            except (WeightsUnchangedError, EngineDeadError, PreconditionError):
                raise  # nothing was changed, or nothing can be done any more
            except Exception as exc:
                self._restore_base(exc, version)
            self.version = version
            seconds = time.monotonic() - start
        self.last_update = {"version": version, "at": time.time(), "pause_seconds": round(seconds, 4),
                            "num_tensors": len(staged.to_apply())}
        self._version_gauge.set(version)
        self._update_seconds.set(seconds)
        return seconds

    def _restore_base(self, exc: Exception, version: int) -> None:
        log.error("applying version %d failed (%s): restoring the base weights", version, exc)
        try:
            self.require_engine().restore_base_weights()
        except Exception as restore_exc:  # noqa: BLE001 - the weights are now unknown: restart
            raise EngineDeadError(f"applying version {version} failed ({exc}) and restoring the base weights "
                                  f"failed too ({restore_exc})") from restore_exc
        self.version = 0
        self._version_gauge.set(0)
        message = f"applying version {version} failed ({exc}); the rollout rolled back to its base weights, version 0"
        if isinstance(exc, InvalidInputError):  # found only during the apply (nccl): still the caller's input
            raise InvalidInputError(message) from exc
        raise UpdateRolledBackError(f"{type(exc).__name__}: {message}") from exc

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
        return {**super().status(), "policy_version": self.version, "last_update": self.last_update,
                "update_in_flight": self.updates.status()}

    def model_info(self) -> common_pb2.ModelInfo:
        info = super().model_info()
        shared = self.shared
        info.weight_sync.CopyFrom(weight_sync_info(self.updates.limits, shared.probe if shared else "",
                                                   shared.token if shared else ""))
        return info


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
    def BeginUpdate(self, request, context):
        self.core.require_engine()
        return self.core.updates.begin(request)

    @grpc_errors
    def SendBuckets(self, request_iterator, context):
        return self.core.updates.receive(request_iterator, context)

    @grpc_errors
    def CommitUpdate(self, request, context):
        return self.core.updates.commit(request)

    @grpc_errors
    def AbortUpdate(self, request, context):
        return self.core.updates.abort(request)

    @grpc_errors
    def ReleaseOwner(self, request, context):
        return rollout_pb2.ReleaseOwnerResponse(released=self.core.updates.release(request.owner))

    @grpc_errors
    def InitWeightTransfer(self, request, context):
        self.core.init_weight_transfer(request.init_info_json)
        return rollout_pb2.InitWeightTransferResponse()


def start_rollout(settings: RolloutSettings) -> ServiceRun:
    """Start the rollout service (returns once the student is loaded and the service is ready)."""
    registry = CollectorRegistry()
    core = RolloutCore(settings, registry)
    return start_model_server("rollout", core, registry, RolloutServicer(core),
                              rollout_pb2_grpc.add_RolloutServicer_to_server, SERVICE_NAME)
