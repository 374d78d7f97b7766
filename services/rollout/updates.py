"""The rollout's weight-update protocol: BeginUpdate -> SendBuckets -> CommitUpdate | AbortUpdate.

A small state machine with one update in flight. BeginUpdate checks the version and the manifest
against the serving model and stages the update (a rollout-private file for gRPC buckets, the
sender's file in the shared directory, or a checkpoint directory under --weights-dir); buckets are
written straight into the staged file at their offset (memory: ~1x the payload, no join, no
decode); CommitUpdate verifies every byte (checksum, finiteness, a tied lm_head) and only then
hands the update to the target to apply, which is the only time serving pauses.

Status codes: calls out of order (no such update, bytes before Begin, commit before the last
byte, a stale version) are FAILED_PRECONDITION; a second update while one is in flight is refused
at once with RESOURCE_EXHAUSTED, retryable on purpose: the slot frees itself (commit, abort, or the
idle timeout), so a later retry succeeds with nobody fixing anything, which is what that code
tells a client (FAILED_PRECONDITION would tell it to give up). Streams and updates with no progress
for `idle_timeout_s` are cut, so a silent client holds no thread and no memory for long.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.engine import WeightsUnchangedError
from services.common.staged_weights import StagedWeights
from services.rollout import verify
from services.rollout.lease import OwnerLease
from services.rollout.sources import StagingArea, UpdateLimits, layout_key, source_of, update_layout
from topd_client.errors import InvalidInputError, OverloadedError, PreconditionError, TopdError
from topd_client.weights import DEFAULT_ALGORITHM, new_hasher, split_checksum
from topd_client.wire.topd.v1 import rollout_pb2

log = logging.getLogger(__name__)


class UpdateTarget(Protocol):
    """What the protocol needs from the rollout: the serving version, the model's layout, and an
    apply that swaps weights and version together under the engine lock."""

    version: int

    def weight_layout(self) -> tuple[Mapping[str, tuple[int, ...]], Mapping[str, str]]:
        """(name -> shape of every weight, tied alias -> the weight it shares)."""

    def apply_update(self, staged: StagedWeights, version: int) -> float:
        """Apply in place and serve `version`; returns the seconds serving paused."""


@dataclass
class _Update:
    update_id: str
    version: int
    source: str                   # "grpc" | "shm" | "checkpoint_dir"
    origin: str                   # the shm path or checkpoint dir ("" for grpc): part of the identity
    key: str                      # digest of names, dtypes and shapes
    staged: StagedWeights
    claimed: str                  # checksum from the manifest ("" when it comes at commit)
    total: int
    started: float
    last_activity: float
    hasher: Any = None            # grpc: hashes bytes as they arrive
    algorithm: str = ""
    fd: int | None = None         # grpc: the staging file, open for writing
    received: int = 0
    stream: Any = None            # the open SendBuckets stream's context
    committing: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None           # the commit's response or exception, for commits that waited
    owner: str = ""               # who sends it (BeginUpdateRequest.owner)

    def identity(self) -> tuple:
        return self.version, self.source, self.origin, self.key


@dataclass(frozen=True)
class _Committed:
    update_id: str
    version: int
    key: str
    checksum: str
    response: rollout_pb2.UpdateWeightsResponse


class WeightUpdates:
    """One rollout's weight-update state: at most one update in flight, the last one committed."""

    def __init__(self, target: UpdateTarget, limits: UpdateLimits, registry: CollectorRegistry) -> None:
        self.target = target
        self.limits = limits
        self._lock = threading.Lock()
        self._inflight: _Update | None = None
        self._committed: _Committed | None = None
        self.lease = OwnerLease(limits.owner_lease_s)
        self._ended: dict[str, str] = {}  # recent update ids that ended without a commit -> why
        self._stream: _OpenStream | None = None  # the one SendBuckets stream allowed at a time
        self._staging = StagingArea(limits.staging_dirs)
        self._stop = threading.Event()
        self.outcomes = Counter("topd_weight_updates", "Weight updates by source and outcome",
                                ["source", "outcome"], registry=registry)
        self.pause = Histogram("topd_weight_update_pause_seconds", "How long serving paused to apply an update",
                               registry=registry, buckets=(.01, .03, .1, .3, 1, 3, 10, 30, 100))
        self.seconds = Histogram("topd_weight_update_seconds", "BeginUpdate to the end of the commit",
                                 ["source"], registry=registry, buckets=(.1, .3, 1, 3, 10, 30, 100, 300))
        self._reaper = threading.Thread(target=self._reap_loop, name="topd-update-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------------ begin
    def begin(self, req: rollout_pb2.BeginUpdateRequest) -> rollout_pb2.BeginUpdateResponse:
        source = source_of(req)
        try:
            return self._begin(req, source)
        except TopdError:
            self.outcomes.labels(source, "refused").inc()
            raise

    def _begin(self, req: rollout_pb2.BeginUpdateRequest, source: str) -> rollout_pb2.BeginUpdateResponse:
        staged, origin = update_layout(req, self.limits, *self.target.weight_layout())
        claimed = _canonical(req.manifest.checksum)
        key = layout_key(staged)
        with self._lock:
            self.lease.check(req.owner)
            repeat = self._resend_answer(req.version, key, claimed)
            if repeat is not None:
                return rollout_pb2.BeginUpdateResponse(update_id=self._committed.update_id, committed=repeat)
            u = self._inflight
            if u is not None:
                if u.identity() == (req.version, source, origin, key) and (not claimed or claimed == u.claimed):
                    self._cancel_stream(u)  # a re-sent Begin: its sender's earlier stream is gone
                    u.last_activity = time.monotonic()
                    return rollout_pb2.BeginUpdateResponse(update_id=u.update_id, received_bytes=u.received)
                raise OverloadedError(
                    f"update busy: version {u.version} ({u.update_id[:8]}) is in flight, idle "
                    f"{time.monotonic() - u.last_activity:.1f} s; one update at a time (it ends at its commit or "
                    f"abort, or after {self.limits.idle_timeout_s:.0f} s without progress): retry later")
            update_id, fd = uuid.uuid4().hex, None
            if source == "grpc":
                staged, fd = self._staging.create(staged, update_id)
            now = time.monotonic()
            u = _Update(update_id, req.version, source, origin, key, staged, claimed, staged.total_bytes, now, now,
                        fd=fd, owner=req.owner)
            self._inflight = u
        log.info("update %s: version %d from %s, %d tensors, %.1f MiB", update_id[:8], u.version, source,
                 len(staged.tensors), u.total / 2**20)
        return rollout_pb2.BeginUpdateResponse(update_id=update_id)

    def release(self, owner: str) -> bool:
        """The owner gives the rollout up (its run ended); True when it was the owner."""
        with self._lock:
            return self.lease.release(owner)

    def _resend_answer(self, version: int, key: str, claimed: str) -> rollout_pb2.UpdateWeightsResponse | None:
        """Version checks: above the serving one, or equal to the last commit (a re-send: answered
        here when the checksum says it is the same update, else decided at commit)."""
        serving, c = self.target.version, self._committed
        if c is not None and version == c.version == serving:
            if claimed and (claimed != c.checksum or key != c.key):
                raise PreconditionError(f"stale update: version {version} already serves other weights "
                                        f"(checksum {c.checksum[:20]}...)")
            return _repeat(c.response) if claimed else None
        if version <= serving:
            raise PreconditionError(f"stale update: version {version} is not above the serving version {serving}")
        return None

    # ------------------------------------------------------------------ buckets
    def receive(self, buckets: Iterable[rollout_pb2.WeightBucket], context: grpc.ServicerContext
                ) -> rollout_pb2.SendBucketsResponse:
        """Write each bucket at its offset into the staged file; aborted the moment it overflows."""
        stream = _OpenStream(context)
        with self._lock:
            if self._stream is not None:
                self.outcomes.labels("grpc", "refused").inc()
                raise OverloadedError("another SendBuckets stream is open (one at a time); retry once it ends")
            self._stream = stream
        try:
            u = None
            for bucket in buckets:
                with self._lock:
                    stream.last = time.monotonic()
                    u = self._bucket_update(bucket, stream, u)
                    self._write(u, bucket)
            if u is None:
                raise InvalidInputError("SendBuckets got no buckets")
            return rollout_pb2.SendBucketsResponse(received_bytes=u.received)
        except TopdError:
            self.outcomes.labels("grpc", "refused").inc()
            raise
        finally:
            with self._lock:
                if self._stream is stream:
                    self._stream = None
                if u is not None and u.stream is stream:
                    u.stream = None

    def _bucket_update(self, bucket: rollout_pb2.WeightBucket, stream: "_OpenStream", u: _Update | None) -> _Update:
        if u is None:
            u = self._require(bucket.update_id, "SendBuckets")
            if u.source != "grpc":
                raise PreconditionError(f"update {bucket.update_id[:8]} takes its bytes from {u.source}, not buckets")
            u.stream = stream
        elif bucket.update_id and bucket.update_id != u.update_id:
            raise InvalidInputError("one SendBuckets stream carries one update")
        if self._inflight is not u or u.stream is not stream:
            raise PreconditionError(f"update {u.update_id[:8]} was {self._ended.get(u.update_id, 'superseded by a re-sent BeginUpdate')}")
        if u.committing:
            raise PreconditionError(f"update {u.update_id[:8]} is being committed; no more bytes")
        return u

    def _write(self, u: _Update, bucket: rollout_pb2.WeightBucket) -> None:
        if bucket.offset != u.received:
            raise PreconditionError(f"bucket at offset {bucket.offset}, but {u.received} bytes were received: "
                                    "resume at received_bytes (BeginUpdate answers it)")
        data = bucket.data
        if u.received + len(data) > u.total:
            u.stream = None  # this stream ends with the error below, not with a cancel
            self._end(u, f"aborted: its bytes exceeded the manifest's total_bytes {u.total}")
            raise InvalidInputError(f"update overflow: {u.received + len(data)} bytes exceed the announced "
                                    f"total_bytes {u.total}; aborted")
        if u.hasher is None:
            u.algorithm = split_checksum(u.claimed)[0] if u.claimed else DEFAULT_ALGORITHM
            u.hasher = new_hasher(u.algorithm)
        written = 0
        while written < len(data):
            written += os.pwrite(u.fd, memoryview(data)[written:], u.received + written)
        u.hasher.update(data)
        u.received += len(data)
        u.last_activity = time.monotonic()

    # ------------------------------------------------------------------ commit / abort
    def commit(self, req: rollout_pb2.CommitUpdateRequest) -> rollout_pb2.UpdateWeightsResponse:
        with self._lock:
            c = self._committed
            if c is not None and c.update_id == req.update_id:
                return _repeat(c.response)  # a retried commit whose answer was lost
            u = self._require(req.update_id, "CommitUpdate")
            if not u.committing:
                checksum = self._commit_checksum(u, req.checksum)
                u.committing = True
                self._cancel_stream(u)
                first = True
            else:
                first = False
        if not first:  # the same commit re-sent while it runs: share its outcome
            u.done.wait()
            if isinstance(u.outcome, BaseException):
                raise u.outcome
            return _repeat(u.outcome)
        done = u.done  # a retryable failure gives the update a fresh event for the next commit
        try:
            u.outcome = self._verify_and_apply(u, checksum)
            return u.outcome
        except BaseException as exc:
            u.outcome = exc
            raise
        finally:
            done.set()

    def _commit_checksum(self, u: _Update, given: str) -> str:
        """The checksum to verify against ("" only for a checkpoint dir: the one computed is kept)."""
        if u.received < u.total and u.source == "grpc":
            raise PreconditionError(f"update {u.update_id[:8]} has {u.received} of {u.total} bytes: send the rest "
                                    "before CommitUpdate")
        given = _canonical(given)
        if u.claimed and given and given != u.claimed:
            raise InvalidInputError(f"checksum at commit {given[:24]}... differs from the manifest's {u.claimed[:24]}...")
        if not (u.claimed or given or u.source in ("checkpoint_dir", "nccl")):
            raise InvalidInputError("no checksum: give '<algorithm>:<hex>' in the manifest or at CommitUpdate")
        return u.claimed or given

    def _verify_and_apply(self, u: _Update, checksum: str) -> rollout_pb2.UpdateWeightsResponse:
        receive_s = time.monotonic() - u.started
        t0 = time.monotonic()
        algorithm, digest = split_checksum(checksum) if checksum else (DEFAULT_ALGORITHM, "")
        hasher = None if u.hasher is not None and u.algorithm == algorithm else new_hasher(algorithm)
        try:
            if u.source == "nccl":  # no bytes here before the apply: they arrive during it
                staged = u.staged
            else:
                _, tied = self.target.weight_layout()
                staged = verify.check_bytes(u.staged, tied, hasher)
                got = (hasher or u.hasher).hexdigest()
                if digest and got != digest:
                    raise InvalidInputError(f"corrupt update: {algorithm} {got[:12]}... does not match "
                                            f"{digest[:12]}...")
                checksum = f"{algorithm}:{got}"
            verify_s = time.monotonic() - t0
            with self._lock:
                repeat = self._resend_answer(u.version, u.key, checksum)
            if repeat is not None:  # a re-send whose checksum only came now: nothing to apply
                self._finish(u, None, "already_committed")
                return repeat
            pause_s = self.target.apply_update(staged, u.version)
        except WeightsUnchangedError:  # nothing changed (vLLM refused a prefix-cache reset): commit again
            with self._lock:
                u.committing, u.done = False, threading.Event()
            raise
        except Exception as exc:
            outcome = "refused" if isinstance(exc, (InvalidInputError, PreconditionError)) else "failed"
            self._finish(u, f"{outcome}: {exc}", outcome)
            raise
        response = rollout_pb2.UpdateWeightsResponse(
            version=u.version, num_tensors=len(staged.to_apply()), pause_seconds=pause_s, verify_seconds=verify_s,
            receive_seconds=receive_s, total_bytes=u.total, source=u.source, checksum=checksum)
        with self._lock:
            self._committed = _Committed(u.update_id, u.version, u.key, checksum, response)
            self.lease.committed(u.owner)
        self._finish(u, None, "committed")
        self.pause.observe(pause_s)
        self.seconds.labels(u.source).observe(time.monotonic() - u.started)
        log.info("update %s: version %d serving (%.1f MiB from %s; receive %.2f s, verify %.2f s, pause %.3f s)",
                 u.update_id[:8], u.version, u.total / 2**20, u.source, receive_s, verify_s, pause_s)
        return response

    def abort(self, req: rollout_pb2.AbortUpdateRequest) -> rollout_pb2.AbortUpdateResponse:
        with self._lock:
            c = self._committed
            if c is not None and c.update_id == req.update_id:
                raise PreconditionError(f"update {req.update_id[:8]} is committed (version {c.version} serves)")
            u = self._require(req.update_id, "AbortUpdate")
            if u.committing:
                raise PreconditionError(f"update {req.update_id[:8]} is being applied; too late to abort")
            self._end(u, "aborted by its sender")
        self.outcomes.labels(u.source, "aborted").inc()
        return rollout_pb2.AbortUpdateResponse()

    # ------------------------------------------------------------------ state
    def _require(self, update_id: str, method: str) -> _Update:
        u = self._inflight
        if u is not None and u.update_id == update_id:
            return u
        if update_id in self._ended:
            raise PreconditionError(f"{method}: update {update_id[:8]} was {self._ended[update_id]}")
        raise PreconditionError(f"{method}: no update {update_id[:8] or '(empty id)'} in flight; call BeginUpdate first")

    def _finish(self, u: _Update, why: str | None, outcome: str) -> None:
        with self._lock:
            self._end(u, why or "committed")
        self.outcomes.labels(u.source, outcome).inc()

    def _end(self, u: _Update, why: str) -> None:
        """Drop the update and its staging file (caller holds the lock)."""
        if self._inflight is u:
            self._inflight = None
        self._ended[u.update_id] = why
        while len(self._ended) > 64:
            self._ended.pop(next(iter(self._ended)))
        self._cancel_stream(u)
        if u.fd is not None:
            os.close(u.fd)
            u.fd = None
            for path in {t.path for t in u.staged.tensors}:
                Path(path).unlink(missing_ok=True)

    def _cancel_stream(self, u: _Update) -> None:
        if u.stream is not None:
            u.stream.context.cancel()
            u.stream = None

    def _reap_loop(self) -> None:
        interval = max(0.05, min(1.0, self.limits.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            self.reap_idle()

    def reap_idle(self) -> None:
        """Cut a silent stream and abort an update without progress for idle_timeout_s."""
        limit, now = self.limits.idle_timeout_s, time.monotonic()
        with self._lock:
            s = self._stream
            if s is not None and now - s.last > limit:
                log.warning("SendBuckets stream idle for %.0f s: cut", now - s.last)
                s.context.cancel()
                self._stream = None
            u = self._inflight
            if u is not None and not u.committing and now - u.last_activity > limit:
                log.warning("update %s (version %d) idle for %.0f s: aborted", u.update_id[:8], u.version,
                            now - u.last_activity)
                self._end(u, f"aborted: no progress for {limit:.0f} s")
                self.outcomes.labels(u.source, "idle").inc()

    def status(self) -> dict:
        with self._lock:
            u = self._inflight
            owner = {"owner": self.lease.owner or None}
            return owner if u is None else {**owner,
                "update_id": u.update_id, "version": u.version, "source": u.source, "received_bytes": u.received,
                "total_bytes": u.total, "committing": u.committing,
                "idle_s": round(time.monotonic() - u.last_activity, 1)}

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._inflight is not None:
                self._end(self._inflight, "aborted: the rollout stopped")
        self._staging.close()


@dataclass
class _OpenStream:
    context: grpc.ServicerContext
    last: float = field(default_factory=time.monotonic)


def _canonical(checksum: str) -> str:
    """'SHA256:AB..' style variations compare equal; "" stays "" (refused later if it is needed)."""
    return ":".join(split_checksum(checksum)) if checksum else ""


def _repeat(r: rollout_pb2.UpdateWeightsResponse) -> rollout_pb2.UpdateWeightsResponse:
    out = rollout_pb2.UpdateWeightsResponse()
    out.CopyFrom(r)
    out.already_committed = True
    return out
