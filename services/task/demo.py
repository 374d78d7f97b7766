"""`topd demo`: distil the built-in teacher into the built-in student on this machine, end to end.

Prepares (or reuses) the task's models, starts the teacher (transformers) and rollout (vLLM by
default) services as subprocesses on free loopback ports, naming their models `builtin:<task>/<role>`
as a user would, measures the student and teacher on the test split, trains with TOPD on the task's
default data (progress bar: step, KL, accuracy), measures again, and writes a run directory:
metrics.jsonl, TensorBoard events (tb/), report.json, report.md, curves.png and the final student in
Hugging Face format. The services are shut down on every exit path, Ctrl-C included.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.launch import cpu_seconds, free_port, service
from services.task import arith
from services.task.models import DEFAULT_PRESET, max_new_tokens_for, progress_bar
from services.task.tasks import prepare_task, task_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; `quick` is a short run (tests, smoke runs)."""

    quick: bool = False
    task: str = DEFAULT_PRESET  # a built-in task (services.task.tasks.BUILTIN_TASKS)
    run_dir: Path = Path("runs/demo")
    objective: str = "topd"
    steps: int | None = None
    rollout_engine: str = "vllm"
    report_to: list[str] | None = None  # None: tensorboard when it is installed
    n_test: int | None = None
    seed: int = 0
    progress: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def max_steps(self) -> int:
        return self.steps if self.steps is not None else (4 if self.quick else 200)

    @property
    def test_size(self) -> int:
        return self.n_test if self.n_test is not None else (64 if self.quick else 1000)

    @property
    def eval_size(self) -> int:
        return 32 if self.quick else 500  # one evaluation's noise ~1.5 points

    def tracking(self) -> list[str]:
        if self.report_to is not None:
            return list(self.report_to)
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def _records(path: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _checker(record: dict[str, Any], text: str) -> bool:
    return arith.check(arith.Problem.from_json(record), text)


def evaluate(client, tokenizer, records: list[dict[str, Any]], max_tokens: int, generate_attr: str,
             desc: str = "", progress: bool = False, chunk: int = 128) -> float:
    """Greedy accuracy through a service, measured as the trainer's evaluation measures it (with a
    progress bar named `desc`)."""
    from services.trainer import greedy_accuracy

    ids = [np.asarray(tokenizer(r["prompt"])["input_ids"], dtype=np.int32) for r in records]
    correct = 0.0
    with progress_bar(len(records), desc, progress, unit="problem") as bar:
        for lo in range(0, len(records), chunk):
            acc, _ = greedy_accuracy(getattr(client, generate_attr), ids[lo:lo + chunk], records[lo:lo + chunk],
                                     _checker, tokenizer, max_tokens)
            correct += acc * len(records[lo:lo + chunk])
            bar.update(len(records[lo:lo + chunk]))
    return correct / max(len(records), 1)


def _served_by(info) -> dict[str, str]:
    """What a service's GetInfo says serves it."""
    return {"engine": info.engine, "device": info.device, "dtype": info.dtype, "model": info.model,
            "revision": info.revision}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written to run_dir/report.json)."""
    from transformers import AutoTokenizer

    from services.trainer import load_settings, probe_detector, train
    from topd_client import RolloutClient, TeacherClient

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report_to = cfg.tracking()
    print(f"preparing the built-in task {cfg.task!r} (cached after the first run)...", flush=True)
    models = prepare_task(cfg.task, progress=cfg.progress)
    timing["prepare"] = time.perf_counter() - t_start
    names = {role: f"builtin:{cfg.task}/{role}" for role in ("teacher", "student")}
    max_tokens = max_new_tokens_for(task_config(cfg.task))
    tokenizer = AutoTokenizer.from_pretrained(models.student_dir)
    test = _records(models.test_jsonl, cfg.test_size)
    val = _records(models.val_jsonl, cfg.eval_size)  # what the trainer evaluates on (the task's default eval data)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        print(f"starting the teacher (hf) and rollout ({cfg.rollout_engine}) services on loopback"
              + (" (vLLM takes about a minute to start)..." if cfg.rollout_engine == "vllm" else "..."), flush=True)
        t0 = time.perf_counter()
        teacher_proc = stack.enter_context(service("teacher", names["teacher"], logs, "--engine", "hf"))
        timing["teacher_start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rollout_proc = stack.enter_context(service("rollout", names["student"], logs, "--engine", cfg.rollout_engine))
        timing["rollout_start"] = time.perf_counter() - t0
        teacher = stack.enter_context(TeacherClient(teacher_proc.address, client_id="demo-eval"))
        rollout = stack.enter_context(RolloutClient(rollout_proc.address, client_id="demo-eval"))
        engines = {"teacher": _served_by(teacher.info()), "rollout": _served_by(rollout.info())}
        t0 = time.perf_counter()
        teacher_acc = evaluate(teacher, tokenizer, test, max_tokens, "generate", "teacher, test", cfg.progress)
        timing["eval_teacher"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        before = evaluate(rollout, tokenizer, test, max_tokens, "continue_from", "student, test", cfg.progress)
        before_val = evaluate(rollout, tokenizer, val, max_tokens, "continue_from", "student, val (step 0)",
                              cfg.progress)
        timing["eval_student_before"] = time.perf_counter() - t0
        print(f"test accuracy before: student {before:.1%}, teacher {teacher_acc:.1%} ({len(test)} problems)",
              flush=True)
        settings = load_settings(None, [], **{
            "student_model": names["student"], "teacher_address": teacher_proc.address,
            "rollout_address": rollout_proc.address, "eval_size": cfg.eval_size,
            "eval_every": 2 if cfg.quick else 20, "output_dir": str(run_dir), "http_port": free_port(),
            "max_steps": cfg.max_steps, "objective": cfg.objective, "max_new_tokens": max_tokens,
            "seed": cfg.seed, "progress": cfg.progress, "checkpoint_every": 0, "client_id": "demo", "task": cfg.task,
            "overwrite": True,  # each demo is a new run in its run dir
            "report_to": report_to, **_demo_defaults(cfg.quick), **cfg.train_overrides,
        })
        probe = test[: 8 if cfg.quick else 32]
        t0 = time.perf_counter()
        detector_before = probe_detector(settings, probe)
        timing["detector_probe"] = time.perf_counter() - t0
        pids = [teacher_proc.proc.pid, rollout_proc.proc.pid]
        t0, cpu0 = time.perf_counter(), cpu_seconds(pids)
        result = train(settings)
        timing["train"], train_cpu_s = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
        t0 = time.perf_counter()
        after = evaluate(rollout, tokenizer, test, max_tokens, "continue_from", "student after, test", cfg.progress)
        timing["eval_student_after"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        detector_after = probe_detector(settings.model_copy(update={"student_model": str(result.final_model)}), probe)
        timing["detector_probe"] += time.perf_counter() - t0
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    report = {
        "objective": cfg.objective, "task": cfg.task, "steps": result.steps, "test_problems": len(test),
        "accuracy_before": before, "accuracy_after": after, "teacher_accuracy": teacher_acc,
        "eval_problems": len(val), "eval_curve": [(0, before_val), *result.eval_accuracy],
        **_convergence(before, after, teacher_acc, result.eval_accuracy),
        "diagnostics": _mean_diagnostics(rows), "engines": engines,
        "detector": detector_report(detector_before, detector_after, settings, len(probe)),
        "tensorboard": f"tensorboard --logdir {run_dir / 'tb'}" if "tensorboard" in report_to else None,
        "timing_s": {k: round(v, 1) for k, v in timing.items()}, "train_cpu_s": round(train_cpu_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1), "run_dir": str(run_dir),
        "final_model": str(result.final_model),
        "models": {"teacher": str(models.teacher_dir), "student": str(models.student_dir),
                   "source": models.info.get("source", "trained")},
        "settings": settings.model_dump(mode="json", exclude={"auth_token"}),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (run_dir / "report.md").write_text(format_report(report))
    plot_curves(rows, run_dir / "curves.png", report)
    print(format_report(report), flush=True)
    return report


def _demo_defaults(quick: bool) -> dict[str, Any]:
    """Settings chosen for the built-in task on 2 CPU cores (docs/results.md, "Why OPD stalled"): the exact
    reverse KL over its 41-token vocabulary (`full`; the sampled token's estimate is ~3x noisier and
    degrades at lr >= 1e-3), lr 5e-4 with a cosine decay (a constant lr swings the greedy accuracy), and
    500 validation problems, so that one evaluation's noise is ~1.5 points."""
    common = {"opd_estimator": "full", "lr_schedule": "cosine", "min_lr_ratio": 0.1, "warmup_steps": 5,
              "adv_clip": 5.0}
    if quick:
        return {**common, "prompts_per_step": 4, "samples_per_prompt": 2, "max_candidates": 8, "window": 8}
    return {**common, "prompts_per_step": 8, "samples_per_prompt": 4, "max_candidates": 32, "window": 16, "lr": 5e-4,
            "eval_every": 25}


def _convergence(before: float, after: float, teacher: float, curve: list[tuple[int, float]]) -> dict[str, Any]:
    """Share of the student-teacher gap closed on the test split; best and last validation points."""
    accs = [a for _, a in curve]
    return {"gap_closed": (after - before) / (teacher - before) if teacher > before else float("nan"),
            "eval_best": max(accs) if accs else float("nan"), "eval_last": accs[-1] if accs else float("nan")}


def detector_report(before, after, settings, n_prompts: int) -> dict[str, Any]:
    """The near-future detector against the task's ground truth on the same fixed batch, on the starting
    student and the final one (`services.trainer.probe_detector`), with the settings it ran with."""
    from services.trainer import detector_settings

    def get(probe, key: str) -> float:
        return float(probe.metrics.get(key, float("nan")))

    return {"benign_frac_before": get(before, "gt/benign_frac"), "auc_before": get(before, "gt/auc"),
            "benign_frac_after": get(after, "gt/benign_frac"), "auc_after": get(after, "gt/auc"),
            "auc_forks_before": get(before, "gt/auc_forks"), "auc_forks_after": get(after, "gt/auc_forks"),
            "candidates_before": get(before, "gt/num_candidates"), "candidates_after": get(after, "gt/num_candidates"),
            "probe": f"{n_prompts} test prompts x 2 samples, the same seed before and after",
            "settings": detector_settings(settings)}


DIAG_KEYS = ("opd/reverse_kl", "opd/entropy", "topd/false_alarm_frac", "topd/mean_ot", "topd/pearson", "topd/spearman",
             "topd/num_divergent", "topd/traj_kl", "gt/auc", "gt/auc_forks", "gt/precision", "gt/recall", "gt/benign_frac",
             "time/step")


def _mean_diagnostics(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in DIAG_KEYS:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if vals:
            out[key] = float(np.mean(vals))
    if rows and "topd/mean_ot" in rows[0]:
        out["topd/mean_ot_first"] = float(rows[0]["topd/mean_ot"])
        out["topd/mean_ot_last"] = float(rows[-1].get("topd/mean_ot", float("nan")))
    return out


def format_report(r: dict[str, Any]) -> str:
    served = ", ".join(f"{name}: {e['engine']} ({e['device']}, {e['dtype']})" for name, e in r["engines"].items())
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in r["timing_s"].items())
    lines = [
        f"# topd demo: {r['objective']} on {r['task']}, {r['steps']} steps, {r['wall_s']} s",
        "",
        "| | test accuracy |",
        "|---|---|",
        f"| student before | {r['accuracy_before']:.1%} |",
        f"| student after | {r['accuracy_after']:.1%} |",
        f"| teacher | {r['teacher_accuracy']:.1%} |",
        "",
        f"({r['test_problems']} test problems, greedy decoding; {r['gap_closed']:.0%} of the gap to the teacher "
        f"closed; served by {served})",
        "",
        f"Validation: best {r['eval_best']:.1%}, last {r['eval_last']:.1%}. Training: {r['timing_s']['train']:.0f} s "
        f"({r['train_cpu_s']:.0f} CPU-seconds of trainer and services: on idle cores the wall-clock is at most this; on busy ones "
        f"threads waiting for a core add to it).",
        "",
        "| detector vs ground truth | before | after |",
        "|---|---|---|",
        f"| benign fraction of high-loss tokens | {r['detector']['benign_frac_before']:.3f} | "
        f"{r['detector']['benign_frac_after']:.3f} |",
        f"| AUC of D for errors | {r['detector']['auc_before']:.3f} | {r['detector']['auc_after']:.3f} |",
        f"| AUC of D, forks vs benign | {r['detector']['auc_forks_before']:.3f} | "
        f"{r['detector']['auc_forks_after']:.3f} |",
        "",
        "| diagnostic (mean over steps) | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in r["diagnostics"].items()],
        "",
        f"time: {timing}",
        f"run directory: {r['run_dir']} (metrics.jsonl, curves.png, final model in {r['final_model']})",
    ]
    if r.get("tensorboard"):
        lines.append(f"curves in TensorBoard: {r['tensorboard']}")
    return "\n".join(lines) + "\n"


def smooth(values: list[float], weight: float = 0.8) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start; NaNs are skipped."""
    out, avg, n = np.full(len(values), np.nan), 0.0, 0
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        avg, n = weight * avg + (1 - weight) * v, n + 1
        out[i] = avg / (1 - weight ** n)
    return out


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows]


def _varies(values: list[float]) -> bool:
    """False for a series with no finite value or one value throughout: a curve that says nothing."""
    finite = [v for v in values if math.isfinite(v)]
    return len(finite) > 0 and max(finite) > min(finite)


def plot_curves(rows: list[dict[str, Any]], path: Path, report: dict[str, Any]) -> dict[str, list]:
    """Accuracy from step 0 against the teacher; loss and KL, raw and smoothed; the detector's curves
    that vary. Returns what each panel shows (the accuracy curve's steps, the other panels' labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    shown: dict[str, list] = {"accuracy_steps": [], "training": [], "detector": []}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ev = report.get("eval_curve") or []
    if ev:
        ax.plot([s for s, _ in ev], [a for _, a in ev], marker="o", label=f"student ({report['eval_problems']} val)")
        shown["accuracy_steps"] = [s for s, _ in ev]
    ax.plot([0, report["steps"]], [report["accuracy_before"], report["accuracy_after"]], "s", color="C1",
            label=f"student ({report['test_problems']} test)")
    ax.axhline(report["teacher_accuracy"], color="gray", ls="--", label="teacher (test)")
    ax.set(ylim=(0, 1.02), xlim=(-0.5, max(report["steps"], 1) + 0.5), xlabel="step", ylabel="greedy accuracy",
           title="accuracy (step 0 = before training)")
    ax.legend(loc="lower right")
    ax = axes[1]
    for i, (key, label) in enumerate((("loss", "loss"), ("opd/reverse_kl", "reverse KL (sampled tokens)"))):
        vals = _series(rows, key)
        if _varies(vals):
            ax.plot(steps, vals, color=f"C{i}", alpha=0.3, lw=1)
            ax.plot(steps, smooth(vals), color=f"C{i}", lw=2, label=f"{label} (smoothed)")
            shown["training"].append(f"{label} (smoothed)")
    ax.set(xlabel="step", title="training signal (faint: raw)")
    ax.legend()
    ax = axes[2]
    # not the false-alarm fraction: with divergent_frac it is 1 - divergent_frac at every step, up to rounding
    for key, label in (("topd/mean_ot", "mean local OT"), ("gt/auc", "detector AUC (ground truth)"),
                       ("gt/benign_frac", "benign share of candidates")):
        vals = _series(rows, key)
        if _varies(vals):
            ax.plot(steps, vals, marker="o", ms=3, label=label)  # markers: steps with no value break the line
            shown["detector"].append(label)
    ax.set(xlabel="step", title="near-future detector")
    if shown["detector"]:
        ax.legend()
    fig.suptitle(f"topd demo: {report['objective']} on {report['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return shown
