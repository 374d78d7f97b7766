"""Tokenizer fingerprint: equal fingerprints mean token ids mean the same thing on both sides."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary, merges, special/added tokens and chat template.

    Teacher and student logprobs are only comparable when these agree, so the trainer refuses a
    teacher whose fingerprint differs from its student's.
    """
    parts: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        parts["type"] = model.get("type")
        parts["vocab"] = model.get("vocab")
        parts["merges"] = model.get("merges")
        parts["added"] = [(t.get("id"), t.get("content"), t.get("special")) for t in spec.get("added_tokens", [])]
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["special"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
