"""bench/quality.py's statistics and bookkeeping, by hand (the bench itself is a benchmark, not a test)."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.quality import (BEGIN, END, REUSE_WITHIN, bootstrap_ci, extend_grid, paired_differences,
                           markers, planned_steps, steps_cpu_s, write_between_markers)


def test_bootstrap_ci_by_hand() -> None:
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)  # one seed: no spread to resample
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    mean, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=4000)
    # Means of 2 draws from {0, 1}: 0 (p 1/4), 0.5 (1/2), 1 (1/4): the 2.5% and 97.5% points are 0 and 1.
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    xs = [0.61, 0.64, 0.70, 0.72, 0.80]
    mean, lo, hi = bootstrap_ci(xs)
    assert mean == pytest.approx(statistics.fmean(xs)) and min(xs) < lo < mean < hi < max(xs)
    assert bootstrap_ci(xs) == bootstrap_ci(xs)  # seeded
    assert all(v != v for v in bootstrap_ci([]))  # nan


def test_paired_differences_match_seeds() -> None:
    assert paired_differences({0: 0.8, 1: 0.6, 2: 0.9}, {1: 0.5, 0: 0.7}) == pytest.approx([0.1, 0.1])


def test_extend_grid_until_the_best_lr_is_inside() -> None:
    grid = [2.5e-4, 5e-4, 1e-3]
    assert extend_grid(grid, {2.5e-4: 0.72, 5e-4: 0.65, 1e-3: 0.56}) == pytest.approx(1.25e-4)
    assert extend_grid(grid, {2.5e-4: 0.70, 5e-4: 0.75, 1e-3: 0.80}) == pytest.approx(2e-3)
    assert extend_grid(grid, {2.5e-4: 0.70, 5e-4: 0.80, 1e-3: 0.80}) is None  # tie: the smaller, inside
    assert extend_grid([1e-3], {1e-3: 0.5}) is None  # one lr: nothing to sweep


def test_steps_cpu_s_leaves_the_start_out() -> None:
    # Start-up cost 10 s, then 2 s a step: the clock reads 12, 14, 16, 18 after steps 1..4 -> 4 steps = 8 s.
    assert steps_cpu_s([12.0, 14.0, 16.0, 18.0]) == pytest.approx(8.0)
    assert steps_cpu_s([5.0]) != steps_cpu_s([5.0])  # nan: one step has no rate


def test_planned_steps_reuses_near_plans() -> None:
    assert planned_steps(100.0, 1.0, 100) == 100
    assert planned_steps(100.0, 1.0 / (1 + REUSE_WITHIN), 100) == 100  # 115 steps: within 15%, reuse
    assert planned_steps(100.0, 2.75, 100) == 36  # TOPD-like: 2.75x the cost per step
    assert planned_steps(100.0, 0.2, 100) == 500
    assert planned_steps(1.0, 10.0, 100) == 1


def test_write_between_markers_keeps_the_rest(tmp_path) -> None:
    doc = tmp_path / "results.md"
    write_between_markers(doc, "table 1\n")
    assert doc.read_text() == f"{BEGIN}\ntable 1\n{END}\n"
    doc.write_text("# Results\n\nintro\n\n" + doc.read_text() + "\n## What it says\n\nanalysis\n")
    write_between_markers(doc, "table 2\n")
    assert doc.read_text() == f"# Results\n\nintro\n\n{BEGIN}\ntable 2\n{END}\n\n## What it says\n\nanalysis\n"


def test_each_task_has_its_own_block(tmp_path) -> None:
    doc = tmp_path / "results.md"
    write_between_markers(doc, "arith 1\n")
    write_between_markers(doc, "styled 1\n", task="styled")
    write_between_markers(doc, "arith 2\n")
    begin, end = markers("styled")
    assert doc.read_text() == f"{BEGIN}\narith 2\n{END}\n\n{begin}\nstyled 1\n{end}\n"


class _FakeBench:
    """Runs cost `cost[method]` CPU-seconds and teacher tokens a step; validation accuracy peaks at lr 2e-3
    for "a", test accuracy is a function of (method, seed, steps): run_plan's bookkeeping, not training."""

    cost = {"a:full": 1.0, "b:full": 2.0, "sft": 0.5}

    def __init__(self) -> None:
        self.calls: list = []

    def result(self, key, with_val: bool = False) -> dict:
        self.calls.append(key)
        res = {"steps": key.steps, "cpu_s": self.cost[key.method] * key.steps,
               "teacher_tokens": self.cost[key.method] * key.steps, "wall_s": 1.0,
               "test_acc": 0.5 + 0.01 * key.seed + 0.001 * key.steps, "diagnostics": {}}
        if with_val:
            res["val_acc"] = -abs(key.lr - 2e-3) if key.method == "a:full" else -key.lr
        return res


def test_run_plan_sweeps_extends_and_plans_budgets() -> None:
    from bench.quality import Plan, run_plan

    plan = Plan(methods=("a:full", "b:full", "sft"), steps=10, seeds=2, on_policy_lrs=(5e-4, 1e-3),
                sft_lrs=(1e-3,), reference="a:full")
    bench = _FakeBench()
    out = run_plan(bench, plan)
    assert out["best_lr"] == {"a:full": pytest.approx(2e-3), "b:full": pytest.approx(1.25e-4), "sft": 1e-3}
    assert sorted(out["sweep"]["a:full"]) == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3])  # grew until 2e-3 was inside
    assert len(out["sweep"]["b:full"]) == 4  # best at the low edge twice: at most MAX_EXTENSIONS = 2 more
    assert out["sweep"]["sft"] == {1e-3: None}  # one lr: no sweep, no validation run
    assert out["budgets"] == {"cpu_s": 10.0, "teacher_tokens": 10.0}  # the reference's cost at 10 steps
    # equal budgets: b costs 2x a step -> 5 steps, sft 0.5x -> 20; a stays at 10
    assert {m: r[0]["steps"] for m, r in out["comparisons"]["cpu_s"].items()} == {"a:full": 10, "b:full": 5, "sft": 20}
    assert set(out["comparisons"]["steps"]["b:full"]) == {0, 1}


def test_paired_table_compares_the_papers_pairs() -> None:
    from bench.quality import paired_table

    def runs(accs):
        return {s: {"test_acc": a} for s, a in enumerate(accs)}

    comparisons = {"topd:full": runs([0.7, 0.8]), "opd:full": runs([0.6, 0.6]), "sft": runs([0.9, 0.9])}
    out = {"comparisons": {w: comparisons for w in ("steps", "cpu_s", "teacher_tokens")}}
    lines = paired_table(out, ["opd:full", "topd:full", "sft"])
    rows = [line for line in lines if line.startswith("| topd")]
    # per-seed differences +10 and +20 points: mean +15, the bootstrap's 2.5% / 97.5% points are +10 / +20
    assert rows == ["| topd:full - opd:full | " + " | ".join(["+15.0 [+10.0, +20.0]"] * 3) + " |"]
    assert paired_table(out, ["opd:full", "sft"]) == []
    # several estimators: each pair within one estimator (topd:full is never compared with opd:sampled)
    comparisons.update({"opd:sampled": runs([0.5, 0.5]), "topd:sampled": runs([0.6, 0.6])})
    lines = paired_table(out, ["opd:sampled", "opd:full", "sft", "topd:sampled", "topd:full"])
    assert [line.split(" | ")[0] for line in lines if line.startswith("| topd")] == [
        "| topd:sampled - opd:sampled", "| topd:full - opd:full"]


def test_cached_result_computes_each_run_once_across_processes(tmp_path) -> None:
    """Two bench processes sharing a run cache: the second waits on the run's lock and reads the first's
    result instead of training it again (threads with their own lock files stand in for the processes)."""
    import threading
    import time

    from bench.quality import cached_result

    calls: list[int] = []

    def compute(out):
        calls.append(1)
        time.sleep(0.3)  # long enough that the other thread arrives while the run is in progress
        return {"test_acc": 0.5, "n": len(calls)}

    got: list[dict] = []
    threads = [threading.Thread(target=lambda: got.append(cached_result(tmp_path / "run", compute)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and got == [{"test_acc": 0.5, "n": 1}] * 2
    # a later reader adds what the cached result lacks, once
    def add_val(res):
        if "val_acc" in res:
            return False
        res["val_acc"] = 0.4
        return True

    res = cached_result(tmp_path / "run", compute, add_val)
    assert res["val_acc"] == 0.4 and calls == [1]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["val_acc"] == 0.4
