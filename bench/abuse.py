"""Abuse benchmark: a teacher and a rollout under hostile clients, each case for a bounded time.

    python -m bench.abuse            # 6 cases x 20 s: ~3 min on 2 CPU cores
    python -m bench.abuse --quick    # 6 cases x 3 s: < 1 min

The services run as real subprocesses (`topd teacher` / `topd rollout`, hf engine, a tiny model,
loopback, default settings but `--max-message-mb 64`). In each case the abusers run for `--seconds` while
probes measure, every 50 ms, a gRPC health Check of each service (2 s deadline) and a small Score
on the teacher (one sequence of 16 tokens, 5 s deadline, its own client id). The table shows what
the abusers got (status codes), the probes' p50/p99 latency and failures, the teacher's RSS and
the size of its /metrics and /status before and after the case.

cases:
  baseline     the probes alone
  heavy        48 clients, each looping unary Scores of 24 x 512 tokens
  stalled      40 reflection streams on each service that open and never send
  cardinality  500 short-lived connections without client-id, then 500 with random client ids
  garbage      bytes that parse as no message, to every method of both services
  oversize     Scores with more sequences than the queue holds; unary Scores whose response would be
               over the message limit
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import build_model, machine_line, parser, quiet_env, set_threads, table
from services.common.launch import Proc, service

PROBE_INTERVAL_S = 0.05
GARBAGE = b"\xff\xff\xff\xff\xff"  # a field tag whose varint never ends
TEACHER_METHODS = ["/topd.v1.Teacher/GetInfo", "/topd.v1.Teacher/Score", "/topd.v1.Teacher/Generate",
                   "/grpc.health.v1.Health/Check"]
ROLLOUT_METHODS = ["/topd.v1.Rollout/GetInfo", "/topd.v1.Rollout/Sample", "/topd.v1.Rollout/Continue"]


@dataclass
class Env:
    """Where the abusers (in a process of their own, so that their CPU does not slow the probes
    down) find the services, when they stop, and where they file the status codes they got."""

    teacher: str
    rollout: str
    stop: threading.Event | Any
    codes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1


def _code(fn: Callable[[], object]) -> str:
    import grpc

    try:
        fn()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
    except Exception as exc:  # noqa: BLE001 - the SDK's typed errors carry the code first
        return str(exc).split(":", 1)[0]


# ---------------------------------------------------------------------------- the cases
def baseline(env: Env) -> None:
    env.stop.wait()


def heavy(env: Env, clients: int = 48) -> None:
    import grpc

    from topd_client.tensors import to_wire
    from topd_client.wire.topd.v1 import teacher_pb2, teacher_pb2_grpc

    rng = np.random.default_rng(0)
    request = teacher_pb2.ScoreRequest(top_k=8, sequences=[
        teacher_pb2.ScoreSequence(tokens=to_wire(rng.integers(0, 384, 512), "int32"), response_start=256)
        for _ in range(24)])

    def loop(i: int) -> None:
        with grpc.insecure_channel(env.teacher) as ch:
            score = teacher_pb2_grpc.TeacherStub(ch).Score
            while not env.stop.is_set():
                call = score.future(request, timeout=120, metadata=(("client-id", f"heavy-{i}"),))
                while not call.done() and not env.stop.wait(0.05):
                    pass
                if not call.done():
                    call.cancel()  # the case is over: do not wait for the batch
                    break
                env.got(_code(call.result))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))


def stalled(env: Env, per_service: int = 40) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    release = threading.Event()

    def silent():
        release.wait()
        return
        yield  # noqa: unreachable - sends nothing until the case ends

    calls = []
    with grpc.insecure_channel(env.teacher) as t, grpc.insecure_channel(env.rollout) as r:
        for ch in (t, r):
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            calls += [stub.ServerReflectionInfo(silent()) for _ in range(per_service)]
        env.stop.wait()
        for call in calls:
            env.got(call.code().name if call.done() else "held open")
        release.set()
        [call.cancel() for call in calls]


def cardinality(env: Env, connections: int = 500) -> None:
    from topd_client import TeacherClient

    rng = np.random.default_rng(1)
    for i in range(2 * connections):
        if env.stop.is_set():
            break
        client_id = None if i < connections else "rnd-" + "".join(rng.choice(list("0123456789abcdef"), 16))
        with TeacherClient(env.teacher, client_id=client_id, retries=0) as c:
            env.got(_code(lambda: c.score([[1, 2, 3]], [1], timeout=10)))
    env.stop.wait()


def garbage(env: Env) -> None:
    import grpc

    with grpc.insecure_channel(env.teacher) as t, grpc.insecure_channel(env.rollout) as r:
        targets = [(t, m) for m in TEACHER_METHODS] + [(r, m) for m in ROLLOUT_METHODS]
        while not env.stop.is_set():
            for ch, method in targets:
                env.got(_code(lambda: ch.unary_unary(method)(GARBAGE, timeout=10)))


def oversize(env: Env) -> None:
    import grpc

    from topd_client.tensors import to_wire
    from topd_client.wire.topd.v1 import teacher_pb2, teacher_pb2_grpc

    seq = teacher_pb2.ScoreSequence(tokens=to_wire(np.arange(1, 4), "int32"), response_start=1)
    too_many = teacher_pb2.ScoreRequest(sequences=[seq] * 8193)  # the queue holds 8192 by default
    long_seq = teacher_pb2.ScoreSequence(tokens=to_wire(np.arange(512) % 384, "int32"), response_start=1)
    too_big = teacher_pb2.ScoreRequest(sequences=[long_seq] * 300, top_k=64)  # response ~79 MiB > 64 MiB
    with grpc.insecure_channel(env.teacher) as ch:
        stub = teacher_pb2_grpc.TeacherStub(ch)
        while not env.stop.is_set():
            for request in (too_many, too_big):
                env.got(_code(lambda: stub.Score(request, timeout=60)))


CASES: dict[str, Callable[[Env], None]] = {
    "baseline": baseline, "heavy": heavy, "stalled": stalled, "cardinality": cardinality, "garbage": garbage,
    "oversize": oversize,
}


def abuse(name: str, teacher: str, rollout: str, stop: Any, out: Any) -> None:
    """Entry point of the abusers' process: run one case until `stop`, put its status codes on `out`."""
    env = Env(teacher, rollout, stop)
    CASES[name](env)
    out.put(dict(env.codes))


# ---------------------------------------------------------------------------- measuring
class Probe(threading.Thread):
    """Calls `fn` every PROBE_INTERVAL_S until stopped; keeps the latency of each success and counts failures."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn, self.stopped = fn, threading.Event()
        self.ms: list[float] = []
        self.failures: Counter = Counter()

    def run(self) -> None:
        while not self.stopped.is_set():
            t0 = time.perf_counter()
            code = _code(self.fn)
            if code == "OK":
                self.ms.append(1000 * (time.perf_counter() - t0))
            else:
                self.failures[code] += 1
            self.stopped.wait(PROBE_INTERVAL_S)

    def cell(self) -> str:
        """'p50 / p99' ms, plus the failures."""
        text = "-" if not self.ms else f"{np.percentile(self.ms, 50):.1f} / {np.percentile(self.ms, 99):.1f}"
        return text + "".join(f", {n} {code}" for code, n in sorted(self.failures.items()))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rest_sizes(proc: Proc) -> tuple[int, int]:
    """(/metrics lines, /status bytes)."""
    import httpx

    return (len(httpx.get(f"{proc.http}/metrics", timeout=10).text.splitlines()),
            len(httpx.get(f"{proc.http}/status", timeout=10).content))


@dataclass(frozen=True)
class Row:
    case: str
    codes: Counter
    probes: dict[str, str]
    rss_mb: tuple[float, float]
    metrics_lines: tuple[int, int]
    status_bytes: tuple[int, int]


def run_case(name: str, teacher: Proc, rollout: Proc, seconds: float) -> Row:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from topd_client import TeacherClient

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    rss0, (lines0, bytes0) = rss_mb(teacher.proc.pid), rest_sizes(teacher)
    with ExitStack() as stack:
        t_ch = stack.enter_context(grpc.insecure_channel(teacher.address))
        r_ch = stack.enter_context(grpc.insecure_channel(rollout.address))
        small = stack.enter_context(TeacherClient(teacher.address, client_id="probe", retries=0))
        check = health_pb2.HealthCheckRequest()
        probes = {
            "teacher health": Probe(lambda: health_pb2_grpc.HealthStub(t_ch).Check(check, timeout=2)),
            "small Score": Probe(lambda: small.score([list(range(1, 17))], [8], timeout=5)),
            "rollout health": Probe(lambda: health_pb2_grpc.HealthStub(r_ch).Check(check, timeout=2)),
        }
        abuser = ctx.Process(target=abuse, args=(name, teacher.address, rollout.address, stop, out), daemon=True)
        abuser.start()
        [p.start() for p in probes.values()]
        time.sleep(seconds)
        stop.set()
        for p in probes.values():
            p.stopped.set()
            p.join(10)
        codes = Counter(out.get(timeout=120))
        abuser.join(30)
    rss1, (lines1, bytes1) = rss_mb(teacher.proc.pid), rest_sizes(teacher)
    return Row(name, codes, {k: p.cell() for k, p in probes.items()}, (rss0, rss1), (lines0, lines1),
               (bytes0, bytes1))


def report(rows: Sequence[Row], seconds: float) -> str:
    def codes(c: Counter) -> str:
        return ", ".join(f"{code} {n}" for code, n in c.most_common()) or "-"

    return "\n".join([
        f"abuse: teacher + rollout (hf engine, tiny model), {seconds:g} s per case; probes every "
        f"{1000 * PROBE_INTERVAL_S:.0f} ms; latencies p50 / p99 ms",
        machine_line(),
        table(["case", "abusers got", "teacher health", "small Score", "rollout health"],
              [[r.case, codes(r.codes), *r.probes.values()] for r in rows], title="calls"),
        table(["case", "teacher RSS MB before", "after", "/metrics lines before", "after", "/status bytes before",
               "after"],
              [[r.case, r.rss_mb[0], r.rss_mb[1], r.metrics_lines[0], r.metrics_lines[1], r.status_bytes[0],
                r.status_bytes[1]] for r in rows], title="teacher state"),
    ])


def start_both(stack: ExitStack, services: list) -> list[Proc]:
    """Enter the services' contexts at the same time (each waits for its own readiness)."""
    with ThreadPoolExecutor(len(services)) as pool:
        futures = [pool.submit(cm.__enter__) for cm in services]
    for cm, fut in zip(services, futures):
        if fut.exception() is None:
            stack.push(cm)
    return [fut.result() for fut in futures]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None, help="Length of each case (default 20, --quick 3)")
    p.add_argument("--cases", default=",".join(CASES), help=f"Comma-separated subset of {', '.join(CASES)}")
    args = p.parse_args(argv)
    quiet_env()
    set_threads(args.threads)
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := sorted(set(names) - set(CASES)):
        p.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="topd-abuse-") as tmp, ExitStack() as stack:
        model = build_model(Path(tmp), "tiny")
        teacher, rollout = start_both(stack, [
            service("teacher", model, Path(tmp), "--engine", "hf", "--max-top-k", "64", "--max-message-mb", "64"),
            service("rollout", model, Path(tmp), "--engine", "hf")])
        rows = [run_case(name, teacher, rollout, seconds) for name in names]
        print(report(rows, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
