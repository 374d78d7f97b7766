"""Prompt batches: JSONL `{"prompt": ..., "answer": ...}` or a Hugging Face dataset, reshuffled
each epoch by seed, sharded by rank, with a position that checkpoints save and resume restores."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from topd_client.errors import ConfigurationError

if TYPE_CHECKING:
    from services.trainer.settings import DataSettings

log = logging.getLogger(__name__)


WHERE = "_where"  # a record's "file:line", for messages that name it


def read_jsonl(path: str | Path, prompt_field: str = "prompt") -> list[dict[str, Any]]:
    """Records of a JSONL file; any problem is one ConfigurationError naming file:line."""
    records = []
    try:
        f = open(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigurationError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt = rec.get(prompt_field)
            if not isinstance(prompt, str) or not prompt:
                raise ConfigurationError(f"{where}: {prompt_field!r} must be a non-empty string, got {prompt!r}")
            records.append({**rec, WHERE: where})
    if not records:
        raise ConfigurationError(f"{path}: no prompts")
    return records


def fit_prompts(records: list[dict[str, Any]], tokenizer: Any, cfg: "DataSettings", max_prompt_tokens: int,
                what: str = "train") -> list[dict[str, Any]]:
    """Refuse (or skip, with long_prompts=skip) prompts longer than max_prompt_tokens (the context
    left after max_new_tokens), naming the first offender's file:line: checked at load, not when a
    batch reaches it."""
    ids = encode_prompts(tokenizer, records, cfg.prompt_field, cfg.chat_template)
    too_long = [i for i, p in enumerate(ids) if len(p) > max_prompt_tokens]
    if not too_long:
        return records
    first = records[too_long[0]]
    where = first.get(WHERE, f"{what} record {too_long[0]}")
    if cfg.long_prompts == "refuse":
        raise ConfigurationError(f"{where}: prompt of {len(ids[too_long[0]])} tokens leaves no room for "
                                 f"max_new_tokens within the context ({max_prompt_tokens} tokens for the prompt); "
                                 f"{len(too_long)} {what} prompts are too long (long_prompts=skip skips them)")
    log.warning("%d %s prompts longer than %d tokens skipped (first: %s)", len(too_long), what, max_prompt_tokens,
                where)
    drop = set(too_long)
    kept = [r for i, r in enumerate(records) if i not in drop]
    if not kept:
        raise ConfigurationError(f"every {what} prompt is longer than {max_prompt_tokens} tokens")
    return kept


def load_dataset_records(name: str, split: str, prompt_field: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigurationError("dataset= needs the `datasets` package: pip install 'topd[datasets]'") from exc
    ds = datasets.load_dataset(name, split=split)
    if prompt_field not in ds.column_names:
        raise ConfigurationError(f"dataset {name} has no {prompt_field!r} column; columns: {ds.column_names}")
    return [dict(r) for r in ds]


def train_records(cfg: "DataSettings", task: Any | None) -> list[dict[str, Any]]:
    """The training prompts: a dataset, a JSONL file, or the task's own train split."""
    if cfg.dataset:
        return load_dataset_records(cfg.dataset, cfg.dataset_split, cfg.prompt_field)
    if cfg.train_file:
        return read_jsonl(cfg.train_file, cfg.prompt_field)
    if task is None:
        raise ConfigurationError("no training prompts: set train_file or dataset (the student is not a built-in "
                                 "task's model, so there is no default data)")
    return read_jsonl(task.train_file(), cfg.prompt_field)


def eval_records(cfg: "DataSettings", task: Any | None) -> list[dict[str, Any]]:
    """Held-out prompts: eval_file, else the task's validation split when training on the task's data."""
    if cfg.eval_every == 0:
        return []
    if cfg.eval_file:
        return read_jsonl(cfg.eval_file, cfg.prompt_field)[: cfg.eval_size]
    if task is None or cfg.train_file or cfg.dataset:
        return []
    return read_jsonl(task.eval_file(), cfg.prompt_field)[: cfg.eval_size]


@dataclass
class DataState:
    epoch: int = 0
    position: int = 0


class PromptStream:
    """Endless batches of records: each epoch a seeded permutation; rank r takes every world-th."""

    def __init__(self, records: list[dict[str, Any]], seed: int, rank: int = 0, world: int = 1) -> None:
        self.records = records
        self.seed = seed
        self.rank, self.world = rank, world
        self.state = DataState()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank::self.world]

    def next_batch(self, size: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < size:
            if self.state.position >= len(self._order):
                self.state = DataState(self.state.epoch + 1, 0)
                self._order = self._permutation(self.state.epoch)
            out.append(self.records[self._order[self.state.position]])
            self.state.position += 1
        return out

    def restore(self, state: dict[str, int]) -> None:
        self.state = DataState(int(state["epoch"]), int(state["position"]))
        self._order = self._permutation(self.state.epoch)


def encode_prompts(tokenizer: Any, records: list[dict[str, Any]], prompt_field: str, chat_template: bool) -> list:
    """Token ids (long tensors) of each record's prompt, as a user turn of the chat template when asked."""
    import torch

    out = []
    for r in records:
        text = r[prompt_field]
        if chat_template and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(torch.as_tensor(ids, dtype=torch.long))
    return out


_ANSWER = re.compile(r"answer\s*[:=]\s*(\S+)", re.IGNORECASE)


def generic_check(record: dict[str, Any], completion: str) -> bool:
    """Answer check for any JSONL with an `answer`: the text after the last 'answer:' (else the last
    number) equals it. The built-in task has its own, stricter checker."""
    want = str(record.get("answer", "")).strip()
    if not want:
        return False
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip().rstrip(".") == want
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion)
    return bool(numbers) and numbers[-1] == want
