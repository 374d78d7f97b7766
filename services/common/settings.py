"""Command-line flags from a pydantic settings class (pydantic-settings' own CLI source).

Every service has one typed settings object whose `Field(description=...)` is its one-line help;
the flags (`--max-batch-tokens`, `--optim.lr`) are generated from it, so nothing is documented twice.
Priority: flags > env vars > defaults (the trainer adds `--set` and a YAML file in between).
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource

from topd_client.errors import ConfigurationError

S = TypeVar("S", bound=BaseSettings)


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[S]) -> CliSettingsSource:
    """Add one `--flag` per setting of `cls` to `parser`; keep the returned source to read them back."""
    return CliSettingsSource(cls, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_avoid_json=True, cli_prog_name=parser.prog)


def settings_from_flags(cls: type[S], source: CliSettingsSource, args: argparse.Namespace) -> S:
    """The settings, flags given on the command line overriding env vars and defaults."""
    try:
        return cls(_cli_settings_source=source(parsed_args=args))
    except ValidationError as exc:
        raise ConfigurationError(describe(exc, cls.__name__)) from None


def parse_settings(cls: type[S], argv: list[str] | None, prog: str) -> S:
    """Settings of `cls` from an argv (for services started as their own program)."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    source = add_settings_flags(parser, cls)
    return settings_from_flags(cls, source, parser.parse_args(argv))


def describe(exc: ValidationError, what: str) -> str:
    """pydantic's multi-line report as one line: `invalid <what>: max_top_k: Input should be ... (got -1)`."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting (see --help)"
        got = err.get("input")
        shown = "" if err.get("type") in ("extra_forbidden", "value_error") or isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    return f"invalid {what}: " + "; ".join(problems)
