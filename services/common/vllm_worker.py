"""vLLM worker extension: in-place weight updates and a scoring temperature, run inside the worker.

`VLLMEngine` passes `worker_extension_cls="services.common.vllm_worker.TopdWorkerExtension"`, so
vLLM mixes this class into its worker (in the engine-core process) and the engine reaches these
methods with `llm.collective_rpc("topd_...", args=...)`.

Arguments cross a process boundary as msgpack, where a torch tensor turns into nested lists, so
weights travel as one safetensors payload (`bytes`) and are decoded here. Nothing in this module
imports vLLM at import time; the worker has already imported it when these methods run.
"""

from __future__ import annotations

from typing import Any

import torch


class TopdWorkerExtension:
    """Methods added to the vLLM worker (`self` is the worker: `self.model_runner`, `self.reload_weights`)."""

    model_runner: Any
    reload_weights: Any

    def topd_load_safetensors(self, payload: bytes) -> int:
        """Reload weights in place from a safetensors payload (checkpoint names); return the tensor count."""
        from safetensors.torch import load

        tensors = load(payload if isinstance(payload, bytes) else bytes(payload))
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        _repack_tied_cpu_lm_head(self.model_runner.get_model())
        return len(tensors)

    def topd_load_checkpoint_dir(self, path: str) -> None:
        """Reload weights in place from the safetensors files in `path` (same architecture)."""
        self.reload_weights(weights_path=path, is_checkpoint_format=True)
        _repack_tied_cpu_lm_head(self.model_runner.get_model())

    def topd_set_logit_scale(self, factor: float) -> float:
        """Multiply the model's logit scale by `factor` (1/temperature); return the previous scale.

        vLLM computes prompt logprobs from the logits processor's output, before any sampling
        processor, so a scoring temperature has to be applied here. The caller restores the
        returned value with `topd_restore_logit_scale` once the scoring call is done.
        """
        processor = _logits_processor(self.model_runner.get_model())
        previous = float(processor.scale)
        processor.scale = previous * float(factor)
        return previous

    def topd_restore_logit_scale(self, scale: float) -> None:
        """Put back the scale `topd_set_logit_scale` returned."""
        _logits_processor(self.model_runner.get_model()).scale = float(scale)


def _logits_processor(model: torch.nn.Module) -> Any:
    processor = getattr(model, "logits_processor", None)
    if processor is None or not hasattr(processor, "scale"):
        raise NotImplementedError(
            f"{type(model).__name__} has no `logits_processor.scale`; score with temperature 1.0")
    return processor


def _repack_tied_cpu_lm_head(model: torch.nn.Module) -> None:
    """Re-pack a CPU `lm_head` that shares its weight with the input embedding.

    On CPU vLLM packs every projection's weight for oneDNN/SGL at load time (`cpu_linear`). A tied
    `lm_head` loads nothing of its own during `reload_weights` (its weight arrives through
    `embed_tokens`), so its packed copy keeps the old values and the logits come out stale (a
    logprob error of ~5 seen here). GPU builds have no packed copy, so this is a no-op there.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embedding_ptrs = {m.weight.data_ptr() for m in model.modules()
                      if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for module in model.modules():
        if (isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear")
                and module.weight.data_ptr() in embedding_ptrs):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
