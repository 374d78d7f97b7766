"""Read docker-compose.yml as local processes: the same argv and environment, on loopback.

A test starts the stack of a compose profile without Docker::

    compose = Path("docker-compose.yml")
    ports = {port: free_port() for port in compose_ports(compose)}
    remap = LocalRemap(ports=ports, paths={"/data": str(tmp / "data"), "/checkpoints": str(tmp / "ckpt"),
                                           "/run/topd": str(tmp / "auth"), "/weights-shm": str(tmp / "shm")})
    services = load_services(compose, remap=remap)
    for name in start_order(services):
        svc = services[name]   # svc.argv == ("topd", "teacher"), svc.env: the compose environment
        subprocess.Popen(svc.argv, env={**os.environ, **svc.env})

Pure functions: nothing here reads the process environment, starts anything or writes files.
Interpolation follows Compose: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``,
``${VAR?message}``, ``$VAR`` and ``$$`` for a literal ``$`` (a default may hold ``$VAR`` but not a
braced ``${...}``); the values come from ``variables`` only: pass ``os.environ`` to use the caller's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

EXECUTABLE = "topd"
# What a service may run besides topd: python3 (the one-shot `token` service's inline script).
EXECUTABLES = (EXECUTABLE, "python3")
LOOPBACK = "127.0.0.1"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
# host:port, alone or inside an address such as dns:///teacher:50051 or http://teacher:8001/readyz.
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\b")


class ComposeFileError(ValueError):
    """The compose file cannot be read as topd services (bad interpolation, unknown profile, ...)."""


@dataclass(frozen=True)
class LocalRemap:
    """How container-side settings become local ones.

    ports: container port -> local port, applied to ``*_PORT`` values and to ``host:port`` addresses.
    paths: container path -> local path, applied to values that are that path or lie under it
        (e.g. ``{"/data": "/tmp/x/data"}`` turns ``/data/hf`` into ``/tmp/x/data/hf``).
    host: what service names and bind hosts (``*_HOST`` values) become.
    """

    ports: Mapping[int, int] = field(default_factory=dict)
    paths: Mapping[str, str] = field(default_factory=dict)
    host: str = LOOPBACK


@dataclass(frozen=True)
class LocalService:
    """One compose service as a local process.

    argv: entrypoint + command, the executable being ``topd`` (e.g. ``("topd", "teacher")``) or
        ``python3`` (the one-shot ``token`` service).
    env: the service's compose environment after interpolation and remapping (add it to os.environ).
    depends_on: service -> condition (``service_healthy``, ``service_completed_successfully``, ...).
    http_port: the local port of its REST API (``/readyz``, ``/status``), None for one-shot services.
    one_shot: runs to completion (``prepare``) rather than serving.
    """

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    depends_on: dict[str, str]
    http_port: int | None
    one_shot: bool

    @property
    def ready_url(self) -> str | None:
        """``http://127.0.0.1:<http_port>/readyz``, or None when the service serves nothing."""
        return None if self.http_port is None else f"http://{LOOPBACK}:{self.http_port}/readyz"


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's ``${VAR:-default}`` interpolation of one string, with values from ``variables``.

    >>> interpolate("${A:-x}/${B-y}/$$C", {"B": ""})
    'x//$C'
    """

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value = variables.get(name)
        op, arg = match["op"], match["arg"] or ""
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return interpolate(arg, variables) if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise ComposeFileError(f"required variable {name} is missing: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def read_compose(compose_file: str | Path, variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as a dict: anchors and ``<<`` merges resolved, every string interpolated."""
    with open(compose_file, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ComposeFileError(f"{compose_file} has no services mapping")
    return _interpolate_tree(document, variables or {})


def profile_services(document: Mapping[str, Any], profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services a ``--profile PROFILE`` run starts: those in that profile and those in none
    (profile None: a plain ``docker compose up``, only those in none)."""
    services = document["services"]
    known = {p for spec in services.values() for p in spec.get("profiles", [])}
    if profile is not None and profile not in known:
        raise ComposeFileError(f"unknown profile {profile!r}; the file has {sorted(known)}")
    return {name: spec for name, spec in services.items()
            if not spec.get("profiles") or profile in spec["profiles"]}


def _as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(item) for item in value]


def _as_env(value: Any) -> dict[str, str]:
    if isinstance(value, list):  # ["KEY=value", "KEY"]
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in value)
        return {key: val for key, val in pairs}
    return {key: "" if val is None else str(val) for key, val in (value or {}).items()}


def _as_depends_on(value: Any) -> dict[str, str]:
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in (value or {}).items()}


def compose_ports(compose_file: str | Path, profile: str | None = None,
                  variables: Mapping[str, str] | None = None) -> list[int]:
    """The container ports a profile's services use (``*_PORT`` settings), to choose local ones for."""
    services = profile_services(read_compose(compose_file, variables), profile)
    ports = {int(value) for spec in services.values()
             for key, value in _as_env(spec.get("environment")).items()
             if key.endswith("_PORT") and value.isdigit()}
    return sorted(ports)


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


def _local_service(name: str, spec: Mapping[str, Any], service_names: frozenset[str],
                   remap: LocalRemap) -> LocalService:
    argv = _as_argv(spec.get("entrypoint")) or [EXECUTABLE]
    if Path(argv[0]).name not in EXECUTABLES:
        raise ComposeFileError(f"service {name} runs {argv[0]!r}, not one of {', '.join(EXECUTABLES)}")
    argv = [Path(argv[0]).name, *argv[1:], *_as_argv(spec.get("command"))]
    env = {key: _remap_value(key, value, service_names, remap)
           for key, value in _as_env(spec.get("environment")).items()}
    argv = [argv[0], *(_remap_value("", arg, service_names, remap) for arg in argv[1:])]
    http_ports = [int(value) for key, value in env.items() if key.endswith("_HTTP_PORT")]
    return LocalService(
        name=name,
        argv=tuple(argv),
        env=env,
        depends_on=_as_depends_on(spec.get("depends_on")),
        http_port=http_ports[0] if http_ports else None,
        one_shot=not http_ports,
    )


def load_services(compose_file: str | Path, profile: str | None = None, remap: LocalRemap = LocalRemap(),
                  variables: Mapping[str, str] | None = None) -> dict[str, LocalService]:
    """Every service of ``profile`` as a local process (see the module docstring)."""
    services = profile_services(read_compose(compose_file, variables), profile)
    names = frozenset(services)
    return {name: _local_service(name, spec, names, remap) for name, spec in services.items()}


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
            raise ComposeFileError(f"a service depends on {name}, which is not in this profile")
        visiting.add(name)
        for dependency in services[name].depends_on:
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order
