"""Atomic checkpoints: write into `step-N.tmp`, then rename; `latest` names the newest.

A checkpoint holds the student in Hugging Face format (safetensors + config + tokenizer), the
optimizer and scheduler state, RNG states, the step and data position, and a manifest pinning the
settings and the teacher's model and tokenizer fingerprint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topd_client.errors import TopdError

MANIFEST = "manifest.json"


class StorageError(TopdError, OSError):
    """The run directory cannot be written (full disk, read-only mount): one line naming the path."""


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict[str, Any],
         manifest: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically; prune to the newest `keep`.

    A failure (a full disk) leaves the checkpoints that were there and raises StorageError, one line."""
    ckpt_root = root / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "step": step, "saved_at": time.time()}, indent=2,
                                               default=str))
        _fsync_dir(tmp)
        old = ckpt_root / f".step-{step:07d}.old"
        if final.exists():  # the same step saved again: keep the old one until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        latest_tmp = ckpt_root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, ckpt_root / "latest")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot write checkpoint {final}: {exc.strerror or exc}") from None
    for stale in _by_step(ckpt_root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def _by_step(paths) -> list[Path]:
    """Checkpoint dirs ordered by step number (not by name: step-10000000 sorts before step-2000000)."""
    return sorted((p for p in paths if _step_of(p) >= 0), key=_step_of)


def latest(root: Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint under root (of run `run_id` only, when given)."""
    def ours(path: Path) -> bool:
        return (path / MANIFEST).exists() and (run_id is None or read_manifest(path).get("run_id") == run_id)

    pointer = root / "checkpoints" / "latest"
    if pointer.exists():
        path = root / "checkpoints" / pointer.read_text().strip()
        if ours(path):
            return path
    done = [p for p in _by_step((root / "checkpoints").glob("step-*")) if ours(p)]
    return done[-1] if done else None


def load_into(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns state.json."""
    from safetensors.torch import load_file

    from services.trainer.student import unwrap

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        tensors.update(load_file(f))
    unwrap(model).load_state_dict(tensors, strict=False)
    extra = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return json.loads((path / "state.json").read_text())


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
