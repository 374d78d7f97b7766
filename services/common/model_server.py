"""What the teacher and rollout services share: settings, engine lifecycle, the batched generate
path, GetInfo, /status, and startup. Each service adds only its own RPCs (Score; Sample,
Continue and the weight-update protocol)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Hashable, Literal

import grpc
from prometheus_client import CollectorRegistry
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings

from services.common import validation
from services.common.batcher import BatchStats, DynamicBatcher
from services.common.engine import Engine, SamplingSpec
from services.common.engines import completion_to_wire, load_engine
from services.common.grpc_server import ServerOptions, client_id_of, deadline_of
from services.common.metrics import TrafficStats
from services.common.runner import ServiceRun, start_service
from services.common.status_app import ServiceState
from topd_client.auth import resolve_token
from topd_client.errors import InvalidInputError, UnavailableError
from topd_client.limits import MAX_TEMPERATURE, MIN_TEMPERATURE, generate_response_bytes
from topd_client.wire.topd.v1 import common_pb2


class ModelServerSettings(BaseSettings):
    """Fields every model server has; subclasses set the env prefix and their own defaults."""

    model: str = Field(..., description="Local path, Hugging Face id, or builtin:teacher / builtin:student")
    host: str = Field("127.0.0.1", description="Address to bind (0.0.0.0 in containers)")
    grpc_port: int = Field(..., description="gRPC port (0 = any free port)")
    http_port: int = Field(..., description="REST status port (0 = any free port)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    max_top_k: int = Field(64, description="Largest top-k a caller may ask for")
    max_seq_len: int | None = Field(None, description="Cap on prompt + response length (default: the model's)")
    max_batch_tokens: int = Field(32768, description="Token budget of one merged batch")
    max_wait_ms: float = Field(5.0, description="How long the batcher waits for a batch to fill")
    max_queue_items: int = Field(8192, description="Items waiting before RESOURCE_EXHAUSTED (a request with more "
                                                   "is INVALID_ARGUMENT: it can never fit)")
    max_message_mb: int = Field(256, description="gRPC send/receive message limit (MiB)")
    auth_token: str | None = Field(None, validation_alias=AliasChoices("auth_token", "TOPD_AUTH_TOKEN"),
                                   description="Shared token; when set every RPC needs 'authorization: Bearer <token>' "
                                               "(visible in `ps`: prefer --auth-token-file)")
    auth_token_file: Path | None = Field(None, validation_alias=AliasChoices("auth_token_file", "TOPD_AUTH_TOKEN_FILE"),
                                         description="File holding the shared token (read at start, whitespace stripped)")
    public_status: bool = Field(False, description="With auth on, leave /status, /metrics and /docs open (probes "
                                                   "/healthz and /readyz are always open)")
    reflection: Literal["auto", "on", "off"] = Field("auto", description="gRPC reflection; auto = on without auth, "
                                                                         "off with auth")
    grpc_workers: int = Field(64, ge=1, description="Threads serving RPCs (health and GetInfo have their own)")
    max_pending_rpcs: int = Field(1024, ge=1, description="RPCs running or waiting for a thread before "
                                                          "RESOURCE_EXHAUSTED")
    max_request_streams: int = Field(8, ge=1, description="Client-streaming RPCs (weight updates, reflection) open "
                                                          "at once; each holds a thread while its client is silent")
    max_clients: int = Field(64, ge=1, description="Client ids with their own series in /metrics and /status; "
                                                   "beyond, 'other' (idle ones give their place up after 10 min)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM: how long calls in flight may finish "
                                                            "(new work is refused meanwhile)")
    seed: int = Field(0, description="Engine seed")
    kv_cache_mb: int | None = Field(None, description="vLLM KV cache size in MiB (default: 64 on CPU; on GPU sized "
                                                      "from gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(0.4, description="Fraction of GPU memory vLLM may take (teacher and "
                                                            "rollout on one GPU must add up to < 1 with room for the trainer)")

    @model_validator(mode="after")
    def _one_token_source(self) -> "ModelServerSettings":
        if self.auth_token and self.auth_token_file:
            raise ValueError("set auth_token or auth_token_file, not both")
        return self

    def server_options(self, token: str | None) -> ServerOptions:
        reflection = self.reflection == "on" or (self.reflection == "auto" and token is None)
        return ServerOptions(max_message_bytes=self.max_message_mb << 20, auth_token=token, reflection=reflection,
                             workers=self.grpc_workers, max_pending=self.max_pending_rpcs,
                             request_streams=self.max_request_streams)


class ModelServerCore:
    """Engine + batcher + traffic stats; no gRPC in here (testable on its own).

    Every engine call runs under `engine_lock` and reports `version`, so a weight update (rollout)
    lands between batches: a batch in flight finishes on the weights it started with.
    """

    role = "model"

    def __init__(self, settings: ModelServerSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.version = 0
        self.instance_id = uuid.uuid4().hex  # clients notice a restart when it changes
        self.engine_lock = threading.Lock()
        self.stats = TrafficStats(registry, max_clients=settings.max_clients)
        self.batcher = DynamicBatcher(self._run_batch, max_batch_tokens=settings.max_batch_tokens,
                                      max_wait_s=settings.max_wait_ms / 1000, max_queue_items=settings.max_queue_items,
                                      on_batch=self._on_batch)

    def load(self) -> None:
        s = self.settings
        self.engine = load_engine(s.engine, s.model, device=s.device, dtype=s.dtype, max_top_k=s.max_top_k,
                                  max_seq_len=s.max_seq_len, seed=s.seed, kv_cache_mb=s.kv_cache_mb,
                                  gpu_memory_utilization=s.gpu_memory_utilization, **self.engine_options())

    def engine_options(self) -> dict[str, Any]:
        """Extra `load_engine` arguments of one service."""
        return {}

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError(f"{self.role} model is still loading; retry shortly")
        return self.engine

    def close(self) -> None:
        self.batcher.close()
        if self.engine is not None:
            self.engine.close()

    def _run_batch(self, key: Hashable, payloads: list) -> list:
        """Generate batches: per payload, its completions with the version that produced them."""
        spec: SamplingSpec = key[1]
        with self.engine_lock:
            version = self.version
            outs = self.require_engine().generate(payloads, spec)
        grouped: list[list] = [[] for _ in payloads]
        for o in outs:
            grouped[o.prompt_index].append((o, version))
        return grouped

    def _on_batch(self, stats: BatchStats) -> None:
        self.stats.record_batch(stats.tokens)
        self.stats.queue_depth.set(self.batcher.depth)

    def generate(self, method: str, prompts: list, params: common_pb2.SamplingParams,
                 context: grpc.ServicerContext) -> common_pb2.GenerateResponse:
        """Validate sampling, queue the prompts for batching, pack the completions."""
        start = time.monotonic()
        if not prompts:
            raise InvalidInputError(f"empty batch: {method} got no prompts")
        validation.request_items(len(prompts), self.settings.max_queue_items)
        meta = self.require_engine().meta
        spec = validation.sampling_spec(params, meta, self.settings.max_top_k, max(len(p) for p in prompts))
        validation.response_fits(generate_response_bytes(len(prompts), spec.n, spec.max_tokens, spec.top_k),
                                 self.settings.max_message_mb << 20, "split the request into smaller ones")
        ticket = self.batcher.submit(client_id_of(context), ("generate", spec), prompts,
                                     [(len(p) + spec.max_tokens) * spec.n for p in prompts], deadline_of(context))
        context.add_callback(ticket.cancel)
        groups = ticket.results()
        out = [completion_to_wire(o, i, version) for i, g in enumerate(groups) for o, version in g]
        self.stats.record(method, ticket.client_id, sum(len(o.tokens_T) for g in groups for o, _ in g),
                          time.monotonic() - start)
        return common_pb2.GenerateResponse(completions=out)

    def model_info(self) -> common_pb2.ModelInfo:
        """The engine's record (EngineMeta, field for field) plus what this server decides."""
        m = self.require_engine().meta
        return common_pb2.ModelInfo(**{k: v for k, v in asdict(m).items() if k != "extra"},
                                    max_top_k=self.settings.max_top_k, policy_version=self.version,
                                    instance_id=self.instance_id, max_message_bytes=self.settings.max_message_mb << 20,
                                    max_request_items=self.settings.max_queue_items, min_temperature=MIN_TEMPERATURE,
                                    max_temperature=MAX_TEMPERATURE)

    def status(self) -> dict[str, Any]:
        meta = self.engine.meta if self.engine is not None else None
        return {
            "model": self.settings.model if meta is None else meta.model,
            "engine": None if meta is None else meta.engine,
            "device": None if meta is None else meta.device,
            "dtype": None if meta is None else meta.dtype,
            "queue_depth": self.batcher.depth,
            **self.stats.snapshot(),
        }


def start_model_server(name: str, core: ModelServerCore, registry: CollectorRegistry, servicer: Any,
                       add_servicer: Callable[[Any, grpc.Server], None], service_name: str) -> ServiceRun:
    """Bind HTTP + gRPC, load the engine, mark ready; returns once the service can serve."""
    s = core.settings
    token = resolve_token(s.auth_token, s.auth_token_file, env=None)  # the env was read into the settings
    run = start_service(
        ServiceState(name, registry, core.status), host=s.host, grpc_port=s.grpc_port, http_port=s.http_port,
        add_servicers=[lambda server: add_servicer(servicer, server)], service_names=[service_name],
        options=s.server_options(token), http_token=None if s.public_status else token,
        shutdown_grace_s=s.shutdown_grace_s, load=core.load)
    run.on_stop.append(core.close)
    servicer.on_engine_dead = run.fail  # see grpc_server.grpc_errors
    return run
