"""Weight sync from the trainer to its rollout: what the training loop calls after a step.

    result = push(rollout, named_weights(model, dtype), version=step, transport="auto")
    future = push_async(rollout, named_weights(model, dtype), version=step)  # while step + 1 samples
    ...
    future.result()  # before the next push, and at the end of training

A push is one update of the rollout's protocol (BeginUpdate -> bytes -> CommitUpdate): the rollout
keeps serving the previous version until the commit, and pauses serving only for the in-place
apply. Transports: `grpc` streams the bytes; `shm` writes them into a memory-backed directory the
rollout shares (same host, or a tmpfs volume in one pod) and sends only the manifest; `auto` takes
shm when this process can see and write the rollout's shared directory, else grpc.

With an async push, step t + 1 samples while step t's weights travel, so its samples may come from
version t - 1: the loop must accept samples one version old (`max_staleness >= 1`,
`check_async_push`). A push that fails raises from `future.result()`; the rollout then still
serves the last committed version, and pushing again (same or next version) is safe.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Mapping

from topd_client import RolloutClient
from topd_client.errors import ConfigurationError
from topd_client.rollout import TRANSPORTS, WeightUpdateResult

if TYPE_CHECKING:
    import torch

# What a push reports: version, transport, total_bytes, seconds (sender's clock), gb_per_s,
# pause_seconds (serving paused on the rollout), verify_seconds, already_committed (a re-send).
PushResult = WeightUpdateResult


def push(client: RolloutClient, weights: Mapping[str, "torch.Tensor"], version: int,
         transport: str = "auto") -> PushResult:
    """Make the rollout serve `weights` as policy `version`; returns once it does."""
    check_transport(transport)
    return client.update_weights(weights, version, transport=transport)


def push_async(client: RolloutClient, weights: Mapping[str, "torch.Tensor"], version: int,
               transport: str = "auto", *, copy: bool = True) -> "Future[PushResult]":
    """`push` on the client's background thread (pushes run one at a time, in call order).

    The tensors are read while the future runs, and the optimizer changes parameters in place:
    `copy=True` snapshots them first (one copy on the trainer). Pass `copy=False` only when the
    tensors are already private, e.g. `named_weights(model, torch.bfloat16)` cast from float32.
    """
    check_transport(transport)
    if copy:
        weights = {name: t.detach().clone() for name, t in weights.items()}
    return client.update_weights_async(weights, version, transport=transport)


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ConfigurationError(f"weight_transport {transport!r} is not one of {', '.join(TRANSPORTS)}")


def check_async_push(async_push: bool, max_staleness: int) -> None:
    """An async push lets step t + 1 sample from version t - 1: refuse settings that would drop them."""
    if async_push and max_staleness < 1:
        raise ConfigurationError(
            f"async_push needs max_staleness >= 1 (got {max_staleness}): step t + 1 samples while step t's "
            "weights are sent, so its samples may come from the version before; with max_staleness 0 every "
            "one of them would be dropped")
