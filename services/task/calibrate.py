"""Calibration of the built-in task: how far plain SFT takes the warmed-up student (the baseline
that on-policy methods must beat). `python -m services.task.calibrate [--steps N]`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from services.task import arith
from services.task.models import TrainSpec, _sample_batches, evaluate, train_sft
from services.task.prepare import BuiltinModels, prepare_builtin

def sft_plateau(entry: BuiltinModels, steps: int = 2000, eval_every: int = 250, lr: float = 2e-3,
                n_eval: int = 500, seed: int = 0, progress: bool = True) -> list[dict]:
    """Calibration: continue plain SFT of the warmed-up student on the cached teacher samples
    and return its accuracy curve on validation problems (the baseline on-policy methods must beat)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(entry.student_dir)
    student = AutoModelForCausalLM.from_pretrained(entry.student_dir, dtype="float32")
    rows = [json.loads(line) for line in entry.teacher_samples_jsonl.read_text().splitlines()]
    samples = [(r["prompt"], r["completion"]) for r in rows]
    val = arith.read_jsonl(entry.val_jsonl)[:n_eval]
    spec = TrainSpec(max_steps=steps, lr=lr, eval_every=eval_every, warmup_steps=10)
    return train_sft(student, tokenizer, _sample_batches(samples, spec.batch_size, seed), spec,
                     lambda: evaluate(student, tokenizer, val), seed, progress)


def main(argv: Sequence[str] | None = None) -> None:
    """python -m services.task.calibrate [--data-dir D] [--seed S] [--steps N]"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000, help="calibrate: SFT steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    entry = prepare_builtin(args.data_dir, args.seed)
    print(json.dumps({k: v for k, v in entry.info.items() if k != "config"}, indent=1, default=str))
    curve = sft_plateau(entry, steps=args.steps, seed=args.seed)
    (entry.data_dir / "sft_plateau.json").write_text(json.dumps(curve, indent=1))
    print(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
