"""topd client SDK: typed clients for the teacher and rollout services, and the `topd` CLI."""

from topd_client.errors import (AuthError, ConfigurationError, InvalidInputError, OverloadedError,
                                PreconditionError, TokenizerMismatchError, TopdError, UnavailableError)
from topd_client.results import Completion, ModelInfo
from topd_client.rollout import RolloutClient
from topd_client.teacher import ScoreResult, TeacherClient

__all__ = [
    "AuthError", "Completion", "ConfigurationError", "InvalidInputError", "ModelInfo", "OverloadedError",
    "PreconditionError", "RolloutClient", "ScoreResult", "TeacherClient", "TokenizerMismatchError", "TopdError", "UnavailableError",
]
