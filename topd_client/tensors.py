"""Numpy <-> wire `Tensor` (packed little-endian bytes with dtype and shape)."""

from __future__ import annotations

import math

import numpy as np

from topd_client.errors import MalformedTensorError
from topd_client.wire.topd.v1 import common_pb2

_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def to_wire(array: np.ndarray | list, dtype: str | None = None) -> common_pb2.Tensor:
    """Pack an array; `dtype` (a wire dtype name) casts first."""
    arr = np.asarray(array)
    name = dtype or _wire_name(arr.dtype)
    arr = np.ascontiguousarray(arr, dtype=_DTYPES[name])
    return common_pb2.Tensor(dtype=name, shape=list(arr.shape), data=arr.tobytes())


def from_wire(tensor: common_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """Unpack, refusing a dtype we do not know or bytes that do not fit the shape."""
    if tensor.dtype not in _DTYPES:
        raise MalformedTensorError(f"{what}: unknown dtype {tensor.dtype!r} (known: {', '.join(_DTYPES)})")
    dt = _DTYPES[tensor.dtype]
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise MalformedTensorError(f"{what}: negative dimension in shape {shape}")
    want = math.prod(shape) * dt.itemsize  # Python ints: np.prod wraps [2**32, 2**32] around to 0
    if len(tensor.data) != want:
        raise MalformedTensorError(
            f"{what}: {len(tensor.data)} bytes do not fit dtype {tensor.dtype} and shape {list(shape)} ({want} bytes)")
    return np.frombuffer(tensor.data, dtype=dt).reshape(shape)


def _wire_name(dt: np.dtype) -> str:
    for name, known in _DTYPES.items():
        if np.dtype(dt).newbyteorder("<") == known or np.dtype(dt) == known:
            return name
    if np.issubdtype(dt, np.floating):
        return "float32"
    if np.issubdtype(dt, np.integer):
        return "int64"
    raise MalformedTensorError(f"cannot send dtype {dt}")
