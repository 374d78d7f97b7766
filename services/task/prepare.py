"""The built-in task's cache entries: `prepare_builtin` reuses, installs or builds one per preset.

An entry (`<data dir>/<task>-v<version>-seed<seed>/`) holds, in Hugging Face format:

    teacher/   Qwen2ForCausalLM trained from scratch on rendered solutions (mixed surface forms)
    student/   a much smaller Qwen2 warmed up on teacher samples (stage 1: off-policy distillation)
               to a weak start, 20-50% greedy accuracy
    train.jsonl, val.jsonl, test.jsonl, teacher_samples.jsonl, build.json (sizes, times, accuracies)

The full preset's weights ship with the project (services/task/shipped.py, checked by sha256), so a
first run installs them in about a second; `rebuild=True` (`topd prepare --rebuild`) trains them here.
Training is deterministic in the seed (data order, init and sampling are seeded; training stops on
step counts and on seeded evaluations, never on wall-clock time) on one machine with one torch build
and thread count; another CPU may round differently (docs/calibration.md). A file lock keeps two
processes from building at once, and the build happens in a temporary directory renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from services.common.model_files import data_dir as default_data_dir
from services.task import arith
from services.task.arith import Problem, TaskConfig
from services.task.models import (DEFAULT_PRESET, BuildConfig, _rendered_batches, _sample_batches, build_model,
                                  build_tokenizer, evaluate, generate_texts, max_new_tokens_for, n_params, preset,
                                  train_sft)

CACHE_VERSION = 3


@dataclass(frozen=True)
class BuiltinModels:
    """Paths of a prepared cache entry."""

    teacher_dir: Path
    student_dir: Path
    data_dir: Path
    train_jsonl: Path
    val_jsonl: Path
    test_jsonl: Path
    teacher_samples_jsonl: Path = field(default=Path())
    info: dict = field(default_factory=dict)


def write_splits(out: Path, cfg: BuildConfig, seed: int) -> dict[str, list[Problem]]:
    """train/val/test.jsonl of the preset (pure Python, deterministic in the seed, about a second)."""
    task = TaskConfig(n_digits=cfg.task.n_digits, n_operands=cfg.task.n_operands, seed=seed)
    splits = arith.make_splits(task, cfg.n_train, cfg.n_val, cfg.n_test)
    for name, problems in splits.items():
        arith.write_jsonl(problems, out / f"{name}.jsonl")
    return splits


def _build(out: Path, cfg: BuildConfig, seed: int, splits: dict[str, list[Problem]], progress: bool) -> dict:
    """Train the teacher, sample it, warm the student up on the samples; five phases, each with a bar."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # this process's setting: restored after the build
    try:
        return _train_models(out, cfg, seed, splits, progress)
    finally:
        torch.set_num_threads(threads)


def _train_models(out: Path, cfg: BuildConfig, seed: int, splits: dict[str, list[Problem]], progress: bool) -> dict:
    import torch

    t_start = time.perf_counter()
    tokenizer = build_tokenizer()
    val_small = splits["val"][: cfg.n_eval_during_training]

    teacher = build_model(cfg.teacher, tokenizer, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    teacher_hist = train_sft(teacher, tokenizer, _rendered_batches(splits["train"], cfg.teacher_train.batch_size, seed),
                             cfg.teacher_train, lambda: evaluate(teacher, tokenizer, val_small), seed, progress,
                             desc="1/5 train teacher")
    teacher_seconds, teacher_cpu = time.perf_counter() - t0, time.process_time() - c0
    teacher_acc = evaluate(teacher, tokenizer, splits["test"], desc="2/5 teacher test" if progress else None)

    t0 = time.perf_counter()
    prompts = [p.prompt for p in splits["train"][: cfg.n_teacher_samples]]
    texts = generate_texts(teacher, tokenizer, prompts, max_new_tokens_for(cfg.task),
                           temperature=cfg.sample_temperature, seed=seed,
                           desc="3/5 teacher samples" if progress else None)
    samples = list(zip(prompts, texts))
    sample_seconds = time.perf_counter() - t0
    with (out / "teacher_samples.jsonl").open("w") as f:
        for prompt, completion in samples:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")

    student = build_model(cfg.student, tokenizer, seed + 1)
    t0, c0 = time.perf_counter(), time.process_time()
    student_hist = train_sft(student, tokenizer, _sample_batches(samples, cfg.student_warmup.batch_size, seed + 1),
                             cfg.student_warmup, lambda: evaluate(student, tokenizer, val_small), seed + 1, progress,
                             desc="4/5 warm up student")
    student_seconds, student_cpu = time.perf_counter() - t0, time.process_time() - c0
    student_acc = evaluate(student, tokenizer, splits["test"], desc="5/5 student test" if progress else None)

    for name, model in (("teacher", teacher), ("student", student)):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name, safe_serialization=True)
        tokenizer.save_pretrained(out / name)
    import transformers

    return {
        "version": CACHE_VERSION, "seed": seed, "config": asdict(cfg), "source": "trained",
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": _cpu_model(),
                       "threads": cfg.threads},
        "teacher": {"params": n_params(teacher), "train_seconds": round(teacher_seconds, 1),
                    "train_cpu_seconds": round(teacher_cpu, 1), "test_acc": teacher_acc, "history": teacher_hist},
        "teacher_samples": {"n": len(samples), "seconds": round(sample_seconds, 1),
                            "acc": sum(arith.check(p, c) for p, c in zip(splits["train"], texts)) / len(samples)},
        "student": {"params": n_params(student), "warmup_seconds": round(student_seconds, 1),
                    "warmup_cpu_seconds": round(student_cpu, 1), "test_acc": student_acc, "history": student_hist},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _entry(root: Path, info: dict) -> BuiltinModels:
    return BuiltinModels(teacher_dir=root / "teacher", student_dir=root / "student", data_dir=root,
                         train_jsonl=root / "train.jsonl", val_jsonl=root / "val.jsonl", test_jsonl=root / "test.jsonl",
                         teacher_samples_jsonl=root / "teacher_samples.jsonl", info=info)


def cache_key(task: str, seed: int, config: BuildConfig) -> str:
    """`<task>-v<version>-seed<seed>`, plus a hash of the config when it is not the preset's."""
    key = f"{task}-v{CACHE_VERSION}-seed{seed}"
    return key if config == preset(task) else f"{key}-{_config_hash(config)}"


def prepare_builtin(data_dir: Path | None = None, seed: int = 0, progress: bool = True,
                    config: BuildConfig | None = None, task: str = DEFAULT_PRESET,
                    rebuild: bool = False) -> BuiltinModels:
    """The teacher, the warmed-up student and the splits of a preset: reused when cached, else installed
    from the shipped weights when the project has them (seconds), else trained here (minutes).

    The entry lives in data_dir (default $TOPD_DATA_DIR or ~/.cache/topd) under `cache_key(...)`.
    rebuild: train here even when cached or shipped, replace the entry, and record in its build.json
    whether the weights came out identical to the shipped ones (`matches_shipped`)."""
    from services.task import shipped

    cfg = config if config is not None else preset(task)
    root = Path(data_dir or default_data_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(task, seed, cfg)

    def build(tmp: Path) -> dict:
        splits = write_splits(tmp, cfg, seed)
        bundle = shipped.find(key)
        if bundle is not None and not rebuild:
            return shipped.install(bundle, tmp, progress)
        info = _build(tmp, cfg, seed, splits, progress)
        if bundle is not None:
            info["matches_shipped"] = shipped.compare(bundle, tmp)
        return info

    return cached_entry(root, key, build, rebuild)


def cached_entry(root: Path, key: str, build: Callable[[Path], dict], rebuild: bool = False) -> BuiltinModels:
    """The entry root/key: reused when its build.json exists (unless rebuild), else build(tmp) fills a
    temporary directory that is renamed into place, under a file lock (another process may be building
    the same entry); a failed or interrupted build leaves nothing behind."""
    final = root / key
    if not rebuild and (final / "build.json").exists():
        return _entry(final, json.loads((final / "build.json").read_text()))
    with (root / f".{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild and (final / "build.json").exists():
            return _entry(final, json.loads((final / "build.json").read_text()))
        tmp = root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            info = build(tmp)
            (tmp / "build.json").write_text(json.dumps(info, indent=1))
            if final.exists():  # rebuild: move the old entry aside first (os.replace needs an empty target)
                old = root / f".{key}.old-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _entry(final, info)


def _config_hash(config: BuildConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
