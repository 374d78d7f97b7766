"""Shared teacher: aggregate teacher tokens/s and per-trainer step time for 1, 2 and 4 trainers.

    python -m bench.shared_teacher            # full run, < 3 min on 2 CPU cores
    python -m bench.shared_teacher --quick    # smoke run (1 and 2 trainers), < 40 s

One teacher process (`start_teacher`, hf engine, gRPC on loopback) serves every group. A group of
N trainers runs N processes at once; each process holds its own rollout service (hf engine, port 0)
and runs `train()` for a few OPD steps under its own client id, after a barrier so that the step
loops start together. Every process (the model builder, the teacher, the trainers) forks from a
multiprocessing fork server that imported torch, transformers and topd once: on 2 shared cores,
importing them in each process cost more than the benchmark itself.

Per group the table shows:
* teacher tokens/s: the response tokens that the teacher's `/status` charged to the group's client
  ids, over the span from the first trainer's first step to the last trainer's last step;
* step s: each trainer's median `time/step` (metrics.jsonl, step 1 left out as warm-up), the median
  and the range over the group's trainers; "score s" is the same for `time/score`, the time a step
  waits for the teacher; "teacher latency s" is the teacher's mean per request (its `/status`);
* requests/forward: the group's Score requests per batch the teacher ran (its `/metrics`), > 1 when
  the batcher merged requests of different trainers into one forward;
* share spread: largest / smallest share of the group's teacher tokens (1.0 = equal).

On a 2-core machine every process competes for the same cores, so step time grows with N whatever
the teacher does: read the "score s" column for what the shared teacher costs a trainer.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from bench.common import BENCH_MODEL, build_model, machine_line, median, parser, quiet_env, set_threads, table
from services.common.launch import Endpoint

# imported once by the fork server, so that each process starts in a fraction of a second
PRELOAD = ["bench.common", "services.trainer.run", "services.rollout.service", "services.teacher.service",
           "tests.support.tiny_model", "transformers", "transformers.models.qwen2.modeling_qwen2",
           "transformers.tokenization_utils_fast", "tokenizers"]
STUDENT = dict(seed=100, num_layers=1)  # same vocab_size as the teacher = the same tokenizer


@dataclass(frozen=True)
class Job:
    """One trainer process: its student, its teacher, its work."""

    client_id: str
    student: str
    teacher_address: str
    train_file: str
    output_dir: str
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    seed: int


# ------------------------------------------------------------ child processes
def _child_setup() -> None:
    """Quiet libraries; torch threads from OMP_NUM_THREADS (torch was imported before it was set)."""
    import os

    import torch

    from bench.common import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def build_models(root: Path) -> None:
    """The teacher, the student (all trainers start from it) and the prompts, under root."""
    _child_setup()
    build_model(root, "teacher", **BENCH_MODEL)
    build_model(root, "student", **STUDENT)
    with open(root / "train.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"question: what is {i} + {3 * i + 7} ?", "answer": str(4 * i + 7)}) + "\n")


def teacher_process(model: str, ports: Any, stop: Any) -> None:
    """Serve the teacher until `stop` is set; report (grpc, http) ports on `ports`."""
    from services.teacher.service import start_teacher
    from services.teacher.settings import TeacherSettings

    _child_setup()
    run = start_teacher(TeacherSettings(model=model, engine="hf", device="cpu", grpc_port=0, http_port=0))
    try:
        ports.put((run.endpoints.grpc_port, run.endpoints.http_port))
        stop.wait()
    finally:
        run.stop()


def trainer_process(job: Job, barrier: Any) -> None:
    """Start this trainer's rollout, wait for the group, train."""
    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings
    from services.trainer import train
    from services.trainer import load_settings

    _child_setup()
    rollout = start_rollout(RolloutSettings(model=job.student, engine="hf", grpc_port=0, http_port=0))
    try:
        settings = load_settings(
            None, [], student_model=job.student, teacher_address=job.teacher_address,
            rollout_address=f"127.0.0.1:{rollout.endpoints.grpc_port}", client_id=job.client_id,
            train_file=job.train_file, output_dir=job.output_dir, http_port=0, objective="opd",
            max_steps=job.steps, prompts_per_step=job.prompts_per_step, samples_per_prompt=job.samples_per_prompt,
            max_new_tokens=job.max_new_tokens, progress=False, checkpoint_every=0, seed=job.seed)
        barrier.wait(timeout=300)
        train(settings)
    finally:
        rollout.stop()


# ------------------------------------------------------------------- parent
def run_child(ctx: Any, target: Any, *args: Any) -> None:
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed with exit code {p.exitcode}")


@contextmanager
def teacher(ctx: Any, model: Path, timeout: float = 300.0) -> Iterator[Endpoint]:
    """A teacher process for the duration of the block."""
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=teacher_process, args=(str(model), ports, stop), name="teacher")
    proc.start()
    try:
        yield _wait_for_ports(ports, proc, timeout)
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def _wait_for_ports(ports: Any, proc: Any, timeout: float) -> Endpoint:
    import queue

    deadline = time.monotonic() + timeout
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            return Endpoint(*ports.get(timeout=1.0))
        except queue.Empty:
            continue
    raise RuntimeError(f"teacher did not start in {timeout:.0f}s (exit code {proc.exitcode})")


@dataclass
class Group:
    """What one group of N trainers measured."""

    n: int
    tokens: dict[str, int]          # teacher /status tokens per client id
    latency_s: dict[str, float]     # teacher /status mean latency per client id
    requests: int                   # teacher /status requests of the group's clients
    forwards: int                   # batches the teacher ran for them (/metrics)
    rows: dict[str, list[dict]]     # metrics.jsonl per client id
    wall_s: float

    @property
    def span_s(self) -> float:
        starts = [r[0]["time"] - r[0]["time/step"] for r in self.rows.values()]
        return max(r[-1]["time"] for r in self.rows.values()) - min(starts)

    def per_trainer(self, metric: str) -> list[float]:
        """Each trainer's median of `metric` over its steps after the first."""
        return [median([row[metric] for row in (r[1:] or r)]) for r in self.rows.values()]


def run_group(ctx: Any, n: int, teacher_at: Endpoint, work: dict[str, Any], root: Path) -> Group:
    import httpx

    jobs = [Job(client_id=f"n{n}-trainer{i}", student=str(root / "student"), teacher_address=teacher_at.address,
                train_file=str(root / "train.jsonl"), output_dir=str(root / f"n{n}" / f"trainer{i}"), seed=i, **work)
            for i in range(n)]
    barrier = ctx.Barrier(n)
    forwards_before = teacher_forwards(teacher_at)
    t0 = time.perf_counter()
    procs = [ctx.Process(target=trainer_process, args=(job, barrier), name=job.client_id) for job in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"trainer processes failed: {[(p.name, p.exitcode) for p in procs if p.exitcode]}")
    forwards = teacher_forwards(teacher_at) - forwards_before
    clients = httpx.get(f"{teacher_at.http}/status", timeout=10).json()["clients"]
    rows = {j.client_id: [json.loads(line) for line in (Path(j.output_dir) / "metrics.jsonl").read_text().splitlines()]
            for j in jobs}
    return Group(n, {j.client_id: clients[j.client_id]["tokens"] for j in jobs},
                 {j.client_id: clients[j.client_id]["mean_latency_s"] for j in jobs},
                 sum(clients[j.client_id]["requests"] for j in jobs), forwards, rows, wall)


def teacher_forwards(teacher_at: Endpoint) -> int:
    """Batches the teacher has run (the count of its topd_batch_tokens histogram on /metrics)."""
    import httpx

    for line in httpx.get(f"{teacher_at.http}/metrics", timeout=10).text.splitlines():
        if line.startswith("topd_batch_tokens_count"):
            return int(float(line.split()[-1]))
    raise RuntimeError("the teacher's /metrics has no topd_batch_tokens_count")


def report(groups: list[Group], work: dict[str, Any]) -> str:
    base = None
    rows = []
    for g in groups:
        total = sum(g.tokens.values())
        rate = total / g.span_s
        base = base or rate
        step, score = g.per_trainer("time/step"), g.per_trainer("time/score")
        rows.append([g.n, total, rate, rate / base, g.requests / max(g.forwards, 1), median(step),
                     f"{min(step):.2f}-{max(step):.2f}", median(score), median(list(g.latency_s.values())),
                     max(g.tokens.values()) / max(min(g.tokens.values()), 1), g.wall_s])
    return "\n".join([
        f"shared teacher: hf engine, teacher {BENCH_MODEL}; each trainer: OPD, {work['prompts_per_step']} prompts x "
        f"{work['samples_per_prompt']} samples x <= {work['max_new_tokens']} new tokens, {work['steps']} steps, "
        f"its own rollout (hf engine, student {STUDENT})",
        machine_line(),
        table(["trainers", "teacher tokens", "teacher tokens/s", "vs 1", "requests/forward", "step s", "step s range",
               "score s", "teacher latency s", "share spread", "wall s"], rows),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--trainers", default=None, help="Group sizes, run one after the other (default 1,2,4; "
                                                     "--quick 1,2)")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per trainer (default 20, --quick 3)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    quiet_env()
    set_threads(args.threads)  # before the fork server starts: every child inherits it
    sizes = [int(x) for x in (args.trainers or ("1,2" if args.quick else "1,2,4")).split(",")]
    work = dict(steps=args.steps or (3 if args.quick else 20), prompts_per_step=args.prompts_per_step,
                samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="topd-bench-") as tmp:
        root = Path(tmp)
        run_child(ctx, build_models, root)
        with teacher(ctx, root / "teacher") as teacher_at:
            groups = [run_group(ctx, n, teacher_at, work, root) for n in sizes]
        print(report(groups, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
