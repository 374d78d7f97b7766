"""Where a weight update's bytes come from, checked before anything is read: the manifest against
the serving model, paths confined to the directories the rollout was given, sizes bounded, and a
private staging file for gRPC buckets.

Sources: "grpc" (buckets, staged here), "shm" (a file the sender wrote in --shm-dir),
"checkpoint_dir" (safetensors under --weights-dir; the manifest is read from their headers) and
"nccl" (no bytes here before the apply: the trainer broadcasts them during it).
"""

from __future__ import annotations

import hashlib

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from services.common.staged_weights import StagedWeights
from services.rollout import verify
from topd_client.errors import InvalidInputError, PreconditionError
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2

SOURCES = {"shm_path": "shm", "checkpoint_dir": "checkpoint_dir", "nccl": "nccl"}  # oneof field -> source
_STAGING = "topd-staging-"


@dataclass(frozen=True)
class UpdateLimits:
    shm_dir: Path | None          # where senders may put shm updates (None: shm off)
    staging_dirs: tuple[Path, ...]  # where gRPC buckets are staged, first with room wins
    weights_dir: Path | None      # where checkpoint_dir updates may come from (None: refused)
    max_update_bytes: int         # 0: only the model's own size bounds an update
    idle_timeout_s: float
    nccl: bool = False            # takes updates broadcast over NCCL (vLLM on a GPU)
    owner_lease_s: float = 600.0  # how long the last committed update's owner keeps the rollout to itself


def source_of(req: rollout_pb2.BeginUpdateRequest) -> str:
    return SOURCES.get(req.WhichOneof("source"), "grpc")


def update_layout(req: rollout_pb2.BeginUpdateRequest, limits: UpdateLimits, shapes: Mapping[str, tuple[int, ...]],
                  tied: Mapping[str, str]) -> tuple[StagedWeights, str]:
    """The update's tensors, checked against the model, and where their bytes are ("" for buckets
    and nccl)."""
    source = source_of(req)
    if source == "checkpoint_dir":
        origin, staged = _checkpoint(req.checkpoint_dir, limits.weights_dir)
    else:
        specs = [(t.name, t.dtype, tuple(t.shape)) for t in req.manifest.tensors]
        verify.check_layout(specs, shapes, tied)
        total = StagedWeights.from_layout(specs, "").total_bytes
        if req.manifest.total_bytes != total:
            raise InvalidInputError(f"manifest total_bytes {req.manifest.total_bytes} != {total}, the size of its "
                                    "tensors")
        if source == "nccl" and not limits.nccl:
            raise PreconditionError("this rollout takes no nccl updates: start it with --weight-transfer nccl")
        origin = _shm_file(req.shm_path, total, limits.shm_dir) if source == "shm" else ""
        staged = StagedWeights.from_layout(specs, origin, via="nccl" if source == "nccl" else "files")
    verify.check_layout([(t.name, t.dtype, t.shape) for t in staged.tensors], shapes, tied)
    cap = limits.max_update_bytes
    if cap and staged.total_bytes > cap:
        raise InvalidInputError(f"update of {staged.total_bytes / 2**20:.1f} MiB exceeds --max-update-mb "
                                f"{cap / 2**20:.0f}")
    return staged, origin


def _checkpoint(checkpoint_dir: str, root: Path | None) -> tuple[str, StagedWeights]:
    if root is None:
        raise PreconditionError("checkpoint_dir updates are off: start the rollout with --weights-dir DIR to "
                                "allow checkpoints under DIR")
    path = _confined(Path(checkpoint_dir), root, "checkpoint_dir")
    if not path.is_dir():
        raise InvalidInputError(f"checkpoint_dir {checkpoint_dir}: not a directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidInputError(f"checkpoint_dir {checkpoint_dir}: no *.safetensors files")
    for f in files:
        _confined(f, root, "checkpoint_dir file")
    try:
        return str(path), StagedWeights.from_safetensors(files)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"checkpoint_dir {checkpoint_dir}: {exc}") from None


def _shm_file(shm_path: str, total: int, root: Path | None) -> str:
    if root is None:
        raise PreconditionError("shm updates are off on this rollout (no --shm-dir); use the grpc transport")
    path = _confined(Path(shm_path), root, "shm_path")
    if not path.is_file():
        raise InvalidInputError(f"shm_path {shm_path}: not a regular file")
    size = path.stat().st_size
    if size != total:
        raise InvalidInputError(f"shm_path {shm_path} has {size} bytes; the manifest says {total}")
    return str(path)


def _confined(path: Path, root: Path, what: str) -> Path:
    """`path` with symlinks and .. resolved, refused unless it lies under `root` (resolved too)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidInputError(f"{what} {path}: does not exist") from None
    if not real.is_relative_to(root.resolve()):
        raise InvalidInputError(f"{what} {path} is outside {root}; only paths under it are accepted")
    return real


class StagingArea:
    """Rollout-private files that gRPC buckets are written into, in the first staging dir with room
    (a tmpfs by default, where a staged update costs memory: 1x its size, removed at its end)."""

    def __init__(self, dirs: tuple[Path, ...]) -> None:
        self.dirs = dirs
        self._dir: Path | None = None

    def create(self, staged: StagedWeights, update_id: str) -> tuple[StagedWeights, int]:
        """The update's layout in a new file, and that file open for writing."""
        total = staged.total_bytes
        for base in self.dirs:
            try:
                base.mkdir(parents=True, exist_ok=True)
                if shutil.disk_usage(base).free >= total + (64 << 20):
                    break
            except OSError:
                continue
        else:
            raise PreconditionError(f"no room to stage a {total / 2**20:.0f} MiB update in "
                                    f"{', '.join(map(str, self.dirs))}; set --staging-dir")
        if self._dir is None or self._dir.parent != base:
            self.close()
            _sweep(base)
            self._dir = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{socket.gethostname()}-{os.getpid()}-", dir=base))
        path = self._dir / f"{update_id}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return StagedWeights.from_layout([(t.name, t.dtype, t.shape) for t in staged.tensors], path), fd

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _sweep(base: Path) -> None:
    """Remove staging dirs that rollouts of this host left behind when they died (1x a payload
    each, in memory when the dir is a tmpfs); a dir named with this process's pid is a previous
    incarnation's (containers restart as pid 1)."""
    host = socket.gethostname()
    for d in base.glob(f"{_STAGING}{host}-*"):
        pid = d.name[len(_STAGING) + len(host) + 1:].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            if int(pid) != os.getpid():
                os.kill(int(pid), 0)
                continue
        except ProcessLookupError:
            pass
        except OSError:
            continue  # alive, another user's
        shutil.rmtree(d, ignore_errors=True)


def layout_key(staged: StagedWeights) -> str:
    """A digest of the tensors' names, dtypes and shapes: two updates with it can replace each other."""
    h = hashlib.sha256()
    for t in sorted(staged.tensors, key=lambda t: t.name):
        h.update(f"{t.name}|{t.dtype}|{list(t.shape)};".encode())
    return h.hexdigest()


def weight_sync_info(limits: UpdateLimits, probe: str, token: str) -> common_pb2.WeightSyncInfo:
    return common_pb2.WeightSyncInfo(shm_dir=str(limits.shm_dir or ""), shm_probe=probe if limits.shm_dir else "",
                                     shm_token=token if limits.shm_dir else "",
                                     max_update_bytes=limits.max_update_bytes, idle_timeout_s=limits.idle_timeout_s,
                                     nccl=limits.nccl)
