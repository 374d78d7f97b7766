"""What the benchmarks share: interleaved timing with warm-up and repeats, medians, tables, tiny models.

The machine these run on is shared and noisy, so a benchmark never times one side after the other:
it warms every case up, then runs rounds that visit every case once, in alternating order
(A B C, C B A, ...), so that drift in the background load hits every case alike. It reports
medians, and compares two cases by the median of their per-round ratios (paired), not by the
ratio of two medians taken at different times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# The model of the throughput benchmark: small enough for 2 CPU cores, big enough that the forward
# (not the RPC) is what a batch costs. head_dim = 256 / 4 = 64.
BENCH_MODEL = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2)


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


@dataclass(frozen=True)
class Timings:
    """Seconds per round of every case; round i of every case ran in the same stretch of time."""

    seconds: dict[str, list[float]]

    def median_s(self, case: str) -> float:
        return median(self.seconds[case])

    def rate(self, case: str, work: float) -> float:
        """`work` units per second at the median time."""
        return work / self.median_s(case)

    def speed_ratio(self, case: str, baseline: str) -> float:
        """Median over rounds of baseline_time / case_time: > 1 means `case` is faster."""
        return median([b / c for b, c in zip(self.seconds[baseline], self.seconds[case])])


def time_interleaved(cases: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> Timings:
    """Run each case `warmup` times untimed, then `repeats` timed rounds in alternating order."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            cases[name]()
            seconds[name].append(time.perf_counter() - t0)
    return Timings(seconds)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table (markdown pipe syntax, so it pastes into docs/benchmarks.md as is)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    out = [line(headers), rule, *(line(r) for r in cells)]
    if title:
        out.insert(0, f"\n{title}\n")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def machine_line() -> str:
    """Cores, torch threads and load average: the context every number needs (imports no torch)."""
    from importlib.metadata import version

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else os.environ.get("OMP_NUM_THREADS", "default")
    return (f"{os.cpu_count()} CPU cores, torch {version('torch')} with {threads} thread(s) per process, "
            f"load avg {load} (1, 5, 15 min)")


def build_model(root: Path, name: str, **spec: Any) -> Path:
    """A tiny Qwen2 model + tokenizer under root/name (same vocab_size = same tokenizer)."""
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(root / name, TinyModelSpec(**spec))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Fewer repeats/steps: a smoke run in under 40 s")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (OMP_NUM_THREADS for subprocesses). More threads than free "
                        "cores made every forward erratic on the shared 2-core machine: OpenMP threads wait "
                        "for a sibling that the OS has descheduled")
    return p


def set_threads(n: int) -> None:
    """OMP_NUM_THREADS for this process and the ones it starts; torch's threads too if it is imported."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def quiet_env() -> None:
    """Environment for quiet, offline tokenizers/transformers (inherited by child processes)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_libraries() -> None:
    """No progress bars or info logs from transformers/tokenizers in benchmark output."""
    quiet_env()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
