"""The rollout's side of the shm transport: a memory-backed directory it shares with its trainer,
and the probe that lets a trainer tell whether it sees the same directory.

A path alone proves nothing (a trainer on another host has its own /dev/shm/topd), so the rollout
writes a file named and filled with a random token; a trainer that reads that token back from
the path GetInfo reports shares the directory, and may write its updates there.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.rollout.settings import RolloutSettings
from services.rollout.sources import UpdateLimits
from topd_client.errors import ConfigurationError

log = logging.getLogger(__name__)
AUTO_SHM_DIR = Path("/dev/shm/topd")


@dataclass(frozen=True)
class SharedDir:
    path: Path
    probe: str
    token: str

    def remove_probe(self) -> None:
        (self.path / self.probe).unlink(missing_ok=True)


def open_shared_dir(setting: str) -> SharedDir | None:
    """Create the directory (auto: /dev/shm/topd when /dev/shm is writable) and its probe file."""
    if setting in ("", "off"):
        return None
    auto = setting == "auto"
    path = AUTO_SHM_DIR if auto else Path(setting)
    if auto and not os.access(path.parent, os.W_OK | os.X_OK):
        log.info("no writable /dev/shm: weight updates come over gRPC only")
        return None
    try:
        if not path.is_dir():
            path.mkdir(parents=not auto)
            if auto:  # shared like /dev/shm itself: any local user's trainer may write its updates here
                path.chmod(0o1777)
        token = secrets.token_hex(16)
        probe = f".topd-rollout-{token[:12]}"
        (path / probe).write_text(token)
    except OSError as exc:
        if auto:
            log.warning("cannot use %s for shm weight updates (%s): gRPC only", path, exc)
            return None
        raise ConfigurationError(f"--shm-dir {path}: {exc}") from exc
    return SharedDir(path, probe, token)


def update_limits(settings: RolloutSettings, shared: SharedDir | None) -> UpdateLimits:
    staging = [Path(settings.staging_dir)] if settings.staging_dir else []
    if not staging:
        staging = ([shared.path] if shared is not None else []) + [Path(tempfile.gettempdir())]
    return UpdateLimits(
        shm_dir=shared.path if shared is not None else None, staging_dirs=tuple(staging),
        weights_dir=Path(settings.weights_dir) if settings.weights_dir else None,
        max_update_bytes=(settings.max_update_mb or 0) << 20, idle_timeout_s=settings.update_idle_timeout_s,
        nccl=settings.weight_transfer == "nccl", owner_lease_s=settings.update_owner_lease_s)
