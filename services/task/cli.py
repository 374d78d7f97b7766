"""`topd prepare` and `topd demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.task.tasks import BUILTIN_TASKS
from services.trainer import OBJECTIVES

_TASK_HELP = ("Built-in task: arith (uniform surface forms) or styled (teacher and student each with a style of "
              "their own: the case TOPD's near-future test is built for)")


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="Build (or reuse) the built-in task's teacher and student models")
    p.add_argument("--data-dir", type=Path, default=None, help="Cache directory (default: $TOPD_DATA_DIR or ~/.cache/topd)")
    p.add_argument("--task", default="arith", choices=BUILTIN_TASKS, help=_TASK_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare)
    d = sub.add_parser("demo", help="Distil the built-in teacher into the built-in student, end to end (CPU, minutes)")
    d.add_argument("--quick", action="store_true", help="A short run (for tests)")
    d.add_argument("--task", default="arith", choices=BUILTIN_TASKS, help=_TASK_HELP)
    d.add_argument("--data-dir", type=Path, default=None)
    d.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    d.add_argument("--objective", default="topd", choices=OBJECTIVES)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--rollout-engine", default="hf", choices=["hf", "vllm"])
    d.add_argument("--n-test", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)


def _prepare(args: argparse.Namespace) -> int:
    import os

    from services.task.tasks import prepare_task

    if args.data_dir:
        os.environ["TOPD_DATA_DIR"] = str(args.data_dir)
    built = prepare_task(args.task, args.data_dir, seed=args.seed)
    print(f"teacher: {built.teacher_dir}\nstudent: {built.student_dir}\ntrain:   {built.train_jsonl}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.task.demo import DemoConfig, run_demo

    run_demo(DemoConfig(quick=args.quick, task=args.task, data_dir=args.data_dir, run_dir=args.run_dir,
                        objective=args.objective, steps=args.steps, rollout_engine=args.rollout_engine,
                        n_test=args.n_test, seed=args.seed, progress=not args.no_progress))
    return 0
