"""The styled pair: the built-in teacher and student, each given a style of its own.

`prepare_styled` starts from the uniform pair of `models.prepare_builtin` (built or reused) and
gives each model a style of its own by fine-tuning:

- the teacher on correct solutions rendered in a strong Zipf skew of the forms (`styled.render_styled`):
  arithmetic is what took the uniform build its CPU-hour; a style is learnt in ~150 steps on top of
  it, the way a real teacher's style comes from fine-tuning a model that already reasons;
- the student on its own samples, rewritten in the reversed ranking (`styled.restyle`: forms redrawn,
  numbers and errors kept). Fine-tuning it on correct solutions instead taught it the arithmetic too
  (40% -> 95% test accuracy in 80 steps): the student must stay weak, and its errors its own.

Cache: <data_dir>/styled-v{version}-{base entry name}[-{config hash}], same layout as the uniform
entry (teacher/, student/, train/val/test.jsonl, teacher_samples.jsonl, build.json), built under a
file lock in a temporary directory renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from services.common.model_files import data_dir as default_data_dir
from services.task import arith
from services.task.arith import Problem, columns
from services.task.models import TrainSpec, evaluate, generate_texts, max_new_tokens_for, train_sft
from services.task.prepare import BuiltinModels, cached_entry, prepare_builtin
from services.task.styled import STUDENT_STYLE, TEACHER_STYLE, Style, render_styled, restyle, step_form

log = logging.getLogger(__name__)

STYLED_VERSION = 1


@dataclass(frozen=True)
class StyledConfig:
    """The two styles and the fine-tunes that give them to the uniform pair."""

    teacher_style: Style = TEACHER_STYLE
    student_style: Style = STUDENT_STYLE
    teacher_tune: TrainSpec = TrainSpec(max_steps=150, batch_size=64, lr=1e-3, warmup_steps=10, eval_every=150)
    student_tune: TrainSpec = TrainSpec(max_steps=80, batch_size=32, lr=1e-3, warmup_steps=10, eval_every=80)
    n_student_samples: int = 2048  # the student's own samples (temperature 1) that its fine-tune restyles
    n_eval: int = 200  # test problems for the accuracies and form statistics recorded in build.json
    n_teacher_samples: int = 512
    threads: int = 2


def _styled_batches(problems: Sequence[Problem], style: Style, batch_size: int, seed: int):
    """batch_fn of correct solutions in `style`."""
    rng = random.Random(seed)

    def batch_fn(step: int) -> tuple[list[str], list[str]]:
        chosen = [rng.choice(problems) for _ in range(batch_size)]
        return [p.prompt for p in chosen], [render_styled(p, style, rng) for p in chosen]
    return batch_fn


def _restyled_batches(problems: Sequence[Problem], texts: Sequence[str], style: Style, batch_size: int, seed: int):
    """batch_fn of a model's own responses, each rewritten in `style` afresh when drawn."""
    rng = random.Random(seed)
    pairs = list(zip(problems, texts))

    def batch_fn(step: int) -> tuple[list[str], list[str]]:
        chosen = [rng.choice(pairs) for _ in range(batch_size)]
        return [p.prompt for p, _ in chosen], [restyle(p, t, style, rng) for p, t in chosen]
    return batch_fn


def _max_tokens(p: Problem) -> int:
    return max_new_tokens_for(arith.TaskConfig(n_digits=p.n_digits, n_operands=len(p.operands)))


def form_frequencies(problems: Sequence[Problem], texts: Sequence[str]) -> dict[str, list[float]]:
    """How often each label and phrase (by index, as in `styled.Style`) appears in the correct column
    lines of `texts`: what a model's samples say about its style."""
    counts = {"labels": Counter(), "phrases": Counter()}
    for p, text in zip(problems, texts):
        for col, line in zip(columns(p), text.split("\n")[1:]):
            match = next(((li, pi) for li in range(3) for oi in range(4) for pi in range(3)
                          if step_form(col, li, oi, pi) == line), None)
            if match is not None:
                counts["labels"][match[0]] += 1
                counts["phrases"][match[1]] += 1
    return {k: [round(c[i] / max(1, sum(c.values())), 3) for i in range(3)] for k, c in counts.items()}


def _tune(model_dir: Path, out: Path, batches: Callable[[Any], Callable], test: Sequence[Problem],
          spec: TrainSpec, seed: int, progress: bool) -> dict:
    """Fine-tune the model in model_dir on batches(model, tokenizer), save it to out, and measure it."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    t0 = time.perf_counter()
    history = train_sft(model, tokenizer, batches(model, tokenizer), spec, None, seed, progress)
    seconds = time.perf_counter() - t0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    sampled = generate_texts(model, tokenizer, [p.prompt for p in test], _max_tokens(test[0]), temperature=1.0,
                             seed=seed)
    info = {"tune_seconds": round(seconds, 1), "test_acc": evaluate(model, tokenizer, test),
            "sampled_forms": form_frequencies(test, sampled), "history": history}
    if progress:
        log.info("%s: %s", out.name, {k: v for k, v in info.items() if k != "history"})
    return info


def tune_student(student_dir: Path, out: Path, train: Sequence[Problem], test: Sequence[Problem], cfg: StyledConfig,
                 seed: int, progress: bool) -> dict:
    """The styled student: the uniform student fine-tuned on its own samples rewritten in its style."""
    problems = train[-cfg.n_student_samples:]  # not the teacher samples' problems

    def batches(model, tokenizer):
        texts = generate_texts(model, tokenizer, [p.prompt for p in problems], _max_tokens(problems[0]),
                               temperature=1.0, seed=seed)
        return _restyled_batches(problems, texts, cfg.student_style, cfg.student_tune.batch_size, seed)

    return _tune(student_dir, out, batches, test, cfg.student_tune, seed, progress)


def _build(out: Path, base: BuiltinModels, cfg: StyledConfig, seed: int, progress: bool) -> dict:
    import torch

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        shutil.copyfile(base.data_dir / name, out / name)
    train = arith.read_jsonl(base.train_jsonl)
    test = arith.read_jsonl(base.test_jsonl)[: cfg.n_eval]
    teacher = _tune(base.teacher_dir, out / "teacher",
                    lambda model, tok: _styled_batches(train, cfg.teacher_style, cfg.teacher_tune.batch_size, seed),
                    test, cfg.teacher_tune, seed, progress)
    student = tune_student(base.student_dir, out / "student", train, test, cfg, seed + 1, progress)
    problems = train[: cfg.n_teacher_samples]
    texts = generate_texts(out / "teacher", None, [p.prompt for p in problems], _max_tokens(problems[0]),
                           temperature=1.0, seed=seed)
    with (out / "teacher_samples.jsonl").open("w") as f:
        for p, completion in zip(problems, texts):
            f.write(json.dumps({"prompt": p.prompt, "completion": completion}) + "\n")
    info = {"version": STYLED_VERSION, "seed": seed, "base": str(base.data_dir), "config": asdict(cfg),
            "teacher": teacher, "student": student, "total_seconds": round(time.perf_counter() - t_start, 1)}
    return info


def prepare_styled(data_dir: Path | None = None, seed: int = 0, progress: bool = True,
                   config: StyledConfig = StyledConfig(), base: BuiltinModels | None = None,
                   rebuild: bool = False) -> BuiltinModels:
    """The styled pair, built on first use from the uniform pair (`base`, default: prepare_builtin's);
    rebuild: fine-tune again and replace the entry."""
    root = Path(data_dir or default_data_dir()).expanduser()
    base = base or prepare_builtin(root, seed=seed, progress=progress)
    key = f"styled-v{STYLED_VERSION}-{base.data_dir.name}"
    if config != StyledConfig():
        key += "-" + hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    return cached_entry(root, key, lambda tmp: _build(tmp, base, config, seed, progress), rebuild)
