"""Serialise a torch state dict as a safetensors payload, chunk by chunk, without building it whole.

safetensors is an 8-byte header length, a JSON header with each tensor's dtype, shape and byte
offsets, then the raw little-endian bytes. The header depends only on names, dtypes and shapes,
so the payload can be streamed tensor by tensor; `payload_sha256` hashes it the same way.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import torch

_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32",
             "int8": "I8", "uint8": "U8", "bool": "BOOL", "float64": "F64"}


def _header(tensors: Mapping[str, "torch.Tensor"]) -> bytes:
    meta, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        meta[name] = {"dtype": _ST_DTYPE[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                      "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _tensor_bytes(t: "torch.Tensor") -> memoryview:
    import torch

    flat = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def payload_size(tensors: Mapping[str, "torch.Tensor"]) -> int:
    return len(_header(tensors)) + sum(t.numel() * t.element_size() for t in tensors.values())


def iter_payload(tensors: Mapping[str, "torch.Tensor"], chunk_bytes: int = 4 << 20) -> Iterator[bytes]:
    """The safetensors payload in chunks of at most `chunk_bytes`: the header, then each tensor's
    bytes sliced straight from the tensor (one copy per byte; one tensor in memory at a time)."""
    yield _header(tensors)
    for t in tensors.values():
        data = _tensor_bytes(t)
        for pos in range(0, len(data), chunk_bytes):
            yield data[pos:pos + chunk_bytes].tobytes()


def payload_sha256(tensors: Mapping[str, "torch.Tensor"]) -> str:
    h = hashlib.sha256(_header(tensors))
    for t in tensors.values():
        h.update(_tensor_bytes(t))
    return h.hexdigest()
