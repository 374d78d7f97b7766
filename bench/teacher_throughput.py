"""Teacher throughput: tokens/s through the service (client on loopback) vs an in-process forward.

    python -m bench.teacher_throughput            # full run, < 3 min on 2 CPU cores
    python -m bench.teacher_throughput --quick    # smoke run, < 40 s

One run measures, on the same batches (B sequences x L tokens, scored from `response_start` on,
top-k at every response position):

* in-process: `HFEngine.score` called directly, the cost of the forward alone, on a worker thread as
  the teacher's batcher runs it, and once more on the main thread, which was 10-20% slower here
  (probably glibc trimming the main heap: MALLOC_TRIM_THRESHOLD_=1000000000 or MALLOC_ARENA_MAX=1
  closed the gap in a one-off check); the ratio is taken against the faster worker-thread forward;
* service, unary / stream: `TeacherClient.score` against the teacher started in this process
  (`start_teacher`, hf engine, gRPC on loopback), one client;
* 4 and 8 clients: the same B sequences split evenly across N concurrent clients (threads, each
  its own client id), so the teacher's batcher has to merge them back into one forward.

Every case runs once per round, rounds alternate their order, and the table shows medians; the
"vs in-process" column is the median of per-round ratios (service tokens/s / in-process tokens/s).
"server forward" is the time the teacher's batcher thread spent inside `HFEngine.score` (a probe
patched onto the class for this run), so "overhead" = wall - forward is what the service adds:
request and response (de)serialisation, gRPC, the batcher's wait, copies.
tokens/s counts every token of every sequence (prompt and response), i.e. what the forward runs over.

The forward's own run-to-run noise on a shared machine (tens of percent) is far larger than what the
service adds, so a last table replaces the forward with a canned answer and times the service alone,
with the teacher's default batcher wait (max_wait_ms=5) and with none: that fixed cost per request
says how short a forward can get (a faster engine, a GPU) before the ratio falls under the target.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bench.common import (BENCH_MODEL, Timings, build_model, machine_line, median, parser, quiet_libraries,
                          set_threads, table, time_interleaved)

TARGET_RATIO = 0.9
BASE = "in-process"                 # the forward on a worker thread, as the teacher's batcher runs it
MAIN = "in-process, main thread"    # the same on the main thread: slower here (see above)
MIN_ROUNDS_TO_JUDGE = 3


@dataclass(frozen=True)
class Workload:
    """One batch: `batch` sequences of `seq_len` random token ids, scored from `response_start` on."""

    batch: int = 32
    seq_len: int = 256
    response_start: int = 128
    top_k: int = 20
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def sequences(self, vocab_size: int) -> tuple[list[np.ndarray], list[int]]:
        rng = np.random.default_rng(self.seed)
        seqs = [rng.integers(0, vocab_size, self.seq_len, dtype=np.int32) for _ in range(self.batch)]
        return seqs, [self.response_start] * self.batch


class ForwardProbe:
    """Seconds of each `HFEngine.score` call run by a teacher's batcher thread (patched onto the class).

    With `canned`, the batcher's calls return slices of those outputs instead of running the model:
    the service then costs only what it adds to a forward.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[float] = []

    @contextmanager
    def installed(self, canned: list | None = None) -> Iterator["ForwardProbe"]:
        from services.common.engine_hf import HFEngine

        real = HFEngine.score

        def timed(engine, sequences, *args, **kwargs):
            if not threading.current_thread().name.startswith("topd-batcher"):
                return real(engine, sequences, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return canned[:len(sequences)] if canned is not None else real(engine, sequences, *args, **kwargs)
            finally:
                with self._lock:
                    self._calls.append(time.perf_counter() - t0)

        HFEngine.score = timed  # type: ignore[method-assign]
        try:
            yield self
        finally:
            HFEngine.score = real  # type: ignore[method-assign]

    def take(self) -> list[float]:
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


class Case:
    """A callable case that also files the probe's forwards of each call (one entry per call)."""

    def __init__(self, fn: Callable[[], Any], probe: ForwardProbe) -> None:
        self.fn, self.probe = fn, probe
        self.forwards: list[list[float]] = []

    def __call__(self) -> None:
        self.probe.take()
        self.fn()
        self.forwards.append(self.probe.take())

    def timed_forwards(self, repeats: int) -> list[list[float]]:
        return self.forwards[len(self.forwards) - repeats:]  # the warm-up calls come first


class Clients:
    """N clients (own client ids) that score their share of the batch at the same time."""

    def __init__(self, address: str, n: int, tag: str, seqs: Sequence[np.ndarray], starts: Sequence[int],
                 top_k: int) -> None:
        from topd_client.teacher import TeacherClient

        self.clients = [TeacherClient(address, client_id=f"bench-{tag}-{n}x-{i}") for i in range(n)]
        self.shares = [(list(seqs[i::n]), list(starts[i::n])) for i in range(n)]
        self.top_k = top_k
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"bench-{n}x")

    def __call__(self) -> None:
        futures = [self.pool.submit(c.score, s, r, top_k=self.top_k) for c, (s, r) in zip(self.clients, self.shares)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.clients:
            c.close()


class Teacher:
    """A teacher started in this process, with its single client and its N-client groups."""

    def __init__(self, model: Path, work: Workload, seqs: list[np.ndarray], starts: list[int],
                 clients: Sequence[int], max_wait_ms: float) -> None:
        from services.teacher.service import start_teacher
        from services.teacher.settings import TeacherSettings
        from topd_client.teacher import TeacherClient

        self.service = start_teacher(TeacherSettings(
            model=str(model), engine="hf", device="cpu", dtype="float32", grpc_port=0, http_port=0,
            max_top_k=max(work.top_k, 1), max_wait_ms=max_wait_ms))
        address = f"127.0.0.1:{self.service.endpoints.grpc_port}"
        tag = f"w{max_wait_ms:g}"
        one = TeacherClient(address, client_id=f"bench-{tag}-1x-0")
        self.one = one
        self.groups = {n: Clients(address, n, tag, seqs, starts, work.top_k) for n in clients if n > 1}
        self.calls: dict[str, Callable[[], Any]] = {
            "service, unary": lambda: one.score(seqs, starts, top_k=work.top_k, stream=False),
            "service, stream": lambda: one.score(seqs, starts, top_k=work.top_k, stream=True),
            **{f"{n} clients": g for n, g in self.groups.items()},
        }

    def close(self) -> None:
        for g in self.groups.values():
            g.close()
        self.one.close()
        self.service.stop()


def run(work: Workload, clients: Sequence[int], repeats: int, bare_repeats: int, model: Path) -> str:
    """Start the teachers here, time every case interleaved (one warm-up round), return the report."""
    from services.common.engine_hf import HFEngine

    engine = HFEngine(str(model), dtype="float32", device="cpu")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-forward")
    seqs, starts = work.sequences(engine.meta.vocab_size)
    teacher = Teacher(model, work, seqs, starts, clients, max_wait_ms=5.0)
    no_wait = Teacher(model, work, seqs, starts, clients, max_wait_ms=0.0)
    probe = ForwardProbe()
    try:
        # 1. the real forward, in-process vs through the service
        real = {BASE: Case(lambda: worker.submit(engine.score, seqs, starts, work.top_k).result(), probe),
                MAIN: Case(lambda: engine.score(seqs, starts, work.top_k), probe),
                **{name: Case(fn, probe) for name, fn in teacher.calls.items()}}
        with probe.installed():
            t_real = time_interleaved(real, repeats=repeats, warmup=1)
        # 2. a canned forward: what the service adds, with the default batcher wait and with none
        canned = engine.score(seqs, starts, work.top_k)
        bare = {**{(name, 5.0): Case(fn, probe) for name, fn in teacher.calls.items()},
                **{(name, 0.0): Case(fn, probe) for name, fn in no_wait.calls.items()}}
        with probe.installed(canned):
            t_bare = time_interleaved(bare, repeats=bare_repeats, warmup=2)
        return report(work, clients, Results(
            t_real, {name: c.timed_forwards(repeats) for name, c in real.items()},
            t_bare, {key: c.timed_forwards(bare_repeats) for key, c in bare.items()}))
    finally:
        teacher.close()
        no_wait.close()
        worker.shutdown()
        engine.close()


@dataclass(frozen=True)
class Results:
    """Timings of the real-forward cases (with their server forwards) and of the canned-forward cases."""

    real: Timings
    forwards: dict[str, list[list[float]]]        # per real case, per timed round: server forward seconds
    bare: Timings                                 # keyed (case, max_wait_ms)
    bare_forwards: dict[Any, list[list[float]]]

    def overhead_ms(self, case: str) -> float:
        """Median over rounds of wall - server forward: what the service added to the forward."""
        if case in (BASE, MAIN):
            return 0.0
        return 1000 * median([w - sum(f) for w, f in zip(self.real.seconds[case], self.forwards[case])])

    def forward_s(self, case: str) -> float:
        return self.real.median_s(case) if case in (BASE, MAIN) else median([sum(f) for f in self.forwards[case]])


def report(work: Workload, clients: Sequence[int], r: Results) -> str:
    t = r.real
    one = [[name, t.median_s(name), t.rate(name, work.tokens), t.speed_ratio(name, BASE), r.forward_s(name),
            r.overhead_ms(name)] for name in (BASE, MAIN, "service, unary", "service, stream")]
    many = []
    for n in clients:
        default = "service, stream" if work.batch > 8 else "service, unary"  # TeacherClient's default
        name = default if n == 1 else f"{n} clients"
        many.append([n, work.batch // n, t.median_s(name), t.rate(name, work.tokens), t.speed_ratio(name, BASE),
                     median([len(f) for f in r.forwards[name]]), r.overhead_ms(name)])
    bare = []
    for name in [case for case, wait in r.bare_forwards if wait == 5.0]:
        row: list[Any] = [name]
        for wait in (5.0, 0.0):
            row += [1000 * r.bare.median_s((name, wait)), median([len(f) for f in r.bare_forwards[(name, wait)]])]
        bare.append(row)
    return "\n".join([
        f"teacher throughput: {work.batch} sequences x {work.seq_len} tokens, response from {work.response_start}, "
        f"top-k {work.top_k}; hf engine, float32, cpu",
        machine_line(),
        f"{len(t.seconds[BASE])} interleaved rounds after warm-up; medians; "
        "'vs in-process' = median of per-round ratios",
        table(["path", "median s", "tokens/s", "vs in-process", "server forward s", "overhead ms"], one,
              title="one client"),
        table(["clients", "seqs/client", "median s", "aggregate tokens/s", "vs in-process", "forwards/round",
               "overhead ms"], many, title=f"concurrent clients (the same {work.batch} sequences split across them)"),
        table(["path", "ms, wait 5 ms", "forwards", "ms, wait 0", "forwards"], bare,
              title=f"service overhead: forward replaced by a canned answer ({len(r.bare.seconds[bare[0][0], 5.0])} "
                    "rounds; teacher max_wait_ms 5 (default) vs 0)"),
        "",
        *verdict(t, 1000 * t.median_s(BASE), 1000 * r.bare.median_s(("service, unary", 5.0))),
    ])


def verdict(t: Timings, forward_ms: float, unary_ms: float) -> list[str]:
    ratios = {name: t.speed_ratio(name, BASE) for name in t.seconds if name not in (BASE, MAIN)}
    worst = min(ratios, key=ratios.get)
    rounds = len(t.seconds[BASE])
    judged = ("holds" if ratios[worst] >= TARGET_RATIO else "MISSED") if rounds >= MIN_ROUNDS_TO_JUDGE else \
        f"not judged from {rounds} round(s), run without --quick"
    return [
        f"target service/in-process >= {TARGET_RATIO}: {judged} (lowest {ratios[worst]:.3f}, {worst})",
        f"from the overhead alone: forward {forward_ms:.0f} ms / (forward + unary overhead {unary_ms:.1f} ms) = "
        f"{forward_ms / (forward_ms + unary_ms):.3f}; the ratio drops below {TARGET_RATIO} for forwards under "
        f"{unary_ms * TARGET_RATIO / (1 - TARGET_RATIO):.0f} ms",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="Sequences per batch (default 32, --quick 8)")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence")
    p.add_argument("--response-start", type=int, default=128, help="First scored token")
    p.add_argument("--top-k", type=int, default=20, help="Top-k per response position")
    p.add_argument("--clients", default="1,4,8", help="Concurrent client counts (each must divide --batch)")
    p.add_argument("--repeats", type=int, default=None, help="Timed rounds (default 11, --quick 1)")
    p.add_argument("--model", type=Path, default=None, help="Model dir to use instead of building the bench model")
    args = p.parse_args(argv)
    quiet_libraries()
    set_threads(args.threads)
    batch = args.batch or (8 if args.quick else 32)
    clients = [int(x) for x in args.clients.split(",")]
    if any(n < 1 or batch % n for n in clients):
        p.error(f"every --clients value must divide the batch, {batch}")
    work = Workload(batch, args.seq_len, args.response_start, args.top_k)
    repeats = args.repeats or (1 if args.quick else 11)
    with tempfile.TemporaryDirectory(prefix="topd-bench-") as tmp:
        model = args.model or build_model(Path(tmp), "teacher", **BENCH_MODEL)
        print(run(work, clients, repeats, 5 if args.quick else 15, model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
