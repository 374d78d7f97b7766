"""The `topd` command: serve a teacher or a rollout, train, prepare the built-in task, run the demo,
and the SDK's client commands (`topd status`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, Sequence

from services.common.settings import add_settings_flags, settings_from_flags
from topd_client.cli import add_client_commands
from topd_client.errors import TopdError

log = logging.getLogger("topd")


def _service_commands(sub: argparse._SubParsersAction) -> None:
    from services.rollout.service import start_rollout
    from services.rollout.settings import RolloutSettings
    from services.teacher.service import start_teacher
    from services.teacher.settings import TeacherSettings

    for name, cls, start in (("teacher", TeacherSettings, start_teacher), ("rollout", RolloutSettings, start_rollout)):
        help_text = (cls.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=help_text, description=help_text + " Every flag is also an env var "
                           f"({cls.model_config['env_prefix']}<FLAG>).")
        p.set_defaults(func=_serve(cls, start), settings_flags=add_settings_flags(p, cls))


def _serve(cls: type, start: Callable) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        service = start(settings_from_flags(cls, args.settings_flags, args))
        e = service.endpoints
        log.info("ready: grpc %s:%s, http %s:%s", e.host, e.grpc_port, e.host, e.http_port)
        service.wait()
        return 1 if service.failure else 0  # non-zero: a supervisor restarts the service
    return run


def build_parser() -> argparse.ArgumentParser:
    from services.task.cli import add_commands as add_task_commands
    from services.trainer.cli import add_commands as add_train_commands

    parser = argparse.ArgumentParser(prog="topd", description="Trajectory-aware on-policy distillation")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _service_commands(sub)
    add_train_commands(sub)
    add_task_commands(sub)
    add_client_commands(sub)
    return parser


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so `finally` blocks stop child services.

    Set explicitly: a process started in the background by a non-interactive shell inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt."""

    def _raise(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per health poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in ("demo", "prepare"):  # `train` stops cleanly on its own (services/trainer/cli.py)
        interrupt_on_signals()
    try:
        return int(args.func(args) or 0)
    except TopdError as exc:
        print(f"topd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
