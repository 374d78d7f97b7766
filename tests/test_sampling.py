"""Which prompts a step trains on, with and without overlap: the data position a checkpoint saves
is the one after the last *trained* batch, and a redone step draws its own batch again."""

from __future__ import annotations

import threading

from services.trainer.batch import Samples
from services.trainer.data import PromptStream
from services.trainer.sampling import SampleSource
from services.trainer.settings import DataSettings, SamplingSettings


class Rollout:
    """Records the prompts each sample call got (the rollout service is not what is tested here)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        self.third = threading.Event()

    def sample(self, records, prompt_ids, **kwargs) -> Samples:
        with self.lock:
            self.calls.append([r["prompt"] for r in records])
            if len(self.calls) == 3:
                self.third.set()
        return Samples([], [], [], [], list(records), [])


class Tokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % 50 for c in text]}


def source(overlap: bool) -> tuple[SampleSource, Rollout]:
    records = [{"prompt": f"p{i}"} for i in range(20)]
    rollout = Rollout()
    cfg = SamplingSettings(prompts_per_step=3, overlap=overlap, max_staleness=1)
    return SampleSource(PromptStream(records, seed=1), rollout, Tokenizer(), DataSettings(), cfg, seed=1), rollout


def test_overlap_saves_the_position_after_the_trained_batch():
    src, rollout = source(overlap=True)
    first, _ = src.take(1, last_step=5)
    batch1 = [r["prompt"] for r in first.records]
    src.complete()
    after_1 = src.position()
    src.take(2, last_step=5)  # prefetched while step 1 trained
    src.complete()
    assert after_1 == {"epoch": 0, "position": 3}
    assert src.position() == {"epoch": 0, "position": 6}  # step 3's prefetched batch is not counted
    assert rollout.third.wait(10)  # step 3's batch is drawn ahead ...
    assert src.position() == {"epoch": 0, "position": 6}  # ... and still not counted
    assert rollout.calls[0] == batch1
    src.close()


def test_a_redone_step_draws_its_own_batch_again():
    for overlap in (False, True):
        src, rollout = source(overlap)
        src.take(1, last_step=5)
        src.complete()
        second, _ = src.take(2, last_step=5)
        src.redo()  # the rollout lost the weights: step 2 again, with the same prompts
        again, _ = src.take(2, last_step=5)
        assert [r["prompt"] for r in again.records] == [r["prompt"] for r in second.records]
        src.redo()  # abandoned: a checkpoint now resumes at step 2's batch
        assert src.position() == {"epoch": 0, "position": 3}
        src.redo()  # nothing in progress: no rewind past a trained batch
        assert src.position() == {"epoch": 0, "position": 3}
        src.close()
