"""Typed errors of the SDK and services. Each also inherits the stdlib type it refines."""

from __future__ import annotations

ERROR_CLASS_KEY = "topd-error"  # trailing metadata: the server's error class, when the status code alone is coarser


class TopdError(Exception):
    """Base of every topd error."""


class InvalidInputError(TopdError, ValueError):
    """The request is malformed (maps to gRPC INVALID_ARGUMENT)."""


class MalformedTensorError(InvalidInputError):
    """Tensor bytes do not match their dtype and shape."""


class TooLargeError(InvalidInputError):
    """A request (or its response) is over a server limit that waiting cannot lift: more items than
    the queue holds, or more bytes than one message may carry. Split or stream it; never retried."""


class PreconditionError(TopdError, RuntimeError):
    """The request is well formed but cannot be served now (FAILED_PRECONDITION)."""


class OverloadedError(TopdError, RuntimeError):
    """The server's queue is full (RESOURCE_EXHAUSTED); safe to retry later."""


class UnavailableError(TopdError, ConnectionError):
    """The service cannot be reached or is still loading (UNAVAILABLE)."""


class AuthError(TopdError, PermissionError):
    """Missing or wrong auth token (UNAUTHENTICATED)."""


class ConfigurationError(TopdError, ValueError):
    """Settings that cannot work together; the message says which and why."""


class TokenizerMismatchError(ConfigurationError):
    """Teacher and student tokenizers differ, so their logprobs are not comparable."""
