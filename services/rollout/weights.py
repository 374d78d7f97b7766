"""Weight-update protocol of the rollout service: receive, verify, then apply atomically.

An update is refused (and the old weights keep serving) when it is stale (version not above the
one serving), truncated (fewer bytes than announced), corrupt (sha256 mismatch or unreadable
safetensors) or mismatched (unknown or missing names, wrong shapes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from topd_client.errors import InvalidInputError, PreconditionError
from topd_client.wire.topd.v1 import rollout_pb2

TIED_ALIASES = ("lm_head.weight",)


@dataclass(frozen=True)
class WeightUpdate:
    version: int
    tensors: dict[str, torch.Tensor]
    payload: bytes | None  # the verified safetensors bytes (None for a checkpoint dir)
    checkpoint_dir: str | None


def receive(chunks: Iterable[rollout_pb2.WeightChunk], current_version: int) -> WeightUpdate:
    """Read the client stream into a verified update (no engine state touched)."""
    from safetensors.torch import load, load_file

    it = iter(chunks)
    try:
        head = next(it)
    except StopIteration:
        raise InvalidInputError("empty UpdateWeights stream") from None
    if head.version <= current_version:
        raise PreconditionError(f"stale update: version {head.version} is not above the serving version "
                                f"{current_version}")
    if head.checkpoint_dir:
        path = Path(head.checkpoint_dir)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InvalidInputError(f"checkpoint_dir {path}: no *.safetensors files")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                tensors.update(load_file(f))
            except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt checkpoint
                raise InvalidInputError(f"checkpoint {f}: unreadable safetensors ({exc})") from exc
        return WeightUpdate(head.version, tensors, None, str(path))
    # Hashed chunk by chunk as it arrives, joined once (safetensors wants bytes, not a bytearray).
    sha, parts = hashlib.sha256(head.data), [head.data]
    for chunk in it:
        data = chunk.data  # one access: each one copies out of the message
        sha.update(data)
        parts.append(data)
    received = sum(map(len, parts))
    if head.total_bytes and received != head.total_bytes:
        raise InvalidInputError(f"truncated update: received {received} of {head.total_bytes} bytes")
    digest = sha.hexdigest()
    if head.sha256 and digest != head.sha256.lower():
        raise InvalidInputError(f"corrupt update: sha256 {digest[:12]}... does not match {head.sha256[:12]}...")
    payload = b"".join(parts)
    del parts
    try:
        tensors = load(payload)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInputError(f"corrupt update: not a safetensors payload ({exc})") from exc
    return WeightUpdate(head.version, tensors, payload, None)


def check_against(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Names and shapes must match the serving model exactly (a tied lm_head copy is dropped)."""
    tensors = {k: v for k, v in tensors.items() if k in expected or k not in TIED_ALIASES}
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise InvalidInputError("mismatched update: " + "; ".join(
            part for part in (f"unknown names {unknown[:5]}" if unknown else "",
                              f"missing names {missing[:5]}" if missing else "") if part))
    wrong = [f"{k}: {list(v.shape)} != {list(expected[k])}" for k, v in tensors.items()
             if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise InvalidInputError("mismatched update: wrong shapes " + "; ".join(wrong[:5]))
    return tensors
