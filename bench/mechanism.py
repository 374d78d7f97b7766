"""The paper's table on the uniform and the styled task: does TOPD's mechanism show where it can work?

    python -m bench.mechanism                          # 2 tasks x 4 methods x 5 seeds (~2-3 h on 2 busy cores)
    python -m bench.mechanism --tasks styled --seeds 3
    python -m bench.mechanism --quick                  # smoke: 1 seed, 4 steps, 50 test problems

For each task (`arith`: uniform surface forms; `styled`: teacher and student with different styles),
every method (opd, opd_suppress, opd_suppress_control, topd) trains from the task's starting student
against its teacher (services on loopback), seeds outermost so that drift in machine load hits every
method alike. Reported per method: greedy test accuracy at the same steps and at the same wall-clock
budget (OPD's mean time for those steps), mean with a 95% t-interval over seeds; the paired differences
TOPD - OPD and suppress - control (same seed, same prompts) with their 95% intervals; seconds per step;
and the detector against the task's ground truth on a fixed probe batch (`services.trainer.probe_detector`)
before training and on each final student: benign fraction of the high-loss tokens, AUC of D for
errors, precision/recall of the false-alarm calls (benign = positive), mean local OT.

The generated tables go into docs/mechanism.md between the `bench:mechanism` markers (the prose around
them is kept); raw numbers into runs/mechanism/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench.quality import METHODS, PAPER, Plan, _cumulative_times, _trainer_settings, pick

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arith", "styled")
BEGIN, END = "<!-- bench:mechanism begin -->", "<!-- bench:mechanism end -->"
PROBE_KEYS = ("gt/benign_frac", "gt/auc", "gt/auc_forks", "gt/after_error_frac", "gt/fa_precision", "gt/fa_recall", "gt/precision", "gt/recall",
              "topd/mean_ot", "topd/false_alarm_frac", "gt/num_candidates")


def interval(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan half-width for one value)."""
    from scipy import stats

    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], float("nan")
    return statistics.fmean(xs), float(stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def paired(runs: list[dict], a: str, b: str, key: str) -> list[float]:
    """Per-seed differences a - b of `key` (seeds where both ran)."""
    by = {(r["method"], r["seed"]): r[key] for r in runs}
    return [by[(a, s)] - by[(b, s)] for s in sorted({r["seed"] for r in runs}) if (a, s) in by and (b, s) in by]


def probe(settings, student: str, records: list[dict]) -> dict[str, float]:
    from services.trainer import probe_detector

    found = probe_detector(settings.model_copy(update={"student_model": student}), records)
    return {k: float(found.metrics.get(k, float("nan"))) for k in PROBE_KEYS}


def run_one(models, teacher, rollout, work: Path, task: str, method: str, seed: int, plan: Plan,
            probe_records: list[dict]) -> dict[str, Any]:
    """Train one (task, method, seed); probe the detector on the final student while the rollout serves it."""
    from services.trainer import train

    out = work / f"{task}-{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    settings = _trainer_settings(models, teacher, rollout, out, method, seed, plan, task=task,
                                 client_id=f"mechanism-{method}")
    result = train(settings)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    snaps = {int(p.name.split("-")[1]): p / "model" for p in (out / "checkpoints").glob("step-*")}
    return {"task": task, "method": method, "seed": seed, "times": _cumulative_times(result.metrics_file),
            "snapshots": snaps, "s_per_step": statistics.median(r["time/step"] for r in rows[1:] or rows),
            "probe": probe(settings, str(result.final_model), probe_records)}


def run_task(task: str, methods: list[str], plan: Plan, work: Path, n_probe: int, t_start: float) -> dict[str, Any]:
    from services.common.launch import service
    from services.task import arith
    from services.task.models import evaluate
    from services.task.tasks import prepare_task
    from services.trainer import load_settings

    models = prepare_task(task)
    test = arith.read_jsonl(models.test_jsonl)[: plan.n_test]
    probe_records = [json.loads(line) for line in models.test_jsonl.read_text().splitlines()][-n_probe:]
    runs: list[dict[str, Any]] = []
    with service("teacher", models.teacher_dir, work, "--engine", "hf") as teacher, \
            service("rollout", models.student_dir, work, "--engine", "hf") as rollout:
        start = _trainer_settings(models, teacher, rollout, work / f"{task}-probe", "opd_suppress", 0, plan, task=task)
        before = probe(start, str(models.student_dir), probe_records)
        for seed in plan.seeds:
            for method in methods:
                print(f"[{time.time() - t_start:6.0f}s] {task} {method} seed {seed}", flush=True)
                runs.append(run_one(models, teacher, rollout, work, task, method, seed, plan, probe_records))
    del load_settings
    budget = statistics.fmean([r["times"][plan.steps] for r in runs if r["method"] == "opd"] or
                              [max(r["times"][plan.steps] for r in runs)])
    cache: dict[str, float] = {}

    def acc(path: Path) -> float:
        if str(path) not in cache:
            cache[str(path)] = evaluate(path, None, test)
        return cache[str(path)]

    for run in runs:
        at_steps, at_budget, s_budget = pick(run, plan.steps, budget)
        run.update(acc_steps=acc(at_steps), acc_budget=acc(at_budget), steps_in_budget=s_budget)
    return {"task": task, "runs": runs, "budget_s": budget, "before": before,
            "teacher_acc": evaluate(models.teacher_dir, None, test), "student_acc": evaluate(models.student_dir, None, test)}


def _ci(m: float, h: float, pct: bool = False) -> str:
    if not math.isfinite(m):
        return "–"
    scale, digits = (100, 1) if pct else (1, 3)
    return f"{scale * m:.{digits}f}" + (f" ± {scale * h:.{digits}f}" if math.isfinite(h) else "")


def task_markdown(res: dict[str, Any], methods: list[str], plan: Plan) -> str:
    runs, before = res["runs"], res["before"]
    opd_step = statistics.fmean([r["s_per_step"] for r in runs if r["method"] == "opd"] or [float("nan")])
    lines = [f"### Task `{res['task']}`", "",
             f"Teacher test accuracy {100 * res['teacher_acc']:.1f}%, starting student {100 * res['student_acc']:.1f}% "
             f"({plan.n_test} test problems, greedy). Budget for equal wall-clock: {res['budget_s']:.0f} s "
             f"(OPD's mean time for {plan.steps} steps).", "",
             f"Detector before training (probe batch): benign fraction of high-loss tokens "
             f"{_ci(before['gt/benign_frac'], float('nan'))}, AUC of D for errors {_ci(before['gt/auc'], float('nan'))} "
             f"(forks vs benign {_ci(before['gt/auc_forks'], float('nan'))}), "
             f"false-alarm calls precision {_ci(before['gt/fa_precision'], float('nan'))} / recall "
             f"{_ci(before['gt/fa_recall'], float('nan'))}, mean local OT {_ci(before['topd/mean_ot'], float('nan'))}.", "",
             f"| method | test acc @ {plan.steps} steps (%) | test acc @ equal wall-clock (%) | steps in budget | s/step | "
             "time vs OPD | benign frac (after) | AUC of D (after) | AUC forks (after) | false-alarm precision / "
             "recall (after) | mean OT (after) |", "|" + "---|" * 11]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        sps = statistics.fmean(r["s_per_step"] for r in rs)
        pr = {k: interval([r["probe"][k] for r in rs]) for k in PROBE_KEYS}
        lines.append(f"| {m} | {_ci(*interval([r['acc_steps'] for r in rs]), pct=True)} | "
                     f"{_ci(*interval([r['acc_budget'] for r in rs]), pct=True)} | "
                     f"{statistics.fmean(r['steps_in_budget'] for r in rs):.0f} | {sps:.2f} | {sps / opd_step:.2f}x | "
                     f"{_ci(*pr['gt/benign_frac'])} | {_ci(*pr['gt/auc'])} | {_ci(*pr['gt/auc_forks'])} | "
                     f"{_ci(pr['gt/fa_precision'][0], float('nan'))}"
                     f" / {_ci(pr['gt/fa_recall'][0], float('nan'))} | {_ci(*pr['topd/mean_ot'])} |")
    lines += ["", "| paired difference (same seed) | at equal steps (points) | at equal wall-clock (points) | seeds |",
              "|---|---|---|---|"]
    for a, b in (("topd", "opd"), ("opd_suppress", "opd_suppress_control"), ("opd_suppress", "opd")):
        d_steps, d_budget = paired(runs, a, b, "acc_steps"), paired(runs, a, b, "acc_budget")
        if d_steps:
            lines.append(f"| {a} - {b} | {_ci(*interval(d_steps), pct=True)} | {_ci(*interval(d_budget), pct=True)} | "
                         f"{len(d_steps)} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], methods: list[str], plan: Plan, wall_s: float, argv) -> str:
    cmd = "python -m bench.mechanism " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"Command: `{cmd.strip()}` ({wall_s / 60:.0f} min on 2 shared CPU cores; seeds {plan.seeds}; "
            f"{plan.steps} steps of {plan.prompts_per_step} prompts x {plan.samples_per_prompt} samples; "
            f"trainer overrides {plan.overrides}). Intervals: 95% t-intervals over seeds (± half-width; none with one "
            "seed). Detector columns: a fixed probe batch of test prompts x 2 samples, one zero-update detection "
            "on each final student, with the runs' detector settings.", ""]
    paper = (f"The paper (Qwen3-30B-A3B -> Qwen3-4B; average Pass@1 on AIME24/25, HMMT25): OPD {PAPER['opd']['avg']}, "
             f"suppression {PAPER['opd_suppress']['avg']}, control {PAPER['opd_suppress_control']['avg']}, TOPD "
             f"{PAPER['topd']['avg']}; about 29% of high-loss tokens are false alarms; mean OT "
             f"{PAPER['before']['ot']} before, {PAPER['opd']['ot_after']} after OPD, {PAPER['topd']['ot_after']} after "
             f"TOPD; TOPD step {PAPER['overhead']}x OPD's.")
    return "\n".join([BEGIN, *head, *[task_markdown(r, methods, plan) for r in results], paper, END])


def write_doc(path: Path, generated: str) -> None:
    """Replace the text between the markers (or append it) and keep the rest of the file."""
    text = path.read_text() if path.exists() else "# TOPD's mechanism, measured\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--n-probe", type=int, default=None, help="probe prompts (x 2 samples)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "mechanism")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mechanism.md")
    ap.add_argument("--set", action="append", default=[], help="trainer override key=value for every run")
    args = ap.parse_args(argv)

    import yaml

    from bench.common import quiet_libraries

    quiet_libraries()
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    plan = Plan(steps=args.steps or (4 if args.quick else 40), seeds=list(range(args.seeds or (1 if args.quick else 5))),
                snapshot_every=2 if args.quick else 5, n_test=args.n_test or (50 if args.quick else 500),
                prompts_per_step=4 if args.quick else 8, samples_per_prompt=4,
                overrides={"lr": 3e-4, "adv_clip": 5.0, "warmup_steps": 5, "window": 16, "max_candidates": 32,
                           "progress": False, **overrides})
    methods = [m for m in args.methods.split(",") if m]
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results = []
    for task in [t for t in args.tasks.split(",") if t]:
        results.append(run_task(task, methods, plan, args.work, args.n_probe or (8 if args.quick else 32), t_start))
        (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    generated = markdown(results, methods, plan, time.time() - t_start, argv)
    write_doc(args.out, generated)
    print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
