"""One typed settings object per service: defaults < env vars (TOPD_<SERVICE>_*) < CLI flags.

The CLI is generated from the pydantic model, so every setting is documented once (its
`Field(description=...)` becomes the `--help` text).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Sequence, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from topd_client.errors import ConfigurationError

S = TypeVar("S", bound=BaseSettings)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """One `--flag-name` per field, typed and documented from the model."""
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field)}
        choices = _literal_choices(ann)
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _scalar_type(ann)
        parser.add_argument(flag, **kwargs)


def settings_from_args(cls: type[S], args: argparse.Namespace | dict[str, Any]) -> S:
    """Build the settings; flags given on the CLI override env vars and defaults."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    known = {k: v for k, v in given.items() if k in cls.model_fields}
    try:
        return cls(**known)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid {cls.__name__}: {exc}") from exc


def parse_settings(cls: type[S], argv: Sequence[str] | None, prog: str) -> S:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    add_settings_arguments(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv))


def _help(field: Any) -> str:
    text = field.description or ""
    if field.default is not None and field.default is not ... and not callable(field.default):
        text += f" (default: {field.default})"
    return text


def _literal_choices(ann: Any) -> list[Any] | None:
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    return None


def _scalar_type(ann: Any) -> Any:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return _scalar_type(args[0]) if args else str
    if ann in (int, float, str):
        return ann
    return str
