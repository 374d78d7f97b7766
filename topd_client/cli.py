"""The `topd` command: run a service, train, run the demo, or look at a service's status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence


def _serve(settings_cls_path: str, start_path: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from importlib import import_module

        from services.common.settings import settings_from_args

        mod, cls = settings_cls_path.rsplit(".", 1)
        settings = settings_from_args(getattr(import_module(mod), cls), args)
        mod, fn = start_path.rsplit(".", 1)
        service = getattr(import_module(mod), fn)(settings)
        e = service.endpoints
        logging.getLogger("topd").info("ready: grpc %s:%s, http %s:%s", e.host, e.grpc_port, e.host, e.http_port)
        service.wait()
        return 1 if service.failure else 0  # non-zero: a supervisor restarts the service
    return run


SERVICES = {
    "teacher": ("services.teacher.settings.TeacherSettings", "services.teacher.service.start_teacher",
                "Serve a teacher model (scores and near-future windows)"),
    "rollout": ("services.rollout.settings.RolloutSettings", "services.rollout.service.start_rollout",
                "Serve the student policy (samples, continuations, live weight updates)"),
}


def _status(args: argparse.Namespace) -> int:
    import httpx

    url = args.url.rstrip("/")
    if not url.startswith("http"):
        url = "http://" + url
    if not url.endswith("/status"):
        url += "/status"
    from topd_client.auth import resolve_token

    token = resolve_token()  # TOPD_AUTH_TOKEN(_FILE): /status needs it when the service has auth on
    try:
        resp = httpx.get(url, timeout=args.timeout, headers={"authorization": f"Bearer {token}"} if token else None)
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    data = resp.json()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_status(data))
    return 0 if resp.status_code == 200 else 1


def format_status(data: dict, indent: str = "") -> str:
    """A readable two-column table; nested dicts become indented sections."""
    flat = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    width = max((len(k) for k, _ in flat), default=0)
    lines = [f"{indent}{k.ljust(width)}  {_fmt(v)}" for k, v in flat]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(format_status(v, indent + "  ") if v else f"{indent}  (none)")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def build_parser() -> argparse.ArgumentParser:
    from services.common.settings import add_settings_arguments

    parser = argparse.ArgumentParser(prog="topd", description="Trajectory-aware on-policy distillation")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings_path, start_path, help_text) in SERVICES.items():
        from importlib import import_module

        mod, cls = settings_path.rsplit(".", 1)
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p, getattr(import_module(mod), cls))
        p.set_defaults(func=_serve(settings_path, start_path))
    st = sub.add_parser("status", help="Print a service's /status as a table")
    st.add_argument("url", help="http://host:port of the service's REST port")
    st.add_argument("--json", action="store_true", help="raw JSON")
    st.add_argument("--timeout", type=float, default=5.0)
    st.set_defaults(func=_status)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """train / prepare / demo live in services.trainer and services.task (heavier imports)."""
    from importlib import import_module

    for module in ("services.trainer.cli", "services.task.cli"):
        try:
            mod = import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module):
                continue
            raise
        mod.add_commands(sub)


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so `finally` blocks stop child services.

    Set explicitly: a process started in the background by a non-interactive shell inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    import signal

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
    from topd_client.errors import TopdError

    try:
        return int(args.func(args) or 0)
    except TopdError as exc:
        print(f"topd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
