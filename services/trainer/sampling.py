"""Prompt batches -> the rollout's samples for each step, optionally one step ahead.

With `overlap`, step t+1's prompts are drawn and sampled while step t scores and trains, so its
samples come from the weights of step t-1 (one version behind, which `max_staleness` >= 1 keeps).
The data position a checkpoint saves is the one after the last *trained* batch: a prefetched batch
that was never trained is drawn again after a resume.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from services.trainer.batch import Samples
from services.trainer.clients import ServiceClients
from services.trainer.data import DataState, PromptStream, encode_prompts
from services.trainer.settings import DataSettings, SamplingSettings
from services.trainer.step import sample_seed


class SampleSource:
    """Draws each step's prompts and asks the rollout for their samples."""

    def __init__(self, data: PromptStream, clients: ServiceClients, tokenizer: Any, data_cfg: DataSettings,
                 cfg: SamplingSettings, seed: int, top_k: int = 0) -> None:
        self.data, self.clients, self.tokenizer = data, clients, tokenizer
        self.data_cfg, self.cfg, self.seed, self.top_k = data_cfg, cfg, seed, top_k
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="topd-prefetch") if cfg.overlap else None
        self._pending: tuple[int, DataState, Future] | None = None
        self._in_progress: DataState | None = None  # position before the batch handed out, until `complete`

    def take(self, step: int, last_step: int) -> tuple[Samples, float]:
        """Step `step`'s samples and the seconds spent waiting for them; starts step+1's when overlapping."""
        t0 = time.perf_counter()
        if self._pending is not None and self._pending[0] == step:
            self._in_progress = self._pending[1]
            pending, self._pending = self._pending[2], None
            samples = pending.result()
        else:
            self.cancel()
            self._in_progress = self._state()
            samples = self._draw(step)
        waited = time.perf_counter() - t0
        if self._pool is not None and step < last_step:
            self._pending = (step + 1, self._state(), self._pool.submit(self._draw, step + 1))
        return samples, waited

    def complete(self) -> None:
        """The batch handed out was trained on: it is not drawn again."""
        self._in_progress = None

    def redo(self) -> None:
        """The step in progress is redone or abandoned: its batch is drawn again at the next `take`."""
        if self._in_progress is not None:
            self.cancel()
            self.data.restore(asdict(self._in_progress))
            self._in_progress = None

    def _state(self) -> DataState:
        return DataState(**asdict(self.data.state))

    def _draw(self, step: int) -> Samples:
        records = self.data.next_batch(self.cfg.prompts_per_step)
        ids = encode_prompts(self.tokenizer, records, self.data_cfg.prompt_field, self.data_cfg.chat_template)
        return self.clients.sample(records, ids, n=self.cfg.samples_per_prompt, max_tokens=self.cfg.max_new_tokens,
                                   temperature=self.cfg.temperature, seed=sample_seed(self.seed, step), top_k=self.top_k)

    def position(self) -> dict[str, int]:
        """Where a resumed run continues: after the last batch trained on (`complete`)."""
        if self._in_progress is not None:
            return asdict(self._in_progress)
        state = self._pending[1] if self._pending is not None else self.data.state
        return asdict(state)

    def cancel(self) -> None:
        """Forget a prefetched batch (its prompts are drawn again: the data position rewinds)."""
        if self._pending is not None:
            _, before, fut = self._pending
            fut.cancel()
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - the batch is dropped either way
                pass
            self.data.restore(asdict(before))
            self._pending = None

    def close(self) -> None:
        self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
