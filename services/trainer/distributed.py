"""Data parallel under torchrun: one process per rank, each with its own rollout, one teacher shared.

Ranks run different numbers of micro-batches (their branch windows differ), so DDP's per-backward
hooks would hang; gradients are averaged once per step instead, as one flattened all-reduce.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def init() -> tuple[int, int]:
    """(rank, world) under torchrun; initialises the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def shutdown(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def on_rank0(world: int, rank: int, fn: Callable[[], T]) -> T:
    """fn() on rank 0 only (it may write files), its result sent to every rank."""
    if world <= 1:
        return fn()
    import torch.distributed as dist

    box = [fn() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_device(device: str, rank: int, world: int) -> str:
    """With several ranks on one host, rank r takes GPU r (mod the GPUs visible)."""
    if device.startswith("cuda") and world > 1:
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


def average_gradients(model: torch.nn.Module, skipped: bool) -> bool:
    """Average gradients over ranks (each rank's loss is normalised by its own tokens) and agree on
    skipping: one all-reduce of [flattened grads..., skip flag]. Returns True when any rank skipped."""
    import torch.distributed as dist

    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [torch.tensor([float(skipped)], device=params[0].device,
                                                                           dtype=params[0].grad.dtype)])
    dist.all_reduce(flat)
    world = dist.get_world_size()
    any_skipped = bool(flat[-1].item() > 0)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad) / world)
        offset += n
    return any_skipped
