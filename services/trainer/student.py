"""The student on the trainer's device: loading, and logits at chosen positions only.

Shape suffixes: B rows, L padded sequence length, T positions per row, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def load_student(path: str, device: str):
    """(model, tokenizer), float32 master weights on `device`, train mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.train()
    return model, tokenizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model (also under a DistributedDataParallel-style wrapper)."""
    return getattr(model, "module", model)


def position_logits(model: torch.nn.Module, seqs: Sequence[Tensor], starts: Sequence[int], counts: Sequence[int],
                    device: str) -> Tensor:
    """logits_BTV of the tokens at seq[start .. start+count-1] (predicted at start-1 ...), T = max count.

    The decoder runs over the right-padded rows; the LM head runs only where it is needed
    (prompt positions never reach the vocabulary). Padded [b, t >= count_b] entries are zeros.
    """
    width = max(len(s) for s in seqs)
    ids_BL = torch.zeros((len(seqs), width), dtype=torch.long)
    mask_BL = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BL[b, :len(s)] = s
        mask_BL[b, :len(s)] = 1
    ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
    bare = unwrap(model)
    T = max(counts)
    if T == 0:
        return torch.zeros((len(seqs), 0, bare.config.vocab_size), device=device)
    rows = torch.cat([torch.full((c,), b, dtype=torch.long) for b, c in enumerate(counts)]).to(device)
    t_idx = torch.cat([torch.arange(c) for c in counts]).to(device)
    cols = torch.cat([torch.arange(s - 1, s - 1 + c) for s, c in zip(starts, counts)]).to(device)
    hidden_BLd = bare.get_decoder()(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
    logits_NV = bare.get_output_embeddings()(hidden_BLd[rows, cols])
    out = logits_NV.new_zeros((len(seqs), T, logits_NV.shape[-1]))
    out[rows, t_idx] = logits_NV
    return out.float()


def named_weights(model: torch.nn.Module, dtype: torch.dtype | None = None, on_cpu: bool = True) -> dict[str, Tensor]:
    """Parameters (tied ones once) as the rollout service expects them: on CPU (on their device for
    the nccl transport), in one copy each.

    `dtype` is the rollout's serving dtype: the rollout rounds to it on load anyway (the same
    round-to-nearest cast), so casting here gives the same weights in half the bytes for bfloat16
    (measured on an H100: the weight push was half of a step's time in float32).
    """
    return {n: p.detach().to("cpu" if on_cpu else p.device, dtype=dtype if dtype is not None and p.is_floating_point()
                             else None) for n, p in unwrap(model).named_parameters()}


def serving_dtype(name: str) -> torch.dtype | None:
    """A service's reported dtype name as a torch floating dtype (None for anything else)."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
