"""Token embedding tables for the OT ground cost (docs/method.md, section 3).

Tables stay in their stored dtype: `ot.cost_matrices` indexes the window ids first and casts only
those rows to float64 (a 150k x 4096 table cast whole would be 4.8 GB a step).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from services.trainer.student import unwrap
from topd_client.errors import ConfigurationError


def student_table(model: torch.nn.Module) -> Tensor:
    """The student's input embeddings, detached (no copy)."""
    return unwrap(model).get_input_embeddings().weight.detach()


def teacher_table(checkpoint: str | Path) -> Tensor:
    """The teacher's input embedding table read from its safetensors files, and nothing else of it.

    The tensor's name comes from the model class itself (built on the meta device, so no weights are
    allocated): whatever the architecture calls its input embeddings.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigurationError(f"teacher_embedding_model {path} is not a local checkpoint directory")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    embedding = skeleton.get_input_embeddings()
    name = next(n for n, p in skeleton.named_parameters() if p is embedding.weight)
    for f in _files_holding(path, name):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise ConfigurationError(f"{path}: no tensor {name!r} (the input embeddings) in its safetensors files")


def _files_holding(path: Path, name: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        if shard:
            return [path / shard]
    return sorted(path.glob("*.safetensors"))
