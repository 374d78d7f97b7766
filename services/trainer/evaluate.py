"""Greedy accuracy of a policy (rollout or teacher) on prompts with checkable answers."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

Checker = Callable[[dict[str, Any], str], bool]


def greedy_accuracy(generate: Callable[..., list[list[Any]]], prompt_ids: Sequence[np.ndarray],
                    records: Sequence[dict[str, Any]], checker: Checker, tokenizer, max_tokens: int,
                    batch: int = 256) -> tuple[float, list[str]]:
    """(accuracy, decoded completions). `generate` is TeacherClient.generate or RolloutClient.continue_from."""
    texts: list[str] = []
    for lo in range(0, len(prompt_ids), batch):
        groups = generate(list(prompt_ids[lo:lo + batch]), max_tokens=max_tokens, temperature=0.0)
        texts.extend(tokenizer.decode(g[0].tokens, skip_special_tokens=True) for g in groups)
    ok = sum(checker(r, t) for r, t in zip(records, texts))
    return ok / max(len(records), 1), texts
