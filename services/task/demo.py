"""`topd demo`: distil the built-in teacher into the built-in student on this machine, end to end.

Prepares (or reuses) the models, starts the teacher and rollout services as subprocesses on free
loopback ports, measures the student and teacher on the test split, trains with TOPD (progress bar:
step, KL, accuracy), measures again, and writes a run directory: metrics.jsonl, report.json,
report.md, curves.png and the final student in Hugging Face format. The services are shut down on
every exit path, Ctrl-C included.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.launch import free_port, service
from services.task import arith
from services.task.models import max_new_tokens_for
from services.task.tasks import prepare_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; `quick` is a short run for tests."""

    quick: bool = False
    task: str = "arith"  # a built-in task (services.task.tasks): arith or styled
    data_dir: Path | None = None
    run_dir: Path = Path("runs/demo")
    objective: str = "topd"
    steps: int | None = None
    rollout_engine: str = "hf"
    n_test: int | None = None
    seed: int = 0
    progress: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def max_steps(self) -> int:
        return self.steps if self.steps is not None else (4 if self.quick else 60)

    @property
    def test_size(self) -> int:
        return self.n_test if self.n_test is not None else (64 if self.quick else 1000)


def _records(path: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _checker(record: dict[str, Any], text: str) -> bool:
    return arith.check(arith.Problem.from_json(record), text)


def evaluate(client, tokenizer, records: list[dict[str, Any]], max_tokens: int, generate_attr: str) -> float:
    from services.trainer import greedy_accuracy

    ids = [np.asarray(tokenizer(r["prompt"])["input_ids"], dtype=np.int32) for r in records]
    acc, _ = greedy_accuracy(getattr(client, generate_attr), ids, records, _checker, tokenizer, max_tokens)
    return acc


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written to run_dir/report.json)."""
    from transformers import AutoTokenizer

    from services.trainer import load_settings, probe_detector, train
    from topd_client import RolloutClient, TeacherClient

    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print("preparing the built-in task and models (cached after the first run)...", flush=True)
    models = prepare_task(cfg.task, cfg.data_dir, seed=cfg.seed, progress=cfg.progress)
    task_cfg = arith.TaskConfig(**{k: v for k, v in (models.info.get("config", {}).get("task") or {}).items()
                                   if k in ("n_digits", "n_operands", "seed")})
    max_tokens = max_new_tokens_for(task_cfg)
    tokenizer = AutoTokenizer.from_pretrained(models.student_dir)
    test = _records(models.test_jsonl, cfg.test_size)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        print("starting teacher and rollout services on loopback...", flush=True)
        teacher_proc = stack.enter_context(service("teacher", models.teacher_dir, logs, "--engine", "hf"))
        rollout_proc = stack.enter_context(service("rollout", models.student_dir, logs, "--engine",
                                                   cfg.rollout_engine))
        teacher = stack.enter_context(TeacherClient(teacher_proc.address, client_id="demo-eval"))
        rollout = stack.enter_context(RolloutClient(rollout_proc.address, client_id="demo-eval"))
        teacher_acc = evaluate(teacher, tokenizer, test, max_tokens, "generate")
        before = evaluate(rollout, tokenizer, test, max_tokens, "continue_from")
        print(f"test accuracy before: student {before:.1%}, teacher {teacher_acc:.1%} ({len(test)} problems)",
              flush=True)
        settings = load_settings(None, [], **{
            "student_model": str(models.student_dir), "teacher_address": teacher_proc.address,
            "rollout_address": rollout_proc.address, "train_file": str(models.train_jsonl),
            "eval_file": str(models.val_jsonl), "eval_size": 32 if cfg.quick else 200,
            "eval_every": 2 if cfg.quick else 20, "output_dir": str(run_dir), "http_port": free_port(),
            "max_steps": cfg.max_steps, "objective": cfg.objective, "max_new_tokens": max_tokens,
            "seed": cfg.seed, "progress": cfg.progress, "checkpoint_every": 0, "client_id": "demo", "task": cfg.task,
            **_demo_defaults(cfg.quick), **cfg.train_overrides,
        })
        probe = test[: 8 if cfg.quick else 32]
        detector_before = probe_detector(settings, probe)
        result = train(settings)
        after = evaluate(rollout, tokenizer, test, max_tokens, "continue_from")
        detector_after = probe_detector(settings.model_copy(update={"student_model": str(result.final_model)}), probe)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    report = {
        "objective": cfg.objective, "steps": result.steps, "test_problems": len(test),
        "accuracy_before": before, "accuracy_after": after, "teacher_accuracy": teacher_acc,
        "eval_curve": result.eval_accuracy, "diagnostics": _mean_diagnostics(rows),
        "detector": detector_report(detector_before, detector_after, settings, len(probe)),
        "wall_s": round(time.time() - t_start, 1), "run_dir": str(run_dir), "final_model": str(result.final_model),
        "models": {"teacher": str(models.teacher_dir), "student": str(models.student_dir)},
        "settings": settings.model_dump(mode="json", exclude={"auth_token"}),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (run_dir / "report.md").write_text(format_report(report))
    plot_curves(rows, run_dir / "curves.png", report)
    print(format_report(report), flush=True)
    return report


def _demo_defaults(quick: bool) -> dict[str, Any]:
    """Step sizes tuned for the built-in task on 2 CPU cores (see docs/results.md)."""
    if quick:
        return {"prompts_per_step": 4, "samples_per_prompt": 2, "max_candidates": 8, "window": 8}
    return {"prompts_per_step": 8, "samples_per_prompt": 4, "max_candidates": 32, "window": 16, "lr": 3e-4,
            "adv_clip": 5.0, "warmup_steps": 5}


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


DIAG_KEYS = ("opd/reverse_kl", "topd/false_alarm_frac", "topd/mean_ot", "topd/pearson", "topd/spearman",
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
    lines = [
        f"# topd demo: {r['objective']}, {r['steps']} steps, {r['wall_s']} s",
        "",
        "| | test accuracy |",
        "|---|---|",
        f"| student before | {r['accuracy_before']:.1%} |",
        f"| student after | {r['accuracy_after']:.1%} |",
        f"| teacher | {r['teacher_accuracy']:.1%} |",
        "",
        f"({r['test_problems']} test problems, greedy decoding)",
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
        f"run directory: {r['run_dir']} (metrics.jsonl, curves.png, final model in {r['final_model']})",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(steps, [r["opd/reverse_kl"] for r in rows], label="reverse KL (sampled tokens)")
    axes[0].plot(steps, [r["loss"] for r in rows], label="loss", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].legend()
    ev = report.get("eval_curve") or []
    if ev:
        axes[1].plot([s for s, _ in ev], [a for _, a in ev], marker="o", label="student (val)")
    axes[1].axhline(report["teacher_accuracy"], color="gray", ls="--", label="teacher (test)")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accuracy")
    axes[1].legend()
    for key, label in (("topd/false_alarm_frac", "false-alarm fraction"), ("topd/mean_ot", "mean local OT"),
                       ("gt/auc", "detector AUC (ground truth)")):
        vals = [r.get(key) for r in rows]
        if any(isinstance(v, (int, float)) for v in vals):
            axes[2].plot(steps, [v if isinstance(v, (int, float)) else np.nan for v in vals], label=label)
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.suptitle(f"topd demo ({report['objective']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
