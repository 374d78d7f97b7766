"""`topd train --config FILE.yaml [--set key=value ...]`."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    from services.trainer.settings import TrainerSettings

    fields = "\n".join(f"  {name}: {f.description} (default: {f.default})"
                       for name, f in TrainerSettings.model_fields.items())
    p = sub.add_parser("train", help="Train a student (OPD / TOPD) against teacher and rollout services",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Settings: YAML file < env TOPD_TRAINER_* < --set key=value.\n\n" + fields)
    p.add_argument("--config", help="YAML file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one setting")
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from topd_client.cli import interrupt_on_signals

    interrupt_on_signals()
    from services.trainer.run import train
    from services.trainer.settings import load_settings

    overrides = list(args.set) + (["resume=true"] if args.resume else [])
    settings = load_settings(args.config, overrides)
    result = train(settings)
    print(f"trained {result.steps} steps; metrics: {result.metrics_file}; final model: {result.final_model}")
    return 0
