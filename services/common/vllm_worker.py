"""vLLM worker extension: in-place weight updates and a scoring temperature, run inside the worker.

`VLLMEngine` passes `worker_extension_cls="services.common.vllm_worker.TopdWorkerExtension"`, so
vLLM mixes this class into its worker (in the engine-core process) and the engine reaches these
methods with `llm.collective_rpc("topd_...", args=...)`.

Arguments cross a process boundary as msgpack, where a torch tensor turns into nested lists, so
weights do not travel at all: the worker gets where each tensor's bytes are (a staged update's
files) and reads them itself. Nothing in this module imports vLLM at import time; the worker has
already imported it when these methods run.
"""

from __future__ import annotations

from typing import Any

import torch


class TopdWorkerExtension:
    """Methods added to the vLLM worker (`self` is the worker: `self.model_runner`, `self.reload_weights`)."""

    model_runner: Any
    reload_weights: Any

    def topd_apply_staged(self, rows: list) -> int:
        """Reload every weight in place from a staged update (`StagedWeights.to_tuples()`), read
        from its files one tensor at a time; then re-pack a tied CPU lm_head and zero the KV cache.
        Returns the tensor count."""
        from services.common.staged_weights import StagedWeights

        staged = StagedWeights.from_tuples(rows)
        self.reload_weights(weights_iterator=staged.iter_tensors(), is_checkpoint_format=True)
        self.topd_after_reload()
        return len(staged.tensors)

    def topd_after_reload(self) -> None:
        """Re-pack a tied CPU lm_head and zero the KV cache (after any in-place reload)."""
        _repack_tied_cpu_lm_head(self.model_runner.get_model())
        _zero_kv_cache(self.model_runner)

    def topd_first_nonfinite(self) -> str:
        """The first weight holding NaN or inf, "" when none: all an nccl update can be checked for."""
        for name, p in self.model_runner.get_model().named_parameters():
            if p.numel():
                lo, hi = torch.aminmax(p)
                if not (torch.isfinite(lo) and torch.isfinite(hi)):
                    return name
        return ""

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


def _zero_kv_cache(model_runner: Any) -> None:
    """Zero every KV-cache block. Freed blocks keep what was computed with the old weights, and
    attention reads masked slots of a block too (weight 0 times NaN is NaN): vLLM served NaN under a
    clean update after a NaN one. Cheap: the cache is tens of MiB on CPU, memset speed on a GPU."""
    def zero(caches: Any) -> None:
        if isinstance(caches, torch.Tensor):
            caches.zero_()
        elif isinstance(caches, (list, tuple)):
            for c in caches:
                zero(c)

    zero(getattr(model_runner, "kv_caches", None))


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
