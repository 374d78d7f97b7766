"""Pick and build an engine from a service's settings."""

from __future__ import annotations

import importlib.util
import logging

from services.common.engine import Engine
from services.common.model_files import resolve_device, resolve_model

log = logging.getLogger(__name__)


def load_engine(kind: str, model: str, *, device: str = "auto", dtype: str = "auto", max_top_k: int = 64,
                max_seq_len: int | None = None, seed: int = 0, kv_cache_mb: int | None = None,
                gpu_memory_utilization: float = 0.4, weight_transfer: str = "off") -> Engine:
    """`auto` = vLLM on a GPU when it is installed, else transformers (on a CPU a torch forward scored
    ~25x faster than vLLM's prompt_logprobs here)."""
    path = resolve_model(model)
    dev = resolve_device(device)
    if kind == "auto":
        kind = "hf"
        if dev.startswith("cuda"):
            if importlib.util.find_spec("vllm") is not None:
                kind = "vllm"
            else:
                log.warning("engine auto: vLLM is not installed, serving on transformers (pip install vllm for speed)")
    if kind == "hf":
        from services.common.engine_hf import HFEngine

        if weight_transfer != "off":
            raise ValueError(f"weight_transfer {weight_transfer!r} needs the vllm engine")

        return HFEngine(path, dtype=dtype, device=dev, max_seq_len=max_seq_len)
    if kind == "vllm":
        from services.common.engine_vllm import VLLMEngine

        if kv_cache_mb is None:  # CPU: vLLM needs an explicit size; GPU: a fraction of device memory
            kv_bytes = 64 << 20 if dev == "cpu" else None
        else:
            kv_bytes = kv_cache_mb << 20
        return VLLMEngine(path, dtype=dtype, device=dev, max_model_len=max_seq_len, max_top_k=max_top_k, seed=seed,
                          kv_cache_bytes=kv_bytes, gpu_memory_utilization=gpu_memory_utilization,
                          weight_transfer=weight_transfer)
    raise ValueError(f"unknown engine {kind!r}; valid: auto, hf, vllm")


def completion_to_wire(out, prompt_index: int, policy_version: int = 0):
    """GenOutput -> wire Completion, numbered by the prompt's index in *its request* (the engine
    batch it ran in may have merged other requests, or held only part of this one)."""
    from topd_client.tensors import to_wire
    from topd_client.wire.topd.v1 import common_pb2

    msg = common_pb2.Completion(prompt_index=prompt_index, sample_index=out.sample_index,
                                tokens=to_wire(out.tokens_T, "int32"), logprobs=to_wire(out.logprobs_T, "float32"),
                                finish_reason=out.finish_reason, policy_version=policy_version)
    if out.topk_ids_Tk.shape[-1] > 0:
        msg.topk_ids.CopyFrom(to_wire(out.topk_ids_Tk, "int32"))
        msg.topk_logprobs.CopyFrom(to_wire(out.topk_logprobs_Tk, "float32"))
    return msg
