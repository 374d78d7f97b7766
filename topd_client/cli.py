"""The SDK's commands, which talk to running services over HTTP only: `topd status URL`.

`topd` (services/cli.py) includes them; without the servers installed, `python -m topd_client.cli`
runs them on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


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


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """`status` (and the other HTTP-only commands) on a `topd` command line."""
    st = sub.add_parser("status", help="Print a service's /status as a table")
    st.add_argument("url", help="http://host:port of the service's REST port")
    st.add_argument("--json", action="store_true", help="raw JSON")
    st.add_argument("--timeout", type=float, default=5.0)
    st.set_defaults(func=_status)
    from topd_client.top import add_top_command

    add_top_command(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topd", description="topd client commands")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
