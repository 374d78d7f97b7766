"""Teacher service settings: defaults < env TOPD_TEACHER_* < CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.model_server import ModelServerSettings


class TeacherSettings(ModelServerSettings):
    """Serve a teacher model: token logprobs, top-k and near-future continuations over gRPC."""

    model_config = SettingsConfigDict(env_prefix="TOPD_TEACHER_", frozen=True, populate_by_name=True,
                                      protected_namespaces=())

    model: str = Field("builtin:teacher", description="Local path, Hugging Face id, or builtin:teacher")
    grpc_port: int = Field(50051, description="gRPC port (0 = any free port)")
    http_port: int = Field(8001, description="REST status port (0 = any free port)")
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="auto = vllm on a GPU, hf on a CPU")
    gpu_memory_utilization: float = Field(0.45, description="Fraction of GPU memory vLLM may take")
    max_candidate_ids: int = Field(64, ge=0, description="Most caller-chosen candidate ids per scored row (0 = none); "
                                                         "the built-in task's whole vocabulary is 41")
