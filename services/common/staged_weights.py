"""A weight update staged in files, waiting to be applied: where each tensor's bytes are.

An update is staged in one of three places: a rollout-private file its gRPC buckets were written
to, the file a sender wrote into the shared directory (shm), or the safetensors files of a
checkpoint directory. Tensors are read with `pread` into tensors the reader owns, never mapped: a
sender that truncates its file mid-read causes a short read and a clean error, not a SIGBUS in
the engine. The vLLM worker gets the same description (plain tuples) and reads the same way.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

# safetensors dtype codes of the floating types weights may have; anything else is refused by name.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class StagedTensor:
    name: str
    dtype: str                 # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    path: str
    offset: int                # of its first byte in `path`
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class StagedWeights:
    """Tensors in file order; `skip` names verified duplicates the engine must not load (a tied
    lm_head identical to the embedding it shares memory with). `via="nccl"`: no files, the bytes
    arrive by NCCL broadcast while the engine applies (the tensors give names, dtypes, shapes)."""

    tensors: tuple[StagedTensor, ...]
    skip: frozenset[str] = field(default_factory=frozenset)
    via: str = "files"

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_apply(self) -> list[StagedTensor]:
        return [t for t in self.tensors if t.name not in self.skip]

    def to_tuples(self) -> list[tuple]:
        """Plain data for the vLLM worker (RPC arguments travel as msgpack)."""
        return [(t.name, t.dtype, list(t.shape), t.path, t.offset, t.nbytes) for t in self.to_apply()]

    @classmethod
    def from_tuples(cls, rows: Iterable[Sequence]) -> "StagedWeights":
        return cls(tuple(StagedTensor(n, d, tuple(s), p, o, b) for n, d, s, p, o, b in rows))

    @classmethod
    def from_layout(cls, specs: Iterable[tuple[str, str, Sequence[int]]], path: str | Path,
                    via: str = "files") -> "StagedWeights":
        """Tensors (name, dtype, shape) packed back to back from offset 0 of one file."""
        out, offset = [], 0
        for name, dtype, shape in specs:
            nbytes = tensor_nbytes(dtype, shape)
            out.append(StagedTensor(name, dtype, tuple(int(d) for d in shape), str(path), offset, nbytes))
            offset += nbytes
        return cls(tuple(out), via=via)

    def broadcast_info(self) -> dict:
        """vLLM's NCCL update info (names, dtype names, shapes) of the tensors to apply."""
        tensors = self.to_apply()
        return {"names": [t.name for t in tensors], "dtype_names": [t.dtype for t in tensors],
                "shapes": [list(t.shape) for t in tensors]}

    @classmethod
    def from_safetensors(cls, files: Sequence[str | Path]) -> "StagedWeights":
        """Every tensor of these safetensors files (headers only are read here)."""
        out: list[StagedTensor] = []
        for f in files:
            for name, (dtype, shape, begin, end) in read_safetensors_header(f).items():
                out.append(StagedTensor(name, dtype, shape, str(f), begin, end - begin))
        return cls(tuple(out))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, a fresh CPU tensor) per tensor to apply, read one at a time."""
        with open_files(self.tensors) as fds:
            for t in self.to_apply():
                yield t.name, read_tensor(fds[t.path], t)


def local_model_dir(model: str | Path) -> Path:
    """The directory holding a checkpoint: `model` itself, or its snapshot in the local HF cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), local_files_only=True))


def base_checkpoint(model: str | Path, names: Iterable[str]) -> StagedWeights:
    """The weights `names` as stored in a model's safetensors files (to restore them)."""
    model_dir = local_model_dir(model)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    wanted = set(names)
    staged = StagedWeights.from_safetensors(files)
    return StagedWeights(tuple(t for t in staged.tensors if t.name in wanted))


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()


@contextmanager
def open_files(tensors: Iterable[StagedTensor]) -> Iterator[dict[str, int]]:
    """path -> read-only file descriptor, for every file the tensors live in."""
    fds: dict[str, int] = {}
    try:
        for p in sorted({t.path for t in tensors}):
            fds[p] = os.open(p, os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def pread_into(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill `buf` from `offset`; a file that ends early (truncated under us) raises, naming `what`."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(f"{what}: the file ended after {done} of {len(buf)} bytes (truncated while staged?)")
        done += n


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_tensor(fd: int, t: StagedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor's bytes read into `out` (a contiguous CPU tensor of the same dtype and numel) or a new one."""
    if out is None:
        out = torch.empty(t.shape, dtype=t.torch_dtype)
    if t.nbytes:
        pread_into(fd, byte_view(out), t.offset, t.name)
    return out


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file, offsets from the file start.

    Parsed here (8-byte little-endian header length, JSON) so that offsets can be checked against
    the file's real size: a header that points past the end is a corrupt file, refused by name.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path.name}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path.name}: not a safetensors file (bad header: {exc})") from None
    start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path.name}: bad header entry for {name!r} ({exc!r})") from None
        dtype = SAFETENSORS_DTYPES.get(code, code)
        if not 0 <= begin <= end <= size - start:
            raise ValueError(f"{path.name}: {name} points outside the file")
        if dtype in SAFETENSORS_DTYPES.values() and end - begin != tensor_nbytes(dtype, shape):
            raise ValueError(f"{path.name}: {name} has {end - begin} bytes for shape {list(shape)} of {dtype}")
        out[name] = (dtype, shape, start + begin, start + end)
    return out
