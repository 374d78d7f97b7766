"""`RolloutClient`: samples and near-future windows from the student, and live weight updates."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

import numpy as np

from topd_client._channel import BaseClient
from topd_client.errors import ConfigurationError, OverloadedError, UnavailableError
from topd_client.results import Completion, ModelInfo, completions_from_wire, info_from_wire, sampling_to_wire
from topd_client.tensors import to_wire
from topd_client.weights import DEFAULT_ALGORITHM, ShmFile, WeightPayload, new_hasher
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "grpc", "shm", "nccl")

PromptLike = Union[str, Sequence[int], np.ndarray, Sequence[Mapping[str, str]]]


def _prompt_to_wire(p: PromptLike) -> rollout_pb2.Prompt:
    if isinstance(p, str):
        return rollout_pb2.Prompt(text=p)
    if isinstance(p, (list, tuple)) and p and isinstance(p[0], Mapping):
        return rollout_pb2.Prompt(messages=rollout_pb2.ChatMessages(
            messages=[rollout_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in p]))
    return rollout_pb2.Prompt(token_ids=to_wire(np.asarray(p), "int32"))


class RolloutClient(BaseClient):
    """Client of one trainer's rollout service.

    >>> rollout = RolloutClient("127.0.0.1:50052")
    >>> rollout.sample(["What is 2+3?"], max_tokens=64, n=4)[0][0].tokens
    >>> rollout.update_weights(model.state_dict(), version=1)           # shm when shared, else gRPC
    >>> future = rollout.update_weights_async(snapshot, version=2)       # while the next step samples
    """

    kind = "rollout"

    def __init__(self, address: str, *, nccl_address: str = "127.0.0.1", owner: str = "", **kwargs) -> None:
        """nccl_address: where the rollout's GPU worker reaches this process (nccl transport only).
        owner: who this client's weight updates come from (a trainer's "client-id/run-id"); the rollout
        then refuses updates from anyone else while this owner keeps updating it."""
        super().__init__(address, **kwargs)
        self.owner = owner
        self._stub = rollout_pb2_grpc.RolloutStub(self._channel)
        self._push_pool: ThreadPoolExecutor | None = None
        self._shm_file = ShmFile()
        self.nccl_address = nccl_address
        self._nccl: Any = None

    def info(self) -> ModelInfo:
        return info_from_wire(self.call(self._stub.GetInfo, common_pb2.InfoRequest()))

    def sample(self, prompts: Sequence[PromptLike], *, max_tokens: int, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, top_k: int = 0, stop: Sequence[str] = (),
               stop_token_ids: Sequence[int] = (), timeout: float | None = None) -> list[list[Completion]]:
        """n samples per prompt (token ids, text, or chat messages); each carries its policy version."""
        request = rollout_pb2.SampleRequest(
            prompts=[_prompt_to_wire(p) for p in prompts],
            params=sampling_to_wire(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    top_k=top_k, stop=stop, stop_token_ids=stop_token_ids))
        return completions_from_wire(self.call(self._stub.Sample, request, timeout=timeout), len(prompts))

    def continue_from(self, prefixes: Sequence[Sequence[int] | np.ndarray], *, max_tokens: int, n: int = 1,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
                      ignore_eos: bool = False, timeout: float | None = None) -> list[list[Completion]]:
        """K-token continuations from token prefixes: the student's near-future windows."""
        request = rollout_pb2.ContinueRequest(
            prefixes=[to_wire(np.asarray(p), "int32") for p in prefixes],
            params=sampling_to_wire(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    top_k=top_k, ignore_eos=ignore_eos))
        return completions_from_wire(self.call(self._stub.Continue, request, timeout=timeout), len(prefixes))

    # ------------------------------------------------------------------ weight updates
    def update_weights(self, weights: "Mapping[str, torch.Tensor] | str | Path", version: int, *,
                       transport: str = "auto", bucket_mb: int = 4,
                       timeout: float | None = None) -> WeightUpdateResult:
        """Make the rollout serve `weights` as policy `version` (BeginUpdate -> bytes -> CommitUpdate).

        `weights` is a state dict (floating tensors) or a checkpoint directory under the rollout's
        `--weights-dir`. transport: "grpc" streams buckets; "shm" writes one file into the
        directory the rollout shares (same host or pod) and sends only the manifest; "auto" takes
        shm when this process can see and write the rollout's shared directory; "nccl" broadcasts
        CUDA tensors to a vLLM rollout on a GPU (`topd_client.nccl`). Retried calls are safe:
        re-sending an update that is already serving answers with its result.
        """
        start = time.perf_counter()
        if isinstance(weights, (str, Path)):
            begin = self.begin_update(version, checkpoint_dir=str(weights), timeout=timeout)
            resp = begin.committed if begin.HasField("committed") else self.commit_update(begin.update_id,
                                                                                           timeout=timeout)
            return WeightUpdateResult.from_wire(resp, "checkpoint_dir", time.perf_counter() - start)
        if transport == "nccl":
            resp = self._nccl_sender().push(weights, version, timeout)
            return WeightUpdateResult.from_wire(resp, "nccl", time.perf_counter() - start)
        payload = WeightPayload.from_state_dict(weights)
        shm_dir = self.shm_dir(transport)
        if shm_dir is not None:
            resp = self._push_shm(payload, version, shm_dir, timeout)
        else:
            resp = self._push_grpc(payload, version, bucket_mb << 20, timeout)
        return WeightUpdateResult.from_wire(resp, "grpc" if shm_dir is None else "shm", time.perf_counter() - start)

    def update_weights_async(self, weights: "Mapping[str, torch.Tensor] | str | Path", version: int,
                             **kwargs: Any) -> "Future[WeightUpdateResult]":
        """`update_weights` on this client's background thread: one update at a time, in call order.

        The tensors are read while the future runs: pass a snapshot that nothing modifies until
        it is done (the rollout serves the previous version until the commit).
        """
        if self._push_pool is None:
            self._push_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="topd-weight-push")
        return self._push_pool.submit(self.update_weights, weights, version, **kwargs)

    def shm_dir(self, transport: str = "auto") -> Path | None:
        """The rollout's shared directory when `transport` resolves to shm here, else None (grpc)."""
        if transport not in TRANSPORTS:
            raise ConfigurationError(f"unknown weight transport {transport!r}; valid: {', '.join(TRANSPORTS)}")
        if transport in ("grpc", "nccl"):
            return None
        sync = self.call(self._stub.GetInfo, common_pb2.InfoRequest()).weight_sync
        shared = _shared_dir(sync)
        if shared is None and transport == "shm":
            raise ConfigurationError(
                f"weight transport shm: the rollout at {self.address} shares no directory with this process "
                f"(it reports shm_dir={sync.shm_dir!r}; here it is missing, unwritable, or another host's); "
                "mount one memory-backed volume in both and set the rollout's --shm-dir, or use grpc / auto")
        return shared

    def begin_update(self, version: int, manifest: rollout_pb2.Manifest | None = None, *, shm_path: str = "",
                     checkpoint_dir: str = "", nccl: bool = False,
                     timeout: float | None = None) -> rollout_pb2.BeginUpdateResponse:
        """Open an update. While another one holds the rollout's single slot (RESOURCE_EXHAUSTED),
        keep retrying until the rollout's idle timeout would have freed it: the slot of a sender
        that died is freed that way (with retries=0, no waiting)."""
        request = rollout_pb2.BeginUpdateRequest(version=version, manifest=manifest, owner=self.owner)
        if nccl:
            request.nccl = True
        if shm_path:
            request.shm_path = shm_path
        if checkpoint_dir:
            request.checkpoint_dir = checkpoint_dir
        deadline = None
        while True:
            try:
                return self.call(self._stub.BeginUpdate, request, timeout=timeout)
            except OverloadedError:
                if deadline is None and self.retries != 0:
                    idle = self.call(self._stub.GetInfo, common_pb2.InfoRequest()).weight_sync.idle_timeout_s
                    deadline = time.monotonic() + (idle or 30.0) + 5.0
                if deadline is None or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def send_buckets(self, buckets: Iterator[rollout_pb2.WeightBucket], *,
                     timeout: float | None = None) -> rollout_pb2.SendBucketsResponse:
        """Stream an update's buckets (not retried here: the caller resumes at `received_bytes`)."""
        return self.call(self._stub.SendBuckets, buckets, timeout=timeout, retry=False)

    def commit_update(self, update_id: str, checksum: str = "", *,
                      timeout: float | None = None) -> rollout_pb2.UpdateWeightsResponse:
        return self.call(self._stub.CommitUpdate, rollout_pb2.CommitUpdateRequest(update_id=update_id,
                                                                                  checksum=checksum),
                         timeout=timeout)

    def release_owner(self, *, timeout: float | None = None) -> bool:
        """Give up this client's ownership of the rollout (its run ended): others may update it now."""
        if not self.owner:
            return False
        return self.call(self._stub.ReleaseOwner, rollout_pb2.ReleaseOwnerRequest(owner=self.owner),
                         timeout=timeout).released

    def abort_update(self, update_id: str, *, timeout: float | None = None) -> None:
        self.call(self._stub.AbortUpdate, rollout_pb2.AbortUpdateRequest(update_id=update_id), timeout=timeout)

    def _push_grpc(self, payload: WeightPayload, version: int, bucket_bytes: int,
                   timeout: float | None) -> rollout_pb2.UpdateWeightsResponse:
        """Stream the buckets, hashing what is sent; after a broken stream, re-Begin and resume."""
        algorithm = DEFAULT_ALGORITHM
        attempts = 5 if self.retries is None else self.retries + 1
        for attempt in range(attempts):
            begin = self.begin_update(version, payload.manifest, timeout=timeout)
            if begin.HasField("committed"):
                return begin.committed
            hasher = new_hasher(algorithm)
            for view in payload.views(stop=begin.received_bytes):  # resuming: the prefix it already has
                hasher.update(view)
            try:
                if begin.received_bytes < payload.total_bytes:
                    self.send_buckets(payload.buckets(begin.update_id, bucket_bytes, begin.received_bytes, hasher),
                                      timeout=timeout)
                return self.commit_update(begin.update_id, f"{algorithm}:{hasher.hexdigest()}", timeout=timeout)
            except UnavailableError:  # the stream broke: the update stays in flight, resumable
                if attempt == attempts - 1:
                    self._abort_quietly(begin.update_id)
                    raise
                time.sleep(self.backoff_s * 2 ** attempt)
            except Exception:
                self._abort_quietly(begin.update_id)
                raise
        raise AssertionError("unreachable")

    def _push_shm(self, payload: WeightPayload, version: int, shm_dir: Path,
                  timeout: float | None) -> rollout_pb2.UpdateWeightsResponse:
        """Write the bytes into the shared directory, send the manifest, commit."""
        path, checksum = self._shm_file.write(payload, shm_dir)
        try:
            manifest = rollout_pb2.Manifest()
            manifest.CopyFrom(payload.manifest)
            manifest.checksum = checksum
            begin = self.begin_update(version, manifest, shm_path=str(path), timeout=timeout)
            if begin.HasField("committed"):
                return begin.committed
            try:
                return self.commit_update(begin.update_id, timeout=timeout)
            except Exception:
                self._abort_quietly(begin.update_id)
                raise
        except Exception:
            self._shm_file.discard()
            raise

    def _nccl_sender(self) -> Any:
        if self._nccl is None:
            from topd_client.nccl import NcclSender

            self._nccl = NcclSender(self, self.nccl_address)
        return self._nccl

    def _abort_quietly(self, update_id: str) -> None:
        try:
            self.abort_update(update_id, timeout=10)
        except Exception as exc:  # noqa: BLE001 - best effort: the rollout's idle timeout cleans up too
            log.debug("abort of update %s failed: %s", update_id, exc)

    def close(self) -> None:
        if self._push_pool is not None:
            self._push_pool.shutdown(wait=True)
        self._shm_file.discard()
        if self._nccl is not None:
            self._nccl.close()
        super().close()


def _shared_dir(sync: common_pb2.WeightSyncInfo) -> Path | None:
    """The rollout's shm_dir if this process sees the same directory (its probe file holds its token)
    and may write there; None otherwise."""
    if not (sync.shm_dir and sync.shm_probe and sync.shm_token):
        return None
    root = Path(sync.shm_dir)
    try:
        seen = (root / sync.shm_probe).read_text().strip()
    except OSError:
        return None
    return root if seen == sync.shm_token and os.access(root, os.W_OK | os.X_OK) else None


@dataclass(frozen=True)
class WeightUpdateResult:
    """What one weight update cost, as the sender and the rollout measured it."""

    version: int
    num_tensors: int
    total_bytes: int
    transport: str              # how this call sent it: "grpc", "shm", "nccl" or "checkpoint_dir"
    seconds: float              # the whole update, on the sender's clock
    pause_seconds: float        # serving paused (the in-place apply only)
    verify_seconds: float
    receive_seconds: float
    already_committed: bool     # a re-send of the update already serving

    @classmethod
    def from_wire(cls, r: rollout_pb2.UpdateWeightsResponse, transport: str, seconds: float) -> "WeightUpdateResult":
        return cls(r.version, r.num_tensors, r.total_bytes, transport, seconds, r.pause_seconds, r.verify_seconds,
                   r.receive_seconds, r.already_committed)

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
