"""`topd train --config FILE.yaml [--set key=value ...] [--optim.lr 3e-4 ...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from services.common.settings import add_settings_flags
from services.trainer.settings import TrainerSettings


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="Train a student (OPD / TOPD) against teacher and rollout services",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Settings, highest priority first: flags, --set key=value, env TOPD_TRAINER_* "
                    "(TOPD_TRAINER_OPTIM__LR or TOPD_TRAINER_LR), the --config YAML file, defaults. A setting is "
                    "named by its path (optim.lr) or by its leaf name (lr).")
    p.add_argument("--config", help="YAML file of settings (flat leaf names or nested groups)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one setting (value parsed as YAML), e.g. --set lr=3e-4")
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint (= --set resume=true)")
    p.set_defaults(func=_train, settings_flags=add_settings_flags(p, TrainerSettings))


def _train(args: argparse.Namespace) -> int:
    from services.trainer.run import train

    overrides = list(args.set) + (["resume=true"] if args.resume else [])
    settings = TrainerSettings.load(args.config, overrides, cli=args.settings_flags(parsed_args=args))
    stop = threading.Event()
    stop_on_signals(stop)
    result = train(settings, stop=stop)
    if result.stopped:
        print(f"stopped after step {result.steps} of {settings.max_steps}: checkpoint written in "
              f"{settings.output_dir}; run again with resume=auto (or --resume) to continue")
        return 0
    print(f"trained {result.steps} steps; metrics: {result.metrics_file}; final model: {result.final_model}")
    return 0


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM / SIGINT (what compose, Kubernetes and Ctrl-C send): finish the step, checkpoint, exit 0.
    A second signal abandons the step at once (KeyboardInterrupt)."""

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt(signal.Signals(signum).name)
        stop.set()
        logging.getLogger("topd").warning("%s: stopping after the current step (a checkpoint follows; send it "
                                          "again to stop at once)", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
