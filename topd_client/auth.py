"""Where the shared auth token comes from: an argument, a file, or the environment.

A file keeps the secret out of `ps` and out of compose/k8s specs (TOPD_AUTH_TOKEN_FILE points at a
mounted secret). It is read once, at start, with surrounding whitespace (a trailing newline from
`echo` or `openssl rand -hex 32 > file`) stripped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from topd_client.errors import ConfigurationError

TOKEN_ENV = "TOPD_AUTH_TOKEN"
TOKEN_FILE_ENV = "TOPD_AUTH_TOKEN_FILE"


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the auth token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ConfigurationError(f"the auth token file {path} is empty")
    return token


def resolve_token(token: str | None = None, token_file: str | Path | None = None, *,
                  env: Mapping[str, str] | None = os.environ) -> str | None:
    """The token to use: `token`, else the contents of `token_file`, else (when `env` is given)
    TOPD_AUTH_TOKEN_FILE's file, else TOPD_AUTH_TOKEN; None when none is set (auth off)."""
    if token and token_file:
        raise ConfigurationError("give the auth token or a token file, not both")
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    if env is not None:
        return resolve_token(env.get(TOKEN_ENV), env.get(TOKEN_FILE_ENV), env=None)
    return None
