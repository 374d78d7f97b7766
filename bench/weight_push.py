"""Weight push at real student sizes: each transport's speed, the rollout's extra memory, the serving pause.

    python -m bench.weight_push                 # ~0.1B, 0.5B and 1B bfloat16 students; ~10 min on 2 cores
    python -m bench.weight_push --quick         # the 0.1B student only, 3 pushes; ~2 min
    python -m bench.weight_push --engine vllm --sizes 0.1B   # vLLM-CPU (it serves float32 only)

A `topd rollout` subprocess (hf engine in bfloat16 by default) receives a perturbed state dict in
its serving dtype through `RolloutClient.update_weights`, once per transport per round: `grpc`
(buckets streamed over loopback) and `shm` (one file in a tmpfs directory both processes see, and
only the manifest over gRPC); warm-up, then interleaved rounds (bench/common.py). Per push:
seconds on the sender (the whole protocol: write or stream, verify, apply, commit), GB/s of
payload, the rollout's peak memory above its level just before the push as a multiple of the
payload (the peak RSS of its processes, a vLLM engine process included, plus its staging files
in tmpfs), and the serving pause the rollout reports. The shm sender's own file (1x payload in
tmpfs, rewritten in place by the next push) is the trainer's memory, not counted here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from bench.common import build_model, machine_line, median, parser, quiet_libraries, set_threads, table, \
    time_interleaved
from services.common.launch import service

# head_dim 64 everywhere; vocab 384 (the tiny tokenizer), so nearly all parameters are in the layers.
SIZES = {
    "0.1B": dict(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=4),
    "0.5B": dict(hidden_size=1280, intermediate_size=4096, num_layers=24, num_heads=20, num_kv_heads=4),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=8),
}
TRANSPORTS = ("grpc", "shm")


class MemoryPeak:
    """The rollout's peak memory above its level at `reset()`: the peak RSS of each process of its
    tree (the kernel's high-water mark, reset through /proc/PID/clear_refs: exact, and no polling
    of a 2-core machine's CPU), plus the largest its staging files in tmpfs got (polled)."""

    def __init__(self, pid: int, staging: Path) -> None:
        self.pid, self.staging = pid, staging
        self._base = self._staged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        import psutil

        root = psutil.Process(self.pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]

    @staticmethod
    def _status_kib(pid: int, field: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def _staged_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.staging):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self._staged = max(self._staged, self._staged_bytes())

    def reset(self) -> None:
        pids = self._pids()
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._base = sum(self._status_kib(pid, "VmRSS") << 10 for pid in pids) + self._staged_bytes()
        self._staged = 0

    def peak_above(self) -> int:
        self._staged = max(self._staged, self._staged_bytes())
        return sum(self._status_kib(pid, "VmHWM") << 10 for pid in self._pids()) + self._staged - self._base

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def tmpfs_dir() -> Iterator[Path]:
    """A directory in /dev/shm (memory-backed, as a shared volume would be), removed afterwards."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="topd-bench-push-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_student(root: Path, size: str, dtype: str) -> Path:
    """A random Qwen2 student, saved in the dtype it is served in (a 1B float32 init is 4 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return build_model(root, f"student-{size}", **SIZES[size])
    finally:
        torch.set_default_dtype(previous)


def run_size(size: str, engine: str, dtype: str, repeats: int, root: Path) -> tuple[list[list], dict[str, float]]:
    import torch
    from safetensors.torch import load_file

    from topd_client import RolloutClient

    model = build_student(root, size, dtype)
    weights = {}
    for f in sorted(model.glob("*.safetensors")):
        weights.update({n: t.to(getattr(torch, dtype)) + 0.01 for n, t in load_file(f).items()})
    params = sum(t.numel() for t in weights.values())
    with tmpfs_dir() as shm, service("rollout", model, root, "--engine", engine, "--dtype", dtype, "--shm-dir",
                                     str(shm / "shared"), "--staging-dir", str(shm / "staging")) as proc, \
            RolloutClient(proc.address, retries=0) as client:
        (shm / "staging").mkdir(exist_ok=True)
        memory = MemoryPeak(proc.proc.pid, shm / "staging")
        version = iter(range(1, 10_000))
        pauses: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        verifies: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        peaks: dict[str, list[int]] = {t: [] for t in TRANSPORTS}
        payload = 0

        def push(transport: str) -> None:
            nonlocal payload
            memory.reset()
            result = client.update_weights(weights, next(version), transport=transport)
            peaks[transport].append(memory.peak_above())
            pauses[transport].append(result.pause_seconds)
            verifies[transport].append(result.verify_seconds)
            payload = result.total_bytes
            assert result.transport == transport, result

        served = []
        for t in TRANSPORTS:  # warm-up, and both transports serve the same weights
            push(t)
            served.append(client.continue_from([np.arange(3, 40, dtype=np.int32)], max_tokens=4,
                                                temperature=0.0)[0][0].logprobs)
        if engine == "hf" and not np.array_equal(*served):
            raise AssertionError(f"grpc and shm serve different weights: {served}")
        for t in TRANSPORTS:
            pauses[t].clear()
            verifies[t].clear()
            peaks[t].clear()
        timings = time_interleaved({t: (lambda t=t: push(t)) for t in TRANSPORTS}, repeats=repeats, warmup=0)
        memory.close()
    rows = []
    for t in TRANSPORTS:
        s = timings.median_s(t)
        rows.append([f"{size} ({params / 1e9:.2f}B)", t, payload / 2**20, s, payload / s / 1e9,
                     median(peaks[t]) / payload, median(verifies[t]), median(pauses[t])])
    summary = {"shm": payload / timings.median_s("shm") / 1e9, "grpc": payload / timings.median_s("grpc") / 1e9,
               "ratio": timings.speed_ratio("shm", "grpc"), "grpc_peak": median(peaks["grpc"]) / payload}
    shutil.rmtree(model, ignore_errors=True)
    return rows, summary


def summary_line(s: dict[str, float]) -> str:
    return (f"weight_push: shm {s['shm']:.2f} GB/s, grpc {s['grpc']:.2f} GB/s, shm/grpc {s['ratio']:.2f}x, "
            f"grpc peak {s['grpc_peak']:.2f} x payload")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None, help="Student sizes (default: all; "
                   "--quick: 0.1B)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="Rollout engine")
    p.add_argument("--repeats", type=int, default=None, help="Timed pushes per transport (default 5, --quick 3)")
    args = p.parse_args(argv)
    quiet_libraries()
    set_threads(args.threads)
    sizes = args.sizes or (["0.1B"] if args.quick else list(SIZES))
    dtype = "bfloat16" if args.engine == "hf" else "float32"  # vLLM-CPU crashed on bfloat16 here
    repeats = args.repeats or (3 if args.quick else 5)
    rows, lines = [], []
    with tempfile.TemporaryDirectory(prefix="topd-bench-") as tmp:
        for size in sizes:
            t0 = time.perf_counter()
            size_rows, summary = run_size(size, args.engine, dtype, repeats, Path(tmp))
            rows += size_rows
            lines.append(f"{size}: {summary_line(summary)} ({time.perf_counter() - t0:.0f} s with model build)")
    print(f"weight push into a {dtype} rollout ({args.engine} engine); median of {repeats} interleaved pushes per "
          f"transport after a warm-up; {machine_line()}")
    print(table(["student", "transport", "payload MiB", "push s", "GB/s", "rollout peak above idle, x payload",
                 "verify s", "serving pause s"], rows))
    print("\n".join(lines[:-1]))
    print(lines[-1].split(": ", 1)[1].rsplit(" (", 1)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
